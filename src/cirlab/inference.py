"""Restore one image under many task vectors (TASNet Fig. 2b), in tiles and mixed precision if
asked. ``restore(net, image (3, H, W) or (1, 3, H, W) in [0, 1], tasks (M, cond_dim))`` returns
(M, 3, H, W) float32, not clamped, on the image's device; ``net`` is a TASNet, a CResMDNet or a
checkpoint :func:`cirlab.checkpoints.load_network` reads. The command line is ``cirlab-restore``.

* A TASNet runs its shared prefix once per image (per tile) and its task-specific part per group
  of tasks with identical channels (:meth:`TASNet.restore`); a CResMD runs whole once per task,
  ``max_batch`` tasks per pass.
* Tiles: each pass writes a ``tile`` x ``tile`` block and reads ``overlap`` more pixels on every
  side inside the image. The default overlap, the receptive radius ``4 nb + 6`` rounded up to
  even (:func:`cirlab.archs.tasnet_spec.receptive_radius`), makes the tiled output equal the
  untiled one up to float rounding; tile origins and sizes are even, so the stride-2 first conv
  sees the untiled pixel grid.
* ``autocast="bf16"`` / ``"fp16"`` runs under ``torch.autocast`` (channel decisions stay float32).
* ``channels_last`` is the default on CPU (oneDNN runs the thin sliced convs about twice as fast
  in NHWC). Timings should run with ``torch.set_flush_denormal(True)``: denormals from untrained
  or heavily pruned networks slow x86 convolutions by an order of magnitude.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch
from torch import Tensor, nn

from cirlab.archs.common import pad_to_even
from cirlab.archs.tasnet import TASNet
from cirlab.archs.tasnet_spec import receptive_radius
from cirlab.checkpoints import load_network

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


# --------------------------------------------------------------------------- restoring
def _restore_whole(net: nn.Module, image: Tensor, tasks: Tensor, max_batch: int | None) -> Tensor:
    """Untiled: image (1, 3, H, W), tasks (M, 3) -> (M, 3, H, W) on the network's device."""
    if isinstance(net, TASNet):
        return net.restore(image, tasks, max_batch=max_batch)
    count = tasks.shape[0]
    nhwc = image.is_contiguous(memory_format=torch.channels_last) and not image.is_contiguous()

    def batch(size: int) -> Tensor:  # an expanded batch has stride 0: the convs would pick NCHW
        rows = image.expand(size, -1, -1, -1)
        return rows.contiguous(memory_format=torch.channels_last) if nhwc and size > 1 else rows

    outputs = [net(batch(len(chunk)), chunk) for chunk in tasks.split(max_batch or count)]
    return torch.cat(outputs)


