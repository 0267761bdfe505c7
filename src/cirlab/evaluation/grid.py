"""``cirlab-eval ckpt_path=...``: score a checkpoint on the test grid and write its tables.

Default data: CBSD68 under ``paths.data_dir`` with CResMD's 27-point grid (``data=cbsd68``);
any data config with a ``test_dir`` works (``data=embedded`` for the bundled photos). Writes
``test_per_task.md/.csv``, ``test_average.md`` and ``metrics.json`` to the run directory.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import lightning as L
from omegaconf import DictConfig

from cirlab.checkpoints import load_module
from cirlab.config import validate_config
from cirlab.utils.run import instantiate_loggers, metrics_to_floats, write_json_atomically

log = logging.getLogger(__name__)


def evaluate(cfg: DictConfig) -> dict[str, float]:
    validate_config(cfg)
    L.seed_everything(cfg.seed, workers=True)
    model = load_module(cfg.ckpt_path, test_iqa=bool(cfg.get("iqa", False)))
    datamodule = hydra.utils.instantiate(cfg.data)
    loggers = instantiate_loggers(cfg.get("logger"))
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, logger=loggers or False, callbacks=[],
                                                 enable_checkpointing=False)
    trainer.test(model=model, datamodule=datamodule, verbose=False)
    metrics = metrics_to_floats(trainer.callback_metrics)
    if trainer.is_global_zero:
        from cirlab.reports import write_grid_tables

        out_dir = Path(cfg.paths.output_dir)
        paths = write_grid_tables(metrics, out_dir, stage="test")
        write_json_atomically(out_dir / "metrics.json", {"ckpt_path": str(cfg.ckpt_path), **metrics})
        log.info("tables: %s", ", ".join(str(p) for p in paths))
        if paths:
            log.info("test averages:\n%s", paths[-1].read_text())
    return metrics
