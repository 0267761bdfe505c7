"""``TaskGridPicture``: after each validation, one held-out image restored at a grid of task vectors."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from cirlab.figures import publish_figure

TYPE_NAMES = ("blur", "noise", "jpeg")


def task_grid(levels_in: torch.Tensor, fractions: list[float]) -> tuple[torch.Tensor, list[str]]:
    """Task vectors for a modulation picture: rows = all types / blur / noise / JPEG only.

    ``levels_in`` (3,) task-space input levels; row ``all`` uses ``f * levels_in``, row ``blur``
    uses ``(f * l_blur, 0, 0)`` (remove a fraction of the blur, keep the rest), and so on.
    Returns ``(tasks (4 * F, 3), row names)``.
    """
    rows, names = [], ["all", *TYPE_NAMES]
    for row in range(4):
        mask = torch.ones(3) if row == 0 else torch.nn.functional.one_hot(torch.tensor(row - 1), 3).float()
        for fraction in fractions:
            rows.append(levels_in * mask * fraction)
    return torch.stack(rows), names


class TaskGridPicture(L.Callback):
    """After each validation, restore one held-out image at several task vectors and save a grid.

    The image is the central ``crop x crop`` window (each side at most ``crop``, rounded down
    to even; None = the whole image). The first column is the degraded input (physical levels
    ``input_levels`` = [r, sigma, q], q = 0 for no JPEG), then one column per fraction of the
    full task vector. Saved as
    ``dirpath/step{N}.png`` and ``dirpath/latest.png``; sent to W&B when a WandbLogger is attached.
    """

    def __init__(self, dirpath: str, input_levels=(2.0, 30.0, 30), fractions=(0.0, 0.25, 0.5, 0.75, 1.0),
                 crop: int | None = 192, seed: int = 0) -> None:
        self.dirpath = Path(dirpath)
        self.input_levels = [float(v) for v in input_levels]
        self.fractions = [float(f) for f in fractions]
        self.crop = crop
        self.seed = seed
        self.last_path: Path | None = None

    def render(self, pl_module: L.LightningModule, clean: torch.Tensor, title: str) -> object:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from cirlab.data.degradations import degrade
        from cirlab.data.image_files import center_crop
        from cirlab.tasks import physical_to_task

        clean = center_crop(clean, self.crop).to(pl_module.device)
        levels_in = physical_to_task(torch.tensor([self.input_levels]))[0]
        generator = torch.Generator(device=clean.device).manual_seed(self.seed)
        degraded = degrade(clean, levels_in[None].to(clean.device), generator=generator)
        tasks, row_names = task_grid(levels_in, self.fractions)
        was_training = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            outputs = torch.cat([pl_module(degraded, task[None].to(clean.device)) for task in tasks]).clamp(0, 1).cpu()
        pl_module.train(was_training)

        columns = len(self.fractions) + 1
        figure, axes = plt.subplots(4, columns, figsize=(2.2 * columns, 2.2 * 4 + 0.4), squeeze=False)
        for row, name in enumerate(row_names):
            axes[row, 0].imshow(degraded[0].permute(1, 2, 0).cpu().numpy())
            axes[row, 0].set_title("input" if row == 0 else "", fontsize=8)
            axes[row, 0].set_ylabel(f"restore {name}", fontsize=9)
            for col in range(len(self.fractions)):
                task = tasks[row * len(self.fractions) + col]
                axes[row, col + 1].imshow(outputs[row * len(self.fractions) + col].permute(1, 2, 0).numpy())
                axes[row, col + 1].set_title("t=(" + ", ".join(f"{v:.2f}" for v in task.tolist()) + ")", fontsize=7)
        for axis in axes.flat:
            axis.set_xticks([])
            axis.set_yticks([])
        r, sigma, q = self.input_levels
        figure.suptitle(f"{title}: input r={r:g}, sigma={sigma:g}, q={'none' if q == 0 else int(q)}", fontsize=10)
        return figure

    def caption(self, step: int) -> str:
        """What the picture shows, for W&B: the input's levels, the rows and the columns."""
        r, sigma, q = self.input_levels
        return (f"step {step}: held-out image degraded at r={r:g}, sigma={sigma:g}, q={'none' if q == 0 else int(q)}; "
                f"rows restore all/blur/noise/JPEG, columns: input then t = f x input level, "
                f"f = {', '.join(f'{f:g}' for f in self.fractions)}")

    def write(self, trainer: L.Trainer, pl_module: L.LightningModule, name: str) -> Path | None:
        datamodule = getattr(trainer, "datamodule", None)
        clean = datamodule.example_inputs(1) if datamodule is not None and hasattr(datamodule, "example_inputs") else None
        if clean is None:
            return None
        figure = self.render(pl_module, clean, f"step {trainer.global_step}")
        self.last_path = publish_figure(trainer, figure, self.dirpath, name, key="val/task_grid",
                                        caption=self.caption(trainer.global_step))
        return self.last_path

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or trainer.fast_dev_run:
            return
        self.write(trainer, pl_module, f"step{trainer.global_step:07d}")
