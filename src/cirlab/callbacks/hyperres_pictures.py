"""A picture for scalar-level models (HyperRes): one held-out crop degraded and restored at several levels."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from cirlab.figures import publish_figure


class LevelPicture(L.Callback):
    """After each validation, save ``dirpath/step{N}.png`` and ``latest.png``: top row the degraded
    inputs, bottom row the restorations, one column per level (default: the data's validation
    levels, which include levels outside the training set). Needs a
    :class:`~cirlab.data.hyperres.LevelDataModule`; does nothing otherwise."""

    def __init__(self, dirpath: str, levels: list[float] | None = None, crop: int = 160, seed: int = 0) -> None:
        self.dirpath = Path(dirpath)
        self.levels = None if levels is None else [float(v) for v in levels]
        self.crop = crop
        self.seed = seed
        self.last_path: Path | None = None

    def render(self, pl_module: L.LightningModule, datamodule, clean: torch.Tensor, title: str):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from cirlab.data.hyperres import degrade_image_levels
        from cirlab.data.image_files import center_crop

        levels = self.levels or datamodule.val_levels
        clean = center_crop(clean[0], self.crop).contiguous()
        degraded = degrade_image_levels(clean, datamodule.task, levels, self.seed, 0).to(pl_module.device)
        c = torch.tensor(levels, device=pl_module.device) / datamodule.level_scale
        was_training = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            restored = pl_module.net(degraded.float().div(255), c).clamp(0, 1).cpu()
        pl_module.train(was_training)
        figure, axes = plt.subplots(2, len(levels), figsize=(2.2 * len(levels), 4.8), squeeze=False)
        for col, level in enumerate(levels):
            axes[0, col].imshow(degraded[col].permute(1, 2, 0).cpu().numpy())
            axes[0, col].set_title(f"input {datamodule.label(level)}", fontsize=8)
            axes[1, col].imshow(restored[col].permute(1, 2, 0).numpy())
            axes[1, col].set_title("restored", fontsize=8)
        for axis in axes.flat:
            axis.set_xticks([])
            axis.set_yticks([])
        figure.suptitle(f"{title}: {datamodule.task}", fontsize=10)
        return figure

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or trainer.fast_dev_run:
            return
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "level_example"):
            return
        clean = datamodule.level_example(1)
        if clean is None:
            return
        figure = self.render(pl_module, datamodule, clean, f"step {trainer.global_step}")
        levels = self.levels or datamodule.val_levels
        caption = (f"step {trainer.global_step}, {datamodule.task}: top the held-out crop degraded at "
                   f"{', '.join(datamodule.label(level) for level in levels)}; bottom restored at the same level")
        self.last_path = publish_figure(trainer, figure, self.dirpath, f"step{trainer.global_step:07d}",
                                        key="val/level_picture", caption=caption)
