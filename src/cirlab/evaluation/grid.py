"""Score a module checkpoint on a task-vector grid (``conf/eval.yaml``; ``cirlab-eval``).

The data config's test set (default: CBSD68 at CResMD's 27 points; any config with a
``test_dir``) runs through ``trainer.test``; :func:`evaluate` writes ``test_per_task.md/.csv``,
``test_average.md`` and ``metrics.json`` to ``paths.output_dir`` (rank 0) and returns the
averages and the structured per-task result.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import hydra
import lightning as L
from omegaconf import DictConfig

from cirlab.checkpoints import load_module
from cirlab.config import validate_config
from cirlab.reports import PerTaskResult
from cirlab.utils.run import instantiate_loggers, metrics_to_floats, write_json_atomically

log = logging.getLogger(__name__)


@dataclass
class GridEvaluation:
    """``metrics``: every logged value (``test/psnr``, ``test_grid/...``); ``per_task``: the grid's
    table (on global rank 0; None on the other ranks)."""

    metrics: dict[str, float]
    per_task: PerTaskResult | None


def evaluate(cfg: DictConfig) -> GridEvaluation:
    """Test ``cfg.ckpt_path`` on ``cfg.data``'s test set; see the module docstring."""
    validate_config(cfg)
    L.seed_everything(cfg.seed, workers=True)
    model = load_module(cfg.ckpt_path, test_iqa=bool(cfg.get("iqa", False)))
    datamodule = hydra.utils.instantiate(cfg.data)
    loggers = instantiate_loggers(cfg.get("logger"))
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, logger=loggers or False, callbacks=[],
                                                 enable_checkpointing=False)
    trainer.test(model=model, datamodule=datamodule, verbose=False)
    metrics = metrics_to_floats(trainer.callback_metrics)
    out_dir = Path(trainer.default_root_dir)
    per_task = None
    if trainer.is_global_zero:  # the module's rank 0 wrote the tables where it tested
        per_task = PerTaskResult.read_json(out_dir / "test_per_task.json")
        write_json_atomically(out_dir / "metrics.json", {"ckpt_path": str(cfg.ckpt_path), **metrics})
        log.info("tables: %s", ", ".join(str(p) for p in sorted(out_dir.glob("test_*.*"))))
        log.info("test averages:\n%s", (out_dir / "test_average.md").read_text())
    return GridEvaluation(metrics, per_task)
