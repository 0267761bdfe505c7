"""Progress: Lightning's Rich bar on a terminal, plain periodic log lines everywhere else.

A bar redraws itself with carriage returns and cursor codes; written to a file (``> run.log``, a
SLURM ``.out``, a pipeline stage's log) that is one line of many kilobytes. When standard output is
not a terminal, :class:`PlainProgress` logs instead, through the ``cirlab.progress`` logger (so
into the job's ``.log`` as well), one line every ``every_n_steps`` training steps and one per
validation and test, e.g.::

    train: epoch 0, step 300/1000 (30%), 4.12 step/s, eta 0:02:49, train/l1=0.0412 val/psnr=27.31

:func:`progress_bar` (``conf/callbacks/default.yaml``) picks one of the two, and
:func:`model_summary` the summary table to match.
"""

from __future__ import annotations

import datetime
import logging
import math
import sys
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar

log = logging.getLogger("cirlab.progress")


def progress_bar(refresh_rate: int = 1, every_n_steps: int = 50, terminal: bool | None = None) -> ProgressBar:
    """Rich bar if ``terminal`` (default: ``sys.stdout.isatty()``), else :class:`PlainProgress`.

    Args:
        refresh_rate: redraw the Rich bar every N batches; 0 turns either kind off.
        every_n_steps: training steps between two plain lines.
        terminal: force one kind (tests, notebooks).
    """
    if refresh_rate < 0 or every_n_steps < 1:
        raise ValueError(f"callbacks.progress_bar: refresh_rate={refresh_rate} must be >= 0 and "
                         f"every_n_steps={every_n_steps} >= 1")
    terminal = sys.stdout.isatty() if terminal is None else terminal
    if terminal:
        return RichProgressBar(refresh_rate=refresh_rate, leave=True)
    bar = PlainProgress(every_n_steps=every_n_steps)
    if refresh_rate == 0:
        bar.disable()
    return bar


def model_summary(max_depth: int = 1, terminal: bool | None = None):
    """Lightning's model summary: the Rich table on a terminal, the plain text table (logged, so in
    the job's ``.log`` too, never wrapped at 80 columns) otherwise. Lightning would pick the Rich
    one whenever rich is installed. Its FLOPs column counts one forward of the module's
    ``example_input_array`` (``RestorationModule``: a 64 x 64 image)."""
    from lightning.pytorch.callbacks import ModelSummary, RichModelSummary

    terminal = sys.stdout.isatty() if terminal is None else terminal
    return RichModelSummary(max_depth=max_depth) if terminal else ModelSummary(max_depth=max_depth)


def _format_value(value: Any) -> str:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class PlainProgress(ProgressBar):
    """Plain progress lines through ``logging``: no carriage returns, no escape codes.

    Lines: every ``every_n_steps`` optimiser steps and at the last one (step, total, rate, ETA and
    the progress-bar metrics), after each validation (its metrics) and after a test (batches and
    time). Only rank 0 writes (Lightning disables progress bars on the other ranks).
    """

    def __init__(self, every_n_steps: int = 50) -> None:
        super().__init__()
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps={every_n_steps} must be >= 1")
        self.every_n_steps = every_n_steps
        self._enabled = True
        self._started: float | None = None
        self._start_step = 0
        self._last_logged_step = -1
        self._test_started: float | None = None

    # ProgressBar's interface
    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def print(self, *args: Any, **kwargs: Any) -> None:
        if self._enabled:
            print(*args, **kwargs)

    # ------------------------------------------------------------------ helpers
    def _metrics(self, trainer: L.Trainer, pl_module: L.LightningModule, prefix: str | None = None) -> str:
        items = self.get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return " ".join(f"{key}={_format_value(value)}" for key, value in items.items()
                        if prefix is None or str(key).startswith(prefix))

    @staticmethod
    def _total_steps(trainer: L.Trainer) -> int | None:
        try:
            total = trainer.estimated_stepping_batches
        except Exception:  # noqa: BLE001  (no length known before the loaders exist)
            return None
        return int(total) if total is not None and math.isfinite(total) else None

    # ------------------------------------------------------------------ training
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started = time.perf_counter()
        self._start_step = trainer.global_step
        self._last_logged_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if not self._enabled or step == self._last_logged_step:
            return
        total = self._total_steps(trainer)
        if step % self.every_n_steps and step != total:
            return
        self._last_logged_step = step
        elapsed = time.perf_counter() - (self._started or time.perf_counter())
        rate = (step - self._start_step) / elapsed if elapsed > 0 else float("nan")
        parts = [f"train: epoch {trainer.current_epoch}", f"step {step}" + (f"/{total} ({100 * step / total:.0f}%)" if total else "")]
        if math.isfinite(rate) and rate > 0:
            parts.append(f"{rate:.3g} step/s")
            if total and total > step:
                parts.append(f"eta {datetime.timedelta(seconds=round((total - step) / rate))}")
        metrics = self._metrics(trainer, pl_module)
        log.info(", ".join(parts) + (f", {metrics}" if metrics else ""))

    # ------------------------------------------------------------------ evaluation
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._enabled or trainer.sanity_checking:
            return
        metrics = self._metrics(trainer, pl_module, prefix="val/")
        log.info("validation at step %d: %s", trainer.global_step, metrics or "done")

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._test_started = time.perf_counter()

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._enabled:
            return
        batches = sum(int(n) for n in trainer.num_test_batches) if trainer.num_test_batches else 0
        seconds = time.perf_counter() - (self._test_started or time.perf_counter())
        log.info("test: %d batches in %.1f s", batches, seconds)
