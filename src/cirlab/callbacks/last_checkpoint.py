"""``LastCheckpoint``: keep ``last.ckpt`` the newest training state (what resuming reads)."""

from __future__ import annotations

from pathlib import Path

import lightning as L


class LastCheckpoint(L.Callback):
    """Keep ``<dirpath>/last.ckpt`` the newest training state: after every validation during
    fitting, every ``every_n_train_steps`` optimiser steps (preemptible jobs) and when fitting
    ends. Resuming (``ckpt_path=last``) and the pipeline's "end of the search" read it.

    [why] Lightning 2.6's ``ModelCheckpoint(save_last=True)`` rewrites ``last.ckpt`` only in a
    step where a top-k checkpoint was saved too: once the monitored metric stops improving (as
    ``val/psnr`` does while a search prunes), ``last.ckpt`` stays at the best step. So the
    monitored callback keeps the best checkpoint and this one the last. Written through a
    temporary file, so an interruption never leaves a half-written ``last.ckpt``.
    """

    FILENAME = "last.ckpt"

    def __init__(self, dirpath: str | Path, every_n_train_steps: int | None = None) -> None:
        if every_n_train_steps is not None and every_n_train_steps < 1:
            raise ValueError(f"callbacks.last_checkpoint.every_n_train_steps={every_n_train_steps} must be >= 1 or null")
        self.dirpath = Path(dirpath)
        self.every_n_train_steps = every_n_train_steps
        self.last_path = ""
        self._saved_step: int | None = None

    def _save(self, trainer: L.Trainer) -> None:
        if trainer.sanity_checking or trainer.fast_dev_run or self._saved_step == trainer.global_step:
            return
        path = self.dirpath / self.FILENAME
        temporary = path.with_name(f".{path.name}.tmp")
        if trainer.is_global_zero:
            self.dirpath.mkdir(parents=True, exist_ok=True)
        # weights_only=False: the full resumable state (optimiser, loops); saying so also keeps Lightning
        # from logging "`weights_only` was not set" at every save
        trainer.save_checkpoint(temporary, weights_only=False)  # collective under DDP: every rank calls it, rank 0 writes
        if trainer.is_global_zero:
            temporary.replace(path)
        trainer.strategy.barrier("LastCheckpoint")
        self._saved_step = trainer.global_step
        self.last_path = str(path)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        if self.every_n_train_steps and trainer.global_step % self.every_n_train_steps == 0:
            self._save(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit":
            self._save(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer)
