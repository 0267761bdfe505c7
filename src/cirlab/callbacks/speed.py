"""``TrainingSpeed``: the speed options of the training step (channels_last, ``torch.compile``), for every module.

Mixed precision is not here: it is Lightning's ``trainer.precision`` (``bf16-mixed`` in
``conf/trainer/gpu.yaml``; ``32-true`` for float32). Evaluation (validation and test) runs in
float32 whatever the precision (``RestorationModule._restore_eval``), so the tables do not depend
on it.

What this callback does, before the optimiser is built (``setup``):

* ``channels_last`` (``"auto"``: on when the trainer runs on CUDA, where cuDNN's NHWC kernels
  take bf16 tensor cores; ``true``/``false`` force it): the module's 4-D parameters and buffers
  are stored channels-last, and each training batch's image tensors are made channels-last
  (``on_train_batch_start``; a 5-D ``(k, B, C, H, W)`` stack, HyperRes's k inputs, is made
  channels-last per image). The values are unchanged: only the memory layout differs
  (``tests/test_speed.py`` checks every network's outputs with and without it).
* ``compile`` (default off: compiling costs minutes before the first step): the network's
  training forward is compiled with ``torch.compile`` in place. Which method is the training
  forward is the module's ``training_forward`` attribute (``"forward"`` by default;
  ``"search_forward"`` for the TASNet search, ``"forward_levels"`` for HyperRes). ``forward`` is
  compiled with ``nn.Module.compile`` (parameter names, hence checkpoints, unchanged); another
  method is replaced on the instance by its compiled version. Data-dependent Python branches
  (the search's shared prefix from phi, HyperRes's one-level test) break the graph there; dynamo
  guards on the branch taken and recompiles when it changes.
* ``float32_matmul_precision``: passed to ``torch.set_float32_matmul_precision`` (``"high"``
  lets float32 matmuls and convolutions use TF32 on NVIDIA GPUs); ``null`` leaves torch's setting.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)

CHANNELS_LAST_CHOICES = ("auto", True, False)
MATMUL_PRECISIONS = ("highest", "high", "medium")


def to_channels_last(value: Any) -> Any:
    """A 4-D floating tensor as channels-last; a 5-D one (a stack of image batches) channels-last
    per image (its last three dims stored H, W, C); anything else unchanged. Values are equal."""
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        return value
    if value.ndim == 4:
        return value.contiguous(memory_format=torch.channels_last)
    if value.ndim == 5:
        return value.movedim(2, -1).contiguous().movedim(-1, 2)
    return value


def batch_to_channels_last(batch: Any) -> Any:
    """``to_channels_last`` on every value of a dict batch, in place (Lightning passes the same dict
    to ``training_step``); other batches are returned unchanged."""
    if isinstance(batch, dict):
        for key, value in batch.items():
            batch[key] = to_channels_last(value)
    return batch


def compile_training_forward(module: L.LightningModule, **options) -> str:
    """Compile ``module.net``'s training forward in place (see the module docstring); returns the
    method's name."""
    net = getattr(module, "net", None)
    if not isinstance(net, torch.nn.Module):
        raise ValueError(f"callbacks.speed.compile: {type(module).__name__} has no network at .net to compile")
    method = getattr(module, "training_forward", "forward")
    if method == "forward":
        net.compile(**options)
    else:
        if not callable(getattr(net, method, None)):
            raise ValueError(f"callbacks.speed.compile: {type(net).__name__} has no method {method!r} "
                             f"({type(module).__name__}.training_forward)")
        setattr(net, method, torch.compile(getattr(net, method), **options))
    return method


class TrainingSpeed(Callback):
    """channels_last, ``torch.compile`` and the float32 matmul precision of a training run.

    Args:
        channels_last: ``"auto"`` (on CUDA only), ``True`` or ``False``.
        compile: compile the network's training forward (``torch.compile``).
        compile_mode: ``torch.compile``'s ``mode`` (``None``: default; ``"max-autotune"`` ...).
        compile_dynamic: ``torch.compile``'s ``dynamic`` (``None``: torch decides).
        float32_matmul_precision: ``None`` (leave), ``"highest"``, ``"high"`` (TF32) or ``"medium"``.
    """

    def __init__(self, channels_last: str | bool = "auto", compile: bool = False, compile_mode: str | None = None,
                 compile_dynamic: bool | None = None, float32_matmul_precision: str | None = None) -> None:
        if channels_last not in CHANNELS_LAST_CHOICES:
            raise ValueError(f"callbacks.speed.channels_last={channels_last!r} must be 'auto', true or false")
        if not isinstance(compile, bool):
            raise ValueError(f"callbacks.speed.compile={compile!r} must be true or false")
        if float32_matmul_precision not in (None, *MATMUL_PRECISIONS):
            raise ValueError(f"callbacks.speed.float32_matmul_precision={float32_matmul_precision!r} must be null "
                             f"or one of {', '.join(MATMUL_PRECISIONS)}")
        self.channels_last_option = channels_last
        self.compile = compile
        self.compile_options = {k: v for k, v in (("mode", compile_mode), ("dynamic", compile_dynamic))
                                if v is not None}
        self.float32_matmul_precision = float32_matmul_precision
        self.channels_last = False  # decided in setup, from the trainer's accelerator
        self.compiled: str | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        on_cuda = trainer.strategy.root_device.type == "cuda"
        self.channels_last = on_cuda if self.channels_last_option == "auto" else bool(self.channels_last_option)
        if self.float32_matmul_precision is not None:
            torch.set_float32_matmul_precision(self.float32_matmul_precision)
        if self.channels_last:
            pl_module.to(memory_format=torch.channels_last)
        if self.compile and self.compiled is None:
            self.compiled = compile_training_forward(pl_module, **self.compile_options)
        log.info("training speed: precision %s, channels_last %s, compiled %s", trainer.precision,
                 self.channels_last, self.compiled or "nothing")

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.channels_last:
            batch_to_channels_last(batch)
