"""``RestorationModule``: the LightningModule base of every task-vector-conditioned network.

A subclass supplies the network; this base owns the L1 loss, the optimiser and schedule built
from config (a subclass chooses what trains through :meth:`RestorationModule.parameter_groups`),
and the evaluation protocol:

* validation: per-image PSNR/SSIM (torchmetrics convention, outputs clamped to [0, 1]) per grid
  point; ``val/psnr`` and ``val/ssim`` average the restoration tasks (points with some degradation);
* test: the paper convention (uint8 rounding, RGB) per grid point: ``test/psnr``, ``test/ssim``
  (restoration tasks), ``test/psnr_all_points``, optionally ``test/niqe``, ``test/brisque``;
  ``test_grid/<metric>/<label>`` per point in the trainer's ``callback_metrics`` only, and one
  ``wandb.Table`` ``test/per_task`` for W&B; :meth:`per_task_result` gives the same numbers
  structured, for the tables of :mod:`cirlab.reports`.

``net``, ``optimizer`` and ``scheduler`` are plain dicts in Hydra's form (``_target_``;
``_partial_`` for the optimiser and scheduler; the model configs set ``_convert_: all``), kept as
hyper-parameters, so checkpoints load with ``weights_only=True`` and hold no pickled objects
(nor pyiqa's networks).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig

from cirlab.metrics.grouped import GroupedMean

# An exact reconstruction has infinite PSNR; it happens at the clean grid point (t = 0) once
# outputs are rounded to uint8. Per-image PSNR is capped here so grid averages stay finite.
PSNR_CAP_DB = 100.0


def check_plain_config(value: Any, key: str) -> Any:
    """``value`` unchanged if it holds no OmegaConf container (a checkpoint could not store one
    for ``weights_only`` loading); otherwise a ``TypeError`` naming ``key``."""
    if isinstance(value, (DictConfig, ListConfig)):
        raise TypeError(f"{key} is an OmegaConf {type(value).__name__}: instantiate the model config with "
                        "_convert_: all (as conf/model/*.yaml do) or pass plain dicts")
    return value


class RestorationModule(L.LightningModule):
    """Base class: see the module docstring. ``net`` is a config dict with ``_target_``."""

    def __init__(
        self,
        net: dict,
        optimizer: dict,
        scheduler: dict | None = None,
        scheduler_interval: str = "step",
        test_iqa: bool = False,
        iqa_weights_dir: str | None = None,
    ) -> None:
        super().__init__()
        for key, value in (("net", net), ("optimizer", optimizer), ("scheduler", scheduler)):
            check_plain_config(value, f"model.{key}")
        if scheduler_interval not in ("step", "epoch"):
            raise ValueError(f"model.scheduler_interval={scheduler_interval!r} must be 'step' or 'epoch'")
        self.save_hyperparameters({
            "net": net, "optimizer": optimizer, "scheduler": scheduler, "scheduler_interval": scheduler_interval,
            "test_iqa": test_iqa, "iqa_weights_dir": iqa_weights_dir,
        })
        self.net = instantiate(net)
        self._make_grid_metrics(27, 27)
        self.test_iqa = test_iqa
        if test_iqa:
            from cirlab.metrics import BRISQUE, NIQE

            self.test_niqe = NIQE(weights_dir=iqa_weights_dir)
            self.test_brisque = BRISQUE(weights_dir=iqa_weights_dir)

    # ------------------------------------------------------------------------- network
    def forward(self, image: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        """image (B, 3, H, W) in [0, 1], task (B, 3) in [0, 1] -> (B, 3, H, W), not clamped."""
        return self.net(image, task)

    #: side of the example image of Lightning's model summary (its FLOPs column counts one
    #: forward of this size in eval mode; "In sizes" shows it)
    SUMMARY_SIZE = 64

    def example_condition(self) -> Any:
        """The second argument of :meth:`forward` for the summary's example: one mid-range task vector."""
        return torch.full((1, 3), 0.5)

    @property
    def example_input_array(self) -> tuple:
        """What Lightning's model summary runs (eval mode, no grad) to fill its FLOPs and size columns."""
        return torch.zeros(1, 3, self.SUMMARY_SIZE, self.SUMMARY_SIZE), self.example_condition()

    #: Metric keys a run of this class can return (``train()``'s metrics, ``metrics.json``): exact keys,
    #: or ``fnmatch`` patterns where the key carries a grid or level label. A subclass lists only what
    #: it adds; :meth:`logged_metrics` joins them. The sweep driver checks ``optuna.objectives``
    #: against them before the first trial; tests/test_reliability.py checks them against a real run.
    LOGGED_METRICS: tuple[str, ...] = (
        "train/l1", "val/psnr", "val/ssim", "test/psnr", "test/ssim", "test/psnr_all_points",
        "test/niqe", "test/brisque", "test_grid/psnr/*", "test_grid/ssim/*", "test_grid/psnr_input/*",
        "model/params_total", "model/params_trainable",
    )

    @classmethod
    def logged_metrics(cls) -> list[str]:
        """Every key or pattern of :attr:`LOGGED_METRICS` along the class hierarchy, base first."""
        keys: list[str] = []
        for klass in reversed(cls.__mro__):
            keys += [k for k in vars(klass).get("LOGGED_METRICS", ()) if k not in keys]
        return keys

    def parameter_counts(self) -> dict[str, int]:
        total = sum(p.numel() for p in self.net.parameters())
        trainable = sum(p.numel() for p in self.net.parameters() if p.requires_grad)
        return {"model/params_total": total, "model/params_trainable": trainable}

    # ------------------------------------------------------------------------- training
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        output = self(batch["input"], batch["task"])
        loss = F.l1_loss(output, batch["target"])
        self.log("train/l1", loss, prog_bar=True, batch_size=batch["input"].shape[0])
        return loss

    def parameter_groups(self) -> list:
        """What the optimiser trains: parameters or parameter-group dicts (``{"params", "lr", ...}``).
        The default is every parameter of the network; subclasses narrow or split it."""
        return list(self.net.parameters())

    def configure_optimizers(self):
        optimizer = instantiate(self.hparams.optimizer)(params=self.parameter_groups())
        if not self.hparams.scheduler:
            return optimizer
        scheduler = instantiate(self.hparams.scheduler)(optimizer=optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": self.hparams.scheduler_interval}}

    # ------------------------------------------------------------------------- evaluation
    def float32(self):
        """A context that runs the network in float32 whatever ``trainer.precision`` (autocast off):
        evaluation scores must not depend on the training precision (``bf16-mixed`` on GPUs)."""
        return torch.autocast(self.device.type, enabled=False)

    def _restore_eval(self, batch: dict) -> torch.Tensor:
        with self.float32():
            return self(batch["input"], batch["task"]).clamp(0, 1)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        from cirlab.metrics import psnr_per_image, ssim_per_image

        output = self._restore_eval(batch)
        self.val_psnr.update(psnr_per_image(output, batch["target"]).clamp(max=PSNR_CAP_DB), batch["grid_index"])
        self.val_ssim.update(ssim_per_image(output, batch["target"]), batch["grid_index"])

    @staticmethod
    def _task_points(levels: torch.Tensor | None, count: int) -> torch.Tensor:
        """Which grid points are restoration tasks (some degradation); all if none or unknown."""
        if levels is None or len(levels) != count:
            return torch.ones(count, dtype=torch.bool)
        degraded = levels.sum(dim=1) > 0
        return degraded if degraded.any() else torch.ones(count, dtype=torch.bool)

    def on_validation_epoch_end(self) -> None:
        psnr, ssim = self.val_psnr.compute().cpu(), self.val_ssim.compute().cpu()
        tasks = self._task_points(getattr(self, "val_levels", None), len(psnr))
        # the metrics are already reduced over ranks; sync_dist only states it (same value everywhere)
        self.log("val/psnr", psnr[tasks].nanmean().float(), prog_bar=True, sync_dist=True)
        self.log("val/ssim", ssim[tasks].nanmean().float(), sync_dist=True)
        self.val_psnr.reset()
        self.val_ssim.reset()

    def test_step(self, batch: dict, batch_idx: int) -> None:
        from cirlab.metrics import paper_psnr, paper_ssim

        output = self._restore_eval(batch)
        self.test_psnr.update(paper_psnr(output, batch["target"]).clamp(max=PSNR_CAP_DB), batch["grid_index"])
        # the degraded input's own score: what the restoration gains per task
        self.test_psnr_input.update(paper_psnr(batch["input"], batch["target"]).clamp(max=PSNR_CAP_DB), batch["grid_index"])
        self.test_ssim.update(paper_ssim(output, batch["target"]), batch["grid_index"])
        if self.test_iqa:
            self.update_iqa(output, batch["grid_index"])

    def update_iqa(self, output: torch.Tensor, grid_index: torch.Tensor) -> None:
        """NIQE/BRISQUE of the outputs at restoration tasks only: the points ``test/psnr`` averages
        (the clean point, whose output is an identity check, stays out; all points without a grid)."""
        levels = getattr(self, "test_levels", None)
        if levels is not None:
            keep = self._task_points(levels, len(levels)).to(grid_index.device)[grid_index]
            output = output[keep]
        if len(output):
            self.test_niqe.update(output)
            self.test_brisque.update(output)

    def _make_grid_metrics(self, val_points: int, test_points: int) -> None:
        self.val_psnr = GroupedMean(val_points)
        self.val_ssim = GroupedMean(val_points)
        self.test_psnr = GroupedMean(test_points)
        self.test_psnr_input = GroupedMean(test_points)
        self.test_ssim = GroupedMean(test_points)

    def setup(self, stage: str) -> None:
        """Size the per-grid-point metrics from the grids of the evaluation sets the DataModule
        loaded (``eval_levels``); CResMD's 27 points where it has none."""
        from cirlab.tasks import grid_labels, level_grid

        datamodule = getattr(self.trainer, "datamodule", None)
        eval_levels = getattr(datamodule, "eval_levels", lambda stage: None)
        val_levels, test_levels = eval_levels("val"), eval_levels("test")
        val_levels = level_grid("cresmd27") if val_levels is None else val_levels.float().cpu()
        test_levels = level_grid("cresmd27") if test_levels is None else test_levels.float().cpu()
        self._make_grid_metrics(len(val_levels), len(test_levels))
        self.grid_labels = grid_labels(test_levels)
        self.val_levels, self.test_levels = val_levels, test_levels

    def on_test_epoch_end(self) -> None:
        self._last_test_table = {"psnr": self.test_psnr.compute().cpu(), "ssim": self.test_ssim.compute().cpu(),
                                 "psnr_input": self.test_psnr_input.compute().cpu()}
        psnr, ssim = self._last_test_table["psnr"], self._last_test_table["ssim"]
        tasks = self._task_points(getattr(self, "test_levels", None), len(psnr))
        averages = {"test/psnr": psnr[tasks].nanmean().float(), "test/ssim": ssim[tasks].nanmean().float(),
                    "test/psnr_all_points": psnr.nanmean().float()}
        labels = getattr(self, "grid_labels", None) or [f"point{i}" for i in range(len(self._last_test_table["psnr"]))]
        # per point: in callback_metrics (metrics.json), not as G x k logger scalars; loggers get
        # one table (W&B: wandb.Table `test/per_task`; CSV/others: test_per_task.csv is written below)
        for name, values in self._last_test_table.items():
            for label, value in zip(labels, values.tolist()):
                self.log(f"test_grid/{name}/{label}", float(value), sync_dist=True, logger=False)
        if self.test_iqa:
            averages["test/niqe"] = self.test_niqe.compute().float()
            averages["test/brisque"] = self.test_brisque.compute().float()
            self.test_niqe.reset()
            self.test_brisque.reset()
        for key, value in averages.items():
            self.log(key, value, sync_dist=True)
        self.test_psnr.reset()
        self.test_psnr_input.reset()
        self.test_ssim.reset()
        if self._trainer is not None and self.trainer.is_global_zero:
            self.write_test_tables({k: float(v) for k, v in averages.items()})
            from cirlab.utils.wandb import log_per_task_table

            log_per_task_table(self.trainer, self.per_task_result())

    def write_test_tables(self, averages: dict[str, float]) -> list:
        """``test_per_task.md/.csv/.json`` and ``test_average.md`` in the trainer's root directory (the
        run directory), written where the test ran, so a spawned or remote rank 0 leaves them too."""
        from cirlab.reports import write_grid_tables

        root = Path(self.trainer.default_root_dir)
        result = self.per_task_result()
        result.write_json(root / "test_per_task.json")
        return write_grid_tables(result, averages, root, stage="test")

    def per_task_table(self) -> dict[str, torch.Tensor]:
        """Per-grid-point means ``{"psnr", "ssim", "psnr_input"}`` (each (G,)) of the last test run."""
        table = getattr(self, "_last_test_table", None)
        if table is None:
            raise RuntimeError("per_task_table() needs a finished trainer.test() run")
        return table

    def per_task_result(self):
        """The last test run as a :class:`cirlab.reports.PerTaskResult` (labels, values, task vectors)."""
        from cirlab.reports import PerTaskResult

        table = self.per_task_table()
        labels = getattr(self, "grid_labels", None) or [f"point{i}" for i in range(len(table["psnr"]))]
        levels = getattr(self, "test_levels", None)
        levels = levels if levels is not None and len(levels) == len(labels) else None
        return PerTaskResult(labels=list(labels), values={k: v.tolist() for k, v in table.items()}, levels=levels)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["cirlab_module"] = f"{type(self).__module__}.{type(self).__qualname__}"
