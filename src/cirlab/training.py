"""``cirlab-train``: fit a model on the configured data, then test its best checkpoint.

Steps, in order:
  1. compose and validate the config (typos and out-of-range values fail here);
  2. seed everything; build the DataModule, the model, callbacks, loggers and the Trainer;
  3. log the composed config and the parameter counts;
  4. fit (optionally resuming from ``ckpt_path``, ``last`` = newest last.ckpt of this task; a job
     started again in its own run directory by a cluster launcher resumes from what it left
     there, :func:`requeued_checkpoint`);
  5. test the best checkpoint and write per-task and average tables;
  6. write ``metrics.json`` and return ``optimized_metric`` for sweepers;
  7. always end the W&B run, so each job of a multirun gets its own.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf

from cirlab.config import validate_config
from cirlab.utils.console import route_library_logs
from cirlab.utils.run import (
    claim_run_dir,
    instantiate_callbacks,
    instantiate_loggers,
    instantiate_node,
    job_config,
    metrics_to_floats,
    resolve_ckpt_path,
    write_json_atomically,
)

log = logging.getLogger(__name__)


@dataclass
class TrainingRun:
    """What one training job produced: its final metrics and checkpoint files ("" if none)."""

    metrics: dict[str, float] = field(default_factory=dict)
    best_ckpt: str = ""
    last_ckpt: str = ""
    output_dir: str = ""


def requeued_checkpoint(run_dir: str | Path) -> str | None:
    """The newest checkpoint an earlier start of this same job left in ``run_dir``, when the job
    was started again in place by a cluster; else None.

    [why] Under Hydra's submitit launcher (``SUBMITIT_EXECUTOR`` is set) a SLURM job requeued
    after preemption or at its time limit runs the same pickled job again: same multirun folder
    (Hydra's ``now`` is cached in the pickled config) and job number, so the same run directory,
    which a fresh job never shares (docs/cluster.md). ``SLURM_RESTART_COUNT`` > 0 marks the same
    for a plain ``sbatch`` job with a fixed ``hydra.run.dir``. Candidates: Lightning's
    ``hpc_ckpt_<n>.ckpt`` (saved when the auto-requeue signal arrives) and
    ``checkpoints/last.ckpt`` (``LastCheckpoint``); the newest file wins.
    """
    restarted = bool(os.environ.get("SUBMITIT_EXECUTOR")) or os.environ.get("SLURM_RESTART_COUNT", "0") not in ("", "0")
    if not restarted:
        return None
    folder = Path(run_dir)
    candidates = [*folder.glob("hpc_ckpt_*.ckpt"), folder / "checkpoints" / "last.ckpt"]
    found = [path for path in candidates if path.is_file()]
    return str(max(found, key=lambda path: path.stat().st_mtime)) if found else None


def train(cfg: DictConfig) -> dict[str, float]:
    """Run one training job described by ``cfg``; return its final metrics."""
    return run_training(cfg).metrics


def run_training(cfg: DictConfig) -> TrainingRun:
    """Run one training job described by ``cfg`` (the steps of the module docstring), owning its run
    directory meanwhile (``cirlab.utils.run.claim_run_dir``: a folder a live job owns is refused)."""
    if "pipeline" in cfg:
        raise ValueError("the config sets pipeline.* keys: that experiment is a whole pipeline; run it with "
                         "cirlab-pipeline (`make train experiment=...`)")
    if "optuna" in cfg:
        name = cfg.optuna.get("study_name", "?") if OmegaConf.is_dict(cfg.optuna) else "?"
        raise ValueError(f"the config holds the Optuna study optuna.study_name={name} (an hparams_search=... file "
                         "with an `optuna:` node): cirlab-train runs single jobs and Hydra grids (-m with "
                         "hparams_search=*_grid); run the study with `cirlab-sweep hparams_search=<that file> "
                         "[the same overrides]`")
    validate_config(cfg)
    with claim_run_dir(cfg.paths.output_dir):
        return _run_training(cfg)


def _run_training(cfg: DictConfig) -> TrainingRun:
    requeued = requeued_checkpoint(cfg.paths.output_dir) if cfg.get("resume_requeued", True) else None
    if requeued and cfg.get("train", True):
        log.info("this job was started again in its own run directory: resuming from %s", requeued)
    # a damaged or foreign resume checkpoint fails here, before anything is built
    ckpt_path = resolve_ckpt_path(requeued or cfg.get("ckpt_path"), cfg) if cfg.get("train", True) else None
    route_library_logs()  # Lightning's lines once, through the job's handlers (cirlab.utils.console)
    L.seed_everything(cfg.seed, workers=True)

    log.info("data: %s", cfg.data._target_)
    datamodule = instantiate_node(cfg.data)
    log.info("model: %s", cfg.model._target_)
    model = instantiate_node(cfg.model)
    callbacks = instantiate_callbacks(cfg.get("callbacks"))
    loggers = instantiate_loggers(cfg.get("logger"))
    if not loggers:  # logger=none: callbacks that only feed a logger have nothing to do
        from lightning.pytorch.callbacks import LearningRateMonitor

        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)

    counts = model.parameter_counts() if hasattr(model, "parameter_counts") else {}
    for logger in loggers:
        logger.log_hyperparams({"config": job_config(cfg), **counts})
    log.info("parameters: %s", counts)

    metrics: dict[str, float] = {}
    if cfg.get("train", True):
        trainer.fit(model=model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        metrics.update(metrics_to_floats(trainer.callback_metrics))

    if cfg.get("test", True):
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        if not best:
            log.warning("no best checkpoint was saved: testing the current weights")
        trainer.test(model=model, datamodule=datamodule, ckpt_path=best or None, verbose=False, weights_only=True)
        metrics.update(metrics_to_floats(trainer.callback_metrics))
        average = Path(trainer.default_root_dir) / "test_average.md"
        if trainer.is_global_zero and average.is_file():  # the module wrote its tables where it tested
            log.info("test tables: %s", ", ".join(sorted(str(p) for p in average.parent.glob("test_*.*"))))
            log.info("test averages:\n%s", average.read_text())

    if trainer.is_global_zero:
        metrics.update({k: float(v) for k, v in counts.items()})
        write_json_atomically(Path(cfg.paths.output_dir) / "metrics.json", metrics)
        from cirlab.callbacks.pictures import TaskGridPicture

        # the picture callback's file (LastCheckpoint has a last_path too: that one is the checkpoint)
        picture = next((c.last_path for c in callbacks if isinstance(c, TaskGridPicture)), None)
        log.info("run directory: %s", cfg.paths.output_dir)
        if picture:
            log.info("outputs at several task vectors: %s", picture)
    from cirlab.callbacks.last_checkpoint import LastCheckpoint

    best = getattr(trainer.checkpoint_callback, "best_model_path", "") or ""
    last = next((c.last_path for c in callbacks if isinstance(c, LastCheckpoint)), "")
    return TrainingRun(metrics, best, last, str(cfg.paths.output_dir))
