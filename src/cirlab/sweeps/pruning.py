"""Pruning: the Lightning callback that reports to the Optuna trial this process is training.

The trial is module-level state of this module, set only around ``train`` by the driver
(:func:`trial_in_progress`). Elsewhere (spawned DDP workers, a plain ``cirlab-train`` run) there
is no trial and :class:`OptunaPruning` does nothing, so pruning needs single-process trainers or
``ddp_spawn``, not the subprocess-launching ``ddp`` strategy.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import lightning as L
import optuna

_ACTIVE_TRIAL: optuna.Trial | None = None  # the trial this process is training, for OptunaPruning


@contextmanager
def trial_in_progress(trial: optuna.Trial) -> Iterator[optuna.Trial]:
    """Make ``trial`` the one :class:`OptunaPruning` reports to, until the block ends."""
    global _ACTIVE_TRIAL
    _ACTIVE_TRIAL = trial
    try:
        yield trial
    finally:
        _ACTIVE_TRIAL = None


def active_trial() -> optuna.Trial | None:
    """The trial this process is training, or None outside :func:`trial_in_progress`."""
    return _ACTIVE_TRIAL


class OptunaPruning(L.Callback):
    """Report ``monitor`` to the running Optuna trial after each validation; prune when told.

    The driver adds it to ``callbacks`` only for single-objective studies with a pruner. Raises
    ``optuna.TrialPruned`` (the trial ends PRUNED) when the trial's pruner says so.
    """

    def __init__(self, monitor: str) -> None:
        self.monitor = monitor

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trial = active_trial()
        if trial is None or trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            return
        step = int(trainer.global_step)
        trial.report(float(value), step=step)
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {step}: {self.monitor}={float(value):.6g}")