def _spans(size: int, tile: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """(read_start, read_stop, keep_start, keep_stop) along one axis of an even ``size``."""
    spans = []
    for start in range(0, size, tile):
        stop = min(start + tile, size)
        spans.append((max(0, start - overlap), min(size, stop + overlap), start, stop))
    return spans


def check_tasks(tasks: Tensor, cond_dim: int | None = None, key: str = "tasks") -> Tensor:
    """``tasks`` as an (M, cond_dim) float tensor, or ``ValueError`` naming ``key``: every value finite
    and in [0, 1] (NaN passes ``< 0`` and ``> 1`` tests, so it is checked on its own), M >= 1."""
    tasks = torch.as_tensor(tasks, dtype=torch.float32)
    if tasks.ndim == 1:
        tasks = tasks[None]
    if tasks.ndim != 2 or tasks.shape[0] < 1 or (cond_dim is not None and tasks.shape[1] != cond_dim):
        expected = f"(M, {cond_dim})" if cond_dim is not None else "(M, D)"
        raise ValueError(f"{key}: expected task vectors of shape {expected}, got {tuple(tasks.shape)}")
    bad = ~torch.isfinite(tasks) | (tasks < 0) | (tasks > 1)
    if bad.any():
        row = int(bad.any(dim=1).nonzero()[0])
        raise ValueError(f"{key}: task vector {row} = {tasks[row].tolist()} has a value outside [0, 1] (or not a number)")
    return tasks


def check_restore_options(tile: int | None = None, overlap: int | None = None, max_batch: int | None = None,
                          prefix: str = "") -> None:
    """``ValueError`` naming the option (``prefix`` + name, e.g. ``--max-batch``) of a bad tiling or
    batching value: ``tile`` >= 2, ``overlap`` >= 0, ``max_batch`` >= 1 (None: the default)."""
    for name, value, low in (("tile", tile, 2), ("overlap", overlap, 0), ("max-batch" if prefix else "max_batch",
                                                                         max_batch, 1)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise ValueError(f"{prefix}{name}={value!r} must be an integer >= {low}")


def restore(net: nn.Module | str | Path, image: Tensor, tasks: Tensor, *, tile: int | None = None,
            overlap: int | None = None, autocast: str | None = None, max_batch: int | None = None,
            channels_last: bool | None = None) -> Tensor:
    """Restore one image under M task vectors.

    Args:
        net: a TASNet or CResMDNet (or anything :func:`load_network` takes).
        image: (3, H, W) or (1, 3, H, W), values in [0, 1], any device (tiles move to the
            network's device; the result comes back to the image's device).
        tasks: (M, cond_dim) task vectors.
        tile: side of the output block per pass (rounded up to even); None: one pass.
        overlap: context read around each block (default: the receptive radius; module doc).
        autocast: None, "bf16" or "fp16".
        max_batch: at most this many tasks per batched pass (memory bound).
        channels_last: run in NHWC memory format (default: on CPU, and on GPU under autocast).
            On CPU, oneDNN runs NHWC convolutions of few channels about twice as fast as NCHW
            ones, which is what the sliced task-specific layers are.

    Returns:
        (M, 3, H, W) float32, not clamped.
    """
    net = load_network(net)
    image = image[None] if image.ndim == 3 else image
    if image.ndim != 4 or image.shape[0] != 1:
        raise ValueError(f"restore() takes one image (3, H, W) or (1, 3, H, W), got {tuple(image.shape)}")
    check_restore_options(tile, overlap, max_batch)
    tasks = check_tasks(tasks, getattr(net, "cond_dim", None))
    device = next(net.parameters()).device
    tasks = tasks.to(device=device, dtype=torch.float32)
    height, width = image.shape[-2:]
    dtype = None
    if autocast is not None:
        if autocast not in AUTOCAST_DTYPES:
            raise ValueError(f"autocast={autocast!r}: use one of {sorted(AUTOCAST_DTYPES)} or None")
        dtype = AUTOCAST_DTYPES[autocast]

    if channels_last is None:
        channels_last = device.type == "cpu" or dtype is not None
    layout = torch.channels_last if channels_last else torch.contiguous_format

    def run(part: Tensor) -> Tensor:
        part = part.to(device=device, dtype=torch.float32).contiguous(memory_format=layout)
        if part.stride(0) != part[0].numel():  # e.g. an HWC array permuted to (3, H, W), then [None]: the
            part = part.clone(memory_format=layout)  # batch stride would make the convs pick NCHW
        context = torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else nullcontext()
        with context:
            return _restore_whole(net, part, tasks, max_batch).float()

    # no_grad, not inference_mode: the network caches index tensors that training may reuse
    with torch.no_grad():
        if tile is None or (tile >= height and tile >= width):
            return run(image).to(image.device).contiguous()
        if tile < 2:
            raise ValueError(f"tile={tile} must be >= 2")
        tile = tile + tile % 2
        if overlap is None:
            overlap = receptive_radius(net.nb)
        if overlap < 0:
            raise ValueError(f"overlap={overlap} must be >= 0")
        overlap = overlap + overlap % 2
        padded = pad_to_even(image)
        out = torch.empty(tasks.shape[0], image.shape[1], *padded.shape[-2:], device=image.device)
        for r0, r1, k0, k1 in _spans(padded.shape[-2], tile, overlap):
            for c0, c1, j0, j1 in _spans(padded.shape[-1], tile, overlap):
                result = run(padded[..., r0:r1, c0:c1])
                out[..., k0:k1, j0:j1] = result[..., k0 - r0 : k1 - r0, j0 - c0 : j1 - c0].to(image.device)
        return out[..., :height, :width]


def restore_flops(net: nn.Module, tasks: Tensor, height: int, width: int) -> int:
    """Analytic convolution FLOPs of an untiled :func:`restore` (TASNet: :meth:`TASNet.flops`;
    CResMD: M full inferences)."""
    from cirlab.archs.flops import cresmd_flops

    net = load_network(net)
    if isinstance(net, TASNet):
        return net.flops(tasks, height, width)
    return cresmd_flops(net.nf, net.nb, height, width, tasks=tasks.shape[0], in_channels=net.in_nc, out_channels=net.out_nc)
