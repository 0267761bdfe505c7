"""HyperRes LightningModules: the paper's scalar-level model and the 3-D task-vector variant.

``HyperRes`` (docs/method.md section 5) trains on :class:`~cirlab.data.hyperres.LevelDataModule`
batches: each step the hypernetwork generates k main networks, one per training level
(``batch["levels"]``, k x 1 normalised levels); network i restores ``batch["inputs"][i]``, the
batch's clean crops degraded at level i; the loss is the mean of the k L1 losses (the
reference's ``sum_i L1_i / k``). The same module trains a *dedicated* baseline: with
``net`` = :class:`~cirlab.archs.hyperres.MainNet` and one training level (k = 1) it is a plain
network of the same architecture trained at that level.

Validation and test run on the DataModule's deterministic level sets: one item is one image at
every level, restored in one forward pass with per-sample levels (the mixed-level path). PSNR
and SSIM use the paper convention (uint8 rounding, whole image) on the task's channel (RGB for
denoising, BT.601 Y for DeJPEG and SR). ``val/psnr`` averages the validation levels; the test
logs ``test/psnr`` and ``test_grid/psnr/<label>`` per level (labels ``sigma15``, ``q30``,
``x2``) and writes ``test_levels.md``/``.csv`` to the trainer's root directory (the run dir).

``HyperRes3D`` is the variant whose meta blocks take the task vector t in [0, 1]^3: it trains on
the relative-ground-truth blur/noise/JPEG pairs of :class:`~cirlab.data.datamodule.
RestorationDataModule` and is validated and tested on the same 27-point grid as CResMD, so every
behaviour comes from :class:`~cirlab.models.restoration.RestorationModule` (each training
batch mixes task vectors per sample: the network's mixed-level path).

Cost beside quality: both modules add to ``parameter_counts()`` (hence ``metrics.json``) the
GFLOPs of restoring one 1280x720 image, generation included (``model/gflops_hd``, 2 FLOPs per
multiply-add); ``HyperRes3D`` also ``model/gflops_27_hd``, the 27-point workload (27 generated
networks, nothing shared between tasks), the figure TASNet reports as ``search/gflops_27_hd``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from cirlab.models.restoration import PSNR_CAP_DB, RestorationModule
from cirlab.tasks import HD

log = logging.getLogger(__name__)

def _cost_counts(net, tasks: int | None = None) -> dict[str, float]:
    """GFLOPs (2 per multiply-add) of restoring one 1280x720 image, and of the ``tasks``-point workload
    (one generated network and one pass per task; nothing is shared between tasks)."""
    flops = net.flops(*HD, levels=1)
    per_task = flops["main"] + flops["generation"]
    counts = {"model/gflops_hd": per_task / 1e9}
    if tasks:
        counts[f"model/gflops_{tasks}_hd"] = tasks * per_task / 1e9
    return counts


class HyperRes(RestorationModule):
    """See the module docstring.

    Args (beyond ``RestorationModule``'s):
        task: the data's task (``denoise``/``dejpeg``/``sr``), recorded for evaluations.
        train_levels: the data's training levels (physical units), recorded for evaluations
            (a dedicated network is scored at its one level).
        level_scale: c = level / level_scale (255).
    """

    LOGGED_METRICS = ("train_level/l1_*", "val_level/psnr_*", "model/gflops_hd")  # beyond the base's

    #: the network method ``training_step`` runs (what ``callbacks.speed.compile`` compiles)
    training_forward = "forward_levels"

    def __init__(self, net: dict, optimizer: dict, scheduler: dict | None = None, scheduler_interval: str = "step",
                 task: str | None = None, train_levels: list | None = None, level_scale: float = 255.0,
                 test_iqa: bool = False, iqa_weights_dir: str | None = None) -> None:
        super().__init__(net=net, optimizer=optimizer, scheduler=scheduler, scheduler_interval=scheduler_interval,
                         test_iqa=test_iqa, iqa_weights_dir=iqa_weights_dir)
        if not hasattr(self.net, "forward_levels"):
            raise ValueError("model.net must build a cirlab.archs.hyperres.HyperResNet or MainNet")
        if getattr(self.net, "cond_dim", 1) != 1:
            raise ValueError("model=hyperres takes a scalar level (net.cond_dim=1); the task-vector variant is model=hyperres_3d")
        self.save_hyperparameters({"task": task, "train_levels": None if train_levels is None else [float(v) for v in train_levels],
                                   "level_scale": float(level_scale)})
        self.metric_channel = "rgb"
        self.train_labels: list[str] = []
        self.val_labels: list[str] = []

    def parameter_counts(self) -> dict[str, float]:
        return {**super().parameter_counts(), **_cost_counts(self.net)}

    def forward(self, image: torch.Tensor, level) -> torch.Tensor:
        """image (B, 3, H, W) in [0, 1], ``level`` normalised (c = level / level_scale): a number,
        (B,) or (B, 1). Not clamped."""
        return self.net(image, level)

    def example_condition(self) -> torch.Tensor:
        """A scalar level for the model summary's example forward (c = 25 / level_scale)."""
        return torch.full((1,), 25.0 / self.hparams.level_scale)

    def restore(self, image: torch.Tensor, level: float) -> torch.Tensor:
        """Restore at a physical level (e.g. sigma 25): c = level / level_scale."""
        return self.net(image, float(level) / self.hparams.level_scale)

    # ------------------------------------------------------------------ set-up
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "level_task"):
            raise ValueError("model=hyperres needs a level data config (data=hyperres_denoise, hyperres_dejpeg or "
                             "hyperres_sr); for blur/noise/JPEG task vectors use model=hyperres_3d")
        if self.hparams.task and self.hparams.task != datamodule.task:
            log.warning("this model was set up for task %r but the data is %r", self.hparams.task, datamodule.task)
        if abs(datamodule.level_scale - self.hparams.level_scale) > 1e-9:
            raise ValueError(f"data.level_scale={datamodule.level_scale} differs from the model's level_scale="
                             f"{self.hparams.level_scale}")
        self._make_grid_metrics(len(datamodule.val_levels), len(datamodule.test_levels))
        self.metric_channel = datamodule.metric_channel
        self.train_labels = [datamodule.label(v) for v in datamodule.levels]
        self.val_labels = [datamodule.label(v) for v in datamodule.val_levels]
        self.grid_labels = [datamodule.label(v) for v in datamodule.test_levels]
        self.test_level_values = list(datamodule.test_levels)
        # every level is a restoration task: the grid averages take all points
        self.val_levels = self.test_levels = None

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        inputs, target, levels = batch["inputs"], batch["target"], batch["levels"]
        outputs = self.net.forward_levels(inputs, levels)
        losses = (outputs - target.unsqueeze(0)).abs().flatten(1).mean(dim=1)  # one L1 per main network
        loss = losses.mean()
        batch_size = target.shape[0]
        self.log("train/l1", loss, prog_bar=True, batch_size=batch_size)
        for label, value in zip(self.train_labels, losses.detach()):
            self.log(f"train_level/l1_{label}", value, batch_size=batch_size)
        return loss

    # ------------------------------------------------------------------ evaluation
    def _restore_eval(self, batch: dict) -> torch.Tensor:
        with self.float32():
            return self.net(batch["input"], batch["level"]).clamp(0, 1)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        from cirlab.metrics import paper_psnr, paper_ssim

        output = self._restore_eval(batch)
        self.val_psnr.update(paper_psnr(output, batch["target"], self.metric_channel).clamp(max=PSNR_CAP_DB), batch["grid_index"])
        self.val_ssim.update(paper_ssim(output, batch["target"], self.metric_channel), batch["grid_index"])

    def on_validation_epoch_end(self) -> None:
        psnr = self.val_psnr.compute().cpu()
        for label, value in zip(self.val_labels, psnr.tolist()):
            self.log(f"val_level/psnr_{label}", float(value), sync_dist=True)
        super().on_validation_epoch_end()

    def test_step(self, batch: dict, batch_idx: int) -> None:
        from cirlab.metrics import paper_psnr, paper_ssim

        output = self._restore_eval(batch)
        channel = self.metric_channel
        self.test_psnr.update(paper_psnr(output, batch["target"], channel).clamp(max=PSNR_CAP_DB), batch["grid_index"])
        self.test_psnr_input.update(paper_psnr(batch["input"], batch["target"], channel).clamp(max=PSNR_CAP_DB),
                                    batch["grid_index"])
        self.test_ssim.update(paper_ssim(output, batch["target"], channel), batch["grid_index"])
        if self.test_iqa:
            self.test_niqe.update(output)
            self.test_brisque.update(output)

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        if self.trainer is None or not self.trainer.is_global_zero or self.trainer.fast_dev_run:
            return
        from cirlab.reports import write_level_tables

        table = self.per_task_table()
        levels = getattr(self, "test_level_values", None) or list(range(len(table["psnr"])))
        columns = {"psnr": table["psnr"].tolist(), "ssim": table["ssim"].tolist(), "psnr_input": table["psnr_input"].tolist()}
        paths = write_level_tables(Path(self.trainer.default_root_dir), "test_levels", levels, columns,
                                   title=f"{self.hparams.task or 'level'} test ({self.metric_channel.upper()})")
        log.info("per-level test table: %s", paths[0])


class HyperRes3D(RestorationModule):
    """HyperRes with task-vector meta blocks (t in [0, 1]^3); everything else is ``RestorationModule``."""

    LOGGED_METRICS = ("model/gflops_hd", "model/gflops_27_hd")  # beyond the base's

    def __init__(self, net: dict, optimizer: dict, scheduler: dict | None = None, scheduler_interval: str = "step",
                 test_iqa: bool = False, iqa_weights_dir: str | None = None) -> None:
        super().__init__(net=net, optimizer=optimizer, scheduler=scheduler, scheduler_interval=scheduler_interval,
                         test_iqa=test_iqa, iqa_weights_dir=iqa_weights_dir)
        if getattr(self.net, "cond_dim", None) != 3:
            raise ValueError("model=hyperres_3d needs net.cond_dim=3 (a HyperResNet taking blur/noise/JPEG task vectors)")

    def parameter_counts(self) -> dict[str, float]:
        """Parameters, and the cost of CResMD's 27-point workload at 1280x720 (``model/gflops_27_hd``),
        to set beside TASNet's ``search/gflops_27_hd``."""
        return {**super().parameter_counts(), **_cost_counts(self.net, 27)}
