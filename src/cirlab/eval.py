"""``cirlab-eval ckpt_path=...``: score a checkpoint on the test grid and write its tables.

Default data: CBSD68 under ``paths.data_dir`` with CResMD's 27-point grid (``data=cbsd68``);
any data config with a ``test_dir`` works (``data=embedded`` for the bundled photos). Writes
``test_per_task.md/.csv``, ``test_average.md`` and ``metrics.json`` to the run directory.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

import hydra
import lightning as L
import torch
from omegaconf import DictConfig

from cirlab.config import CONFIG_DIR, register_configs, validate_config
from cirlab.utils.run import instantiate_loggers, metrics_to_floats, write_json_atomically
from cirlab.utils.wandb import finish_wandb

log = logging.getLogger(__name__)


def load_module(ckpt_path: str | Path, **overrides) -> L.LightningModule:
    """Load any cirlab LightningModule checkpoint (its class is recorded in the file)."""
    ckpt_path = Path(ckpt_path)
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"ckpt_path={str(ckpt_path)!r}: no such checkpoint file")
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    qualified = checkpoint.get("cirlab_module")
    if not qualified:
        raise ValueError(f"ckpt_path={str(ckpt_path)!r} was not written by a cirlab module (no 'cirlab_module' entry)")
    module_name, _, class_name = qualified.rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls.load_from_checkpoint(ckpt_path, map_location="cpu", weights_only=True, **overrides)


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
        from cirlab.evaluation import write_grid_tables

        out_dir = Path(cfg.paths.output_dir)
        paths = write_grid_tables(metrics, out_dir, stage="test")
        write_json_atomically(out_dir / "metrics.json", {"ckpt_path": str(cfg.ckpt_path), **metrics})
        log.info("tables: %s", ", ".join(str(p) for p in paths))
        if paths:
            log.info("test averages:\n%s", paths[-1].read_text())
    return metrics


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
def main(cfg: DictConfig) -> None:
    try:
        evaluate(cfg)
    finally:
        finish_wandb()


register_configs()

if __name__ == "__main__":
    main()
