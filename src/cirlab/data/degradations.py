"""Batched synthetic degradations: Gaussian blur -> Gaussian noise (+ uint8 rounding) -> JPEG.

This is CResMD's reference pipeline (docs/method.md section 1, [fact] items), applied to a batch
with one level per sample, on whatever device the batch lives on (CPU or CUDA); the JPEG step
always runs on the CPU (below), so the output does not depend on the device.

Conventions used throughout the module
--------------------------------------
Images
    ``(B, 3, H, W)`` floating tensors with values in ``[0, 1]`` (RGB). Outputs of
    :func:`degrade` are multiples of ``1/255`` (uint8 levels ``k/255``), same dtype and device
    as the input.
Levels
    physical ``(r, sigma, q)`` or task vectors ``t``, as defined in :mod:`cirlab.tasks`.

Pipeline (:func:`degrade`)
    1. blur ``x <- G_r * x`` (skipped for samples with ``r = 0``);
    2. noise ``x <- x + sigma / 255 * n`` with ``n`` a standard-normal field, then **always**
       ``x <- clip(round(255 x), 0, 255)`` (uint8, the rounding of
       :func:`~cirlab.metrics.conventions.quantize_uint8`), even where ``sigma = 0``;
    3. JPEG encode + decode at quality ``q`` with libjpeg on the CPU (baseline, 4:2:0 chroma,
       TorchCodec's ``JpegEncoder``/``decode_jpeg``; :func:`jpeg_roundtrip`), skipped for samples
       with ``q = NO_JPEG``. A CUDA batch goes through pinned host memory for this step and comes
       back to its device; nvJPEG is not used (its encoder is fixed to 4:4:4 chroma).

Blur implementation choice
    On CPU the separable 21-tap filter is applied as two batched matrix products with banded
    per-sample matrices whose edge columns fold in the replicate padding (mathematically the
    same operation as a replicate-padded separable convolution; about 10x faster than a
    depthwise convolution for 64x64 crops on CPU). On CUDA, and for very large images, the
    filtering is done by :func:`kornia.filters.filter2d_separable` with per-sample kernels.
    A third backend, ``"blocks"``, splits each banded product into blocks of 16 output
    rows/columns that read only the 36 input pixels their band covers (the same matrix entries,
    about half the multiply-adds of the full band at 99 px); the training pairs use it on CPU
    (:func:`cirlab.data.sampling.make_pairs`). All backends are selectable (``backend=``) and the
    tests check they agree to float rounding.

Patches of margin crops (:func:`degrade_patches`)
    Training degrades a margin crop and keeps one patch of it. :func:`degrade_patches` returns
    exactly ``cut_patches(degrade(...), offsets, P)`` but JPEG-compresses only the 16x16 blocks
    (MCUs) the patch depends on (:func:`jpeg_window`), a third to a half of the crop's blocks.
"""

from __future__ import annotations

import functools
import math
import operator
import os
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor
from torch.utils.data import get_worker_info

from cirlab.metrics.conventions import quantize_uint8
from cirlab.tasks import (
    BLUR_RADIUS_MAX,
    JPEG_QUALITY_MAX,
    JPEG_QUALITY_MIN,
    NO_JPEG,
    NOISE_SIGMA_MAX,
    first_bad,
    task_to_physical,
    validate_task_levels,
)

__all__ = [
    "KERNEL_SIZE",
    "add_gaussian_noise",
    "degrade",
    "degrade_patches",
    "gaussian_blur",
    "gaussian_kernel1d",
    "jpeg_codec",
    "jpeg_roundtrip",
    "jpeg_roundtrip_patches",
    "jpeg_window",
]

#: Side of the square Gaussian blur kernel, in pixels.
KERNEL_SIZE: int = 21
# Tolerance for range checks on float levels (absorbs float round-off of grid arithmetic).
_EPS = 1e-5
# Above this image side the banded-matrix blur costs too much memory; use convolution.
_MATMUL_MAX_SIDE = 2048
# Elements (about 512 KiB of float32) per chunk of images that blur output, noise and rounding
# go through together on CPU (see _blur_noise_quantize).
_CHUNK_ELEMENTS = 1 << 17
_BLUR_BACKENDS = ("auto", "matmul", "blocks", "kornia")
# Output rows/columns per band product of the "blocks" blur backend. 16 was the fastest of
# 16/20/25/33/50/99 for 99x99 crops on a 2-core EPYC (1 thread, CPU time).
_BLUR_BLOCK = 16
# Side of libjpeg's minimum coded unit with 4:2:0 chroma (two 8x8 luma blocks per side); the
# JPEG grid period of cirlab.data.loading.JPEG_GRID.
_JPEG_MCU = 16
# Pixels around a window whose chroma a 4:2:0 decode reads: libjpeg's "fancy" upsampling mixes
# each chroma sample (2x2 pixels) with its neighbour, so a pixel depends on chroma samples
# covering pixels up to 2 rows/columns away.
_JPEG_CHROMA_REACH = 2


# --------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------


def _check_images(
    images: Tensor, name: str = "clean", check_range: bool = True
) -> None:
    if not isinstance(images, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(
            f"{name} must have shape (B, 3, H, W), got {tuple(images.shape)}"
        )
    if not images.is_floating_point():
        raise ValueError(
            f"{name} must be a floating tensor in [0, 1], got dtype {images.dtype}"
        )
    if images.shape[0] == 0 or images.shape[2] == 0 or images.shape[3] == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(images.shape)}")
    if check_range:
        lo, hi = torch.aminmax(images)
        lo_v, hi_v = float(lo), float(hi)
        if not (lo_v >= 0.0 and hi_v <= 1.0):  # also catches NaN
            raise ValueError(
                f"{name} values must lie in [0, 1], got min {lo_v}, max {hi_v}"
            )


def _per_sample(
    values: Tensor | Sequence[float] | float, batch: int, name: str, like: Tensor
) -> Tensor:
    """A ``(B,)`` tensor on ``like``'s device from a scalar, sequence or tensor."""
    if not isinstance(values, Tensor):
        values = torch.as_tensor(values, dtype=torch.float64)
    values = values.to(device=like.device)
    if values.ndim == 0:
        values = values.expand(batch)
    if values.shape != (batch,):
        raise ValueError(
            f"{name} must be a scalar or have shape ({batch},), got {tuple(values.shape)}"
        )
    return values


# --------------------------------------------------------------------------------------------
# Task space <-> physical units
# --------------------------------------------------------------------------------------------


def _per_sample_in_range(values, batch: int, name: str, like: Tensor, high: float) -> Tensor:
    """``_per_sample`` plus the range check [0, high] (float round-off allowed), naming the entry."""
    out = _per_sample(values, batch, name, like)
    bad = ~((out >= -_EPS) & (out <= high + _EPS))
    if bool(bad.any()):
        idx, val = first_bad(out, bad)
        raise ValueError(f"{name}[{idx[0]}]={val} must be in [0, {high}]")
    return out


# --------------------------------------------------------------------------------------------
# Blur
# --------------------------------------------------------------------------------------------


def gaussian_kernel1d(
    radius: Tensor, size: int = KERNEL_SIZE, dtype: torch.dtype | None = None
) -> Tensor:
    """Normalised 1-D Gaussian kernels, one per sample.

    Args:
        radius: ``(B,)`` Gaussian standard deviations in pixels, ``>= 0``; ``0`` gives a unit
            impulse (identity filter).
        size: odd kernel length (default 21).
        dtype: output dtype (default: ``radius``' floating dtype, float32 otherwise).

    Returns:
        ``(B, size)`` kernels summing to 1. ``outer(k, k)`` is the 2-D Gaussian normalised to sum
        1 over the ``size x size`` window.
    """
    if size % 2 != 1:
        raise ValueError(f"kernel size={size} must be odd")
    dtype = dtype or (radius.dtype if radius.is_floating_point() else torch.float32)
    work = torch.float64 if radius.device.type in ("cpu", "cuda") else torch.float32
    r = radius.to(work).reshape(-1, 1)
    x = torch.arange(size, device=radius.device, dtype=work) - size // 2
    g = torch.exp(-(x * x) / (2.0 * r.clamp_min(1e-6) ** 2))
    g = torch.where(r > 0, g, (x == 0).to(work).expand_as(g))
    g = g / g.sum(dim=1, keepdim=True)
    # Taps below 1e-20 (far tails of small radii) are set to exactly 0: they are far below any
    # precision that matters, and as float32 denormals they would slow CPU matmuls ~5x.
    return torch.where(g < 1e-20, torch.zeros_like(g), g).to(dtype)


def _banded_matrix(kernel: Tensor, n: int) -> Tensor:
    """``(B, n, n)`` matrices M with ``(M @ v)[i] = sum_k kernel[k] v[clamp(i + k - K//2, 0, n-1)]``."""
    b, k = kernel.shape
    i = torch.arange(n, device=kernel.device).view(n, 1)
    j = (i + torch.arange(k, device=kernel.device).view(1, k) - k // 2).clamp_(0, n - 1)
    m = torch.zeros(b, n, n, device=kernel.device, dtype=kernel.dtype)
    m.scatter_add_(
        2, j.unsqueeze(0).expand(b, n, k), kernel.view(b, 1, k).expand(b, n, k)
    )
    return m


def _blur_matmul(x: Tensor, kernel: Tensor) -> Tensor:
    h, w = x.shape[-2:]
    mw = _banded_matrix(kernel, w).unsqueeze(1)  # (B, 1, W, W)
    mh = mw if h == w else _banded_matrix(kernel, h).unsqueeze(1)
    # Rows: (x @ Mw^T) = (Mw @ x^T)^T; columns: Mh @ rows. Both products keep the broadcast
    # (B, 1, n, n) matrix on the left, which torch runs much faster on CPU than on the right.
    return mh @ (mw @ x.mT).mT


def _bands(n: int, reach: int) -> list[tuple[int, int, int, int]]:
    """``(out_start, out_end, in_start, in_end)`` per block of ``_BLUR_BLOCK`` outputs of an ``n``-long axis."""
    return [(o, min(n, o + _BLUR_BLOCK), max(0, o - reach), min(n, o + _BLUR_BLOCK + reach))
            for o in range(0, n, _BLUR_BLOCK)]


def _blur_blocks(x: Tensor, kernel: Tensor) -> Tensor:
    """:func:`_blur_matmul` with each product cut into blocks of outputs that read only their band.

    Output block ``[o0, o1)`` of a pass is ``x[..., i0:i1] @ M[o0:o1, i0:i1]^T`` with ``[i0, i1)``
    the block grown by the kernel's reach: the matrix entries outside it are zero. Rows of all
    channels go through one batched product per block (channels folded into the rows).
    """
    b, c, h, w = x.shape
    reach = kernel.shape[1] // 2
    mw = _banded_matrix(kernel, w)
    mh = mw if h == w else _banded_matrix(kernel, h)
    rows = x.reshape(b, c * h, w)
    y = torch.cat([torch.bmm(rows[:, :, i0:i1], mw[:, o0:o1, i0:i1].mT) for o0, o1, i0, i1 in _bands(w, reach)],
                  dim=2).view(b, c, h, w)
    mh = mh.unsqueeze(1)  # (B, 1, H, H), broadcast over the channels on the left as in _blur_matmul
    return torch.cat([mh[:, :, o0:o1, i0:i1] @ y[:, :, i0:i1] for o0, o1, i0, i1 in _bands(h, reach)], dim=2)


def _blur_kornia(x: Tensor, kernel: Tensor) -> Tensor:
    import kornia

    return kornia.filters.filter2d_separable(
        x, kernel, kernel, border_type="replicate", normalized=False
    )


def gaussian_blur(
    images: Tensor,
    radius: Tensor | Sequence[float] | float,
    backend: str = "auto",
) -> Tensor:
    """Blur each image with its own 21x21 Gaussian (replicate border).

    Args:
        images: ``(B, C, H, W)`` floating tensor (any range; usually [0, 1]).
        radius: ``(B,)`` (or scalar) Gaussian sigma in pixels, ``[0, 4]``. Samples with
            ``radius == 0`` are returned unchanged and cost nothing.
        backend: ``"matmul"`` (banded-matrix products; fast on CPU), ``"blocks"`` (the same
            products cut into blocks of 16 outputs that skip the band's zeros; faster from
            about 48 px), ``"kornia"`` (:func:`kornia.filters.filter2d_separable`) or
            ``"auto"`` (matmul on CPU when ``max(H, W) <= 2048``, kornia otherwise). The
            backends agree to float rounding, not bit for bit.

    Returns:
        ``(B, C, H, W)`` tensor, same dtype and device; a new tensor unless nothing was blurred.
    """
    if images.ndim != 4 or not images.is_floating_point():
        raise ValueError(
            f"images must be a floating (B, C, H, W) tensor, got {images.dtype} {tuple(images.shape)}"
        )
    r = _per_sample_in_range(radius, images.shape[0], "radius", images, BLUR_RADIUS_MAX)
    idx, blurred = _blur_active(images, r, backend)
    if blurred is None:
        return images
    if idx is None:
        return blurred
    return images.index_copy(0, idx, blurred)


_HELPER: tuple[int, ThreadPoolExecutor] | None = None


def _helper_thread() -> ThreadPoolExecutor:
    """A one-thread executor of this process (a new one after a fork: threads do not survive it)."""
    global _HELPER
    if _HELPER is None or _HELPER[0] != os.getpid():
        _HELPER = (os.getpid(), ThreadPoolExecutor(max_workers=1, thread_name_prefix="cirlab-noise"))
    return _HELPER[1]


class _RepeatedCrops:
    """Stands for ``clean[crop_of]`` (``N`` images made of ``B`` crops) without copying the crops:
    :func:`_blur_active` only reads its ``shape``, ``device``, ``dtype`` and selected rows."""

    def __init__(self, clean: Tensor, crop_of: Tensor) -> None:
        self.clean, self.crop_of = clean, crop_of
        self.shape = (crop_of.numel(), *clean.shape[1:])
        self.device, self.dtype = clean.device, clean.dtype

    def index_select(self, dim: int, idx: Tensor) -> Tensor:
        return self.clean.index_select(0, self.crop_of[idx])

    def materialize(self) -> Tensor:
        return self.clean.index_select(0, self.crop_of)


def _blur_active(images: Tensor, r: Tensor, backend: str) -> tuple[Tensor | None, Tensor | None]:
    """``(idx, blurred)``: the samples with ``r > 0`` (``idx`` None: all of them) and their blur
    (``(None, None)``: none to blur). ``r``: validated ``(B,)`` radii."""
    if backend == "auto":
        use_matmul = (
            images.device.type == "cpu" and max(images.shape[-2:]) <= _MATMUL_MAX_SIDE
        )
        backend = "matmul" if use_matmul else "kornia"
    fns = {"matmul": _blur_matmul, "blocks": _blur_blocks, "kornia": _blur_kornia}
    if backend not in fns:
        raise ValueError(f"backend={backend!r} must be one of {', '.join(map(repr, _BLUR_BACKENDS))}")
    active = r > 0
    n_active = int(active.sum())
    if n_active == 0:
        return None, None
    fn = fns[backend]
    if n_active == images.shape[0]:
        whole = images.materialize() if isinstance(images, _RepeatedCrops) else images
        return None, fn(whole, gaussian_kernel1d(r, dtype=images.dtype))
    idx = active.nonzero().squeeze(1)
    return idx, fn(images.index_select(0, idx), gaussian_kernel1d(r[idx], dtype=images.dtype))


# --------------------------------------------------------------------------------------------
# Noise + quantisation
# --------------------------------------------------------------------------------------------


def add_gaussian_noise(
    images: Tensor,
    sigma: Tensor | Sequence[float] | float,
    noise_field: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """``images + sigma / 255 * n`` (no clipping, no rounding; :func:`degrade` quantises).

    Args:
        images: ``(B, C, H, W)`` floating tensor in [0, 1].
        sigma: ``(B,)`` (or scalar) noise standard deviation on the 0..255 scale, ``[0, 50]``.
        noise_field: optional standard-normal field with ``images``' shape (reused as is);
            otherwise drawn with ``torch.randn(..., generator=generator)`` on ``images``' device.
        generator: ``torch.Generator`` on ``images``' device (``None``: torch's default RNG).
    """
    b = images.shape[0]
    s = _per_sample_in_range(sigma, b, "sigma", images, NOISE_SIGMA_MAX)
    if noise_field is None:
        noise_field = torch.randn(
            images.shape, generator=generator, device=images.device, dtype=images.dtype
        )
    elif noise_field.shape != images.shape:
        raise ValueError(
            f"noise_field shape {tuple(noise_field.shape)} must equal images shape {tuple(images.shape)}"
        )
    scale = (s / 255.0).to(images.dtype).view(b, 1, 1, 1)
    return torch.addcmul(
        images, noise_field.to(device=images.device, dtype=images.dtype), scale
    )


# --------------------------------------------------------------------------------------------
# JPEG
# --------------------------------------------------------------------------------------------

# [choice] JPEG codec: libjpeg on the CPU through TorchCodec (``JpegEncoder`` /
# ``decode_jpeg``), whatever device the batch lives on. Reason: the evaluation sets and the
# reference pipeline are libjpeg's default baseline 4:2:0 (``jpeg_set_defaults``), while nvJPEG's
# encoder (torchvision's and TorchCodec's CUDA path) is fixed to 4:4:4, a different JPEG
# distribution; one CPU codec on every device gives byte-identical pairs on CPU and GPU.
# TorchCodec rather than torchvision.io because torchvision >= 0.29 deprecates its codecs in its
# favour (a DeprecationWarning on every call). TorchCodec bundles libjpeg-turbo (3.1.3 in 0.17)
# and its output is byte-identical to Pillow's (tests/test_degradations.py); Pillow itself costs
# ~5x more per 64x64 round trip (PIL images + BytesIO). Where TorchCodec cannot be loaded (its
# image codecs need torch >= 2.11; pyproject allows older torch), torchvision.io's CPU codec
# (libjpeg-turbo too, same defaults) is used instead, with a RuntimeWarning saying why.
_CODEC: tuple[str, Callable[[Tensor, int], Tensor]] | None = None


def _roundtrip_torchcodec(image: Tensor, quality: int) -> Tensor:
    from torchcodec.decoders import decode_jpeg
    from torchcodec.encoders import JpegEncoder

    return decode_jpeg(JpegEncoder(image).to_tensor(quality=quality), mode="RGB")


def _roundtrip_torchvision(image: Tensor, quality: int) -> Tensor:
    """torchvision.io's CPU libjpeg codec; torchvision >= 0.29 emits its DeprecationWarning here."""
    from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg

    return decode_jpeg(encode_jpeg(image, quality=quality), mode=ImageReadMode.RGB)


def jpeg_codec() -> tuple[str, Callable[[Tensor, int], Tensor]]:
    """The CPU JPEG round trip in use: ``("torchcodec", fn)`` or, as a fallback, ``("torchvision", fn)``.

    ``fn(image, quality)`` takes a CPU uint8 ``(3, H, W)`` image and returns its libjpeg encode
    (baseline, 4:2:0, ``quality``) + decode, a CPU uint8 ``(3, H, W)`` tensor.
    """
    global _CODEC
    if _CODEC is None:
        try:
            probe = torch.zeros(3, 16, 16, dtype=torch.uint8)
            _roundtrip_torchcodec(probe, 50)
            _CODEC = ("torchcodec", _roundtrip_torchcodec)
        except (ImportError, OSError, RuntimeError) as error:
            warnings.warn(
                f"torchcodec's JPEG codec could not be used ({type(error).__name__}: {error}); "
                "falling back to torchvision.io's CPU libjpeg codec (same 4:2:0 baseline output)",
                RuntimeWarning,
                stacklevel=3,
            )
            _CODEC = ("torchvision", _roundtrip_torchvision)
    return _CODEC


def _qualities(quality: Tensor | Sequence[int] | int, batch: int) -> list[int]:
    """Per-sample integer qualities (host ints), validated, naming the first bad entry."""
    q = quality if isinstance(quality, Tensor) else torch.as_tensor(quality, dtype=torch.float64)
    q = q.detach().to(device="cpu", dtype=torch.float64)
    if q.ndim == 0:
        q = q.expand(batch)
    if q.shape != (batch,):
        raise ValueError(f"quality must be a scalar or have shape ({batch},), got {tuple(q.shape)}")
    out = []
    for i, v in enumerate(q.tolist()):
        if not (v == NO_JPEG or JPEG_QUALITY_MIN <= v <= JPEG_QUALITY_MAX) or v != math.floor(v):
            raise ValueError(
                f"quality[{i}]={v} must be an integer in [{JPEG_QUALITY_MIN}, {JPEG_QUALITY_MAX}] or NO_JPEG={NO_JPEG}"
            )
        out.append(int(v))
    return out


def jpeg_roundtrip(images: Tensor, quality: Tensor | Sequence[int] | int) -> Tensor:
    """Real JPEG encode + decode of each image at its own quality, with CPU libjpeg on any device.

    Every image goes through libjpeg's baseline encoder with its default settings (4:2:0 chroma
    subsampling, standard tables, no optimisation) and libjpeg's decoder (see :func:`jpeg_codec`
    and the ``[choice]`` comment above it), so the output is the same bytes on CPU and CUDA and
    equals Pillow's ``save(format="JPEG", quality=q)`` + ``open``.

    A batch on another device (CUDA) goes to host memory and back: the samples to compress are
    gathered on the device, copied into pinned host memory (``non_blocking``, then the copy's
    stream is synchronised), round-tripped on the CPU, and copied back to the device with
    ``non_blocking=True``, so the function returns without waiting for the upload.

    Args:
        images: ``(B, 3, H, W)`` uint8 tensor on any device.
        quality: ``(B,)`` (or scalar) integer qualities in ``[10, 100]`` or ``NO_JPEG`` (0:
            sample returned unchanged), on any device.

    Returns:
        ``(B, 3, H, W)`` uint8 tensor on ``images``' device (``images`` itself when every
        quality is ``NO_JPEG``).
    """
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(
            f"images must be a uint8 (B, 3, H, W) tensor, got {images.dtype} {tuple(images.shape)}"
        )
    q = _qualities(quality, images.shape[0])
    idx = [i for i, v in enumerate(q) if v != NO_JPEG]
    if not idx:
        return images
    _, roundtrip = jpeg_codec()
    device = images.device
    if device.type == "cpu":
        out = images.clone()
        for i in idx:
            out[i] = roundtrip(images[i], q[i])
        return out
    # Another device: gather the samples to compress there, one copy to (pinned) host memory.
    sel = images if len(idx) == images.shape[0] else images[torch.tensor(idx, device=device)]
    pin = device.type == "cuda"
    host = torch.empty(sel.shape, dtype=torch.uint8, pin_memory=pin)
    host.copy_(sel, non_blocking=pin)
    if pin:
        torch.cuda.current_stream(device).synchronize()
    for k, i in enumerate(idx):
        host[k] = roundtrip(host[k], q[i])
    # The caching host allocator keeps `host` alive until this asynchronous upload has run.
    back = host.to(device, non_blocking=pin)
    if len(idx) == images.shape[0]:
        return back
    return images.index_copy(0, torch.tensor(idx, device=device), back)


def jpeg_window(start: int, length: int, size: int) -> tuple[int, int]:
    """The span ``[s, e)`` of an image axis that a JPEG round trip of the pixels ``[start, start + length)`` reads.

    With the block grid starting at pixel 0 (libjpeg's), ``s`` and ``e`` are the MCU (16 px)
    boundaries around the window grown by 2 pixels on each side (``e`` is cut at ``size``, where
    the image and its last, padded MCU end). Encoding and decoding ``[s, e)`` alone gives the
    window's pixels byte for byte as the whole image's round trip does: libjpeg's baseline
    encoder works MCU by MCU (per-block DCT and quantisation; chroma averaged over 2x2 pixels
    inside the MCU; the last partial MCU padded from the image's own edge), and its decoder's
    4:2:0 "fancy" upsampling reads one chroma sample (2 pixels) beyond a pixel's own. A window
    whose ``s`` is cut from an MCU boundary keeps the grid's phase (``s`` is a multiple of 16).
    tests/test_degradations.py checks the equality over every offset of a 64 px patch in a 99 px
    crop, at several qualities, on noise and photo content.

    Args:
        start, length: the window on the axis (``0 <= start``, ``start + length <= size``).
        size: the image's length on that axis.
    """
    if not (0 <= start and length >= 1 and start + length <= size):
        raise ValueError(f"window [{start}, {start + length}) must lie inside [0, {size})")
    s = max(0, start - _JPEG_CHROMA_REACH) // _JPEG_MCU * _JPEG_MCU
    e = min(size, -(-(start + length + _JPEG_CHROMA_REACH) // _JPEG_MCU) * _JPEG_MCU)
    return s, e


def _patch_corners(offsets: Tensor, b: int, height: int, width: int, patch_size: int) -> list[list[int]]:
    """``offsets`` as host ``[top, left]`` lists, checked: ``(B, 2)`` integers, each patch inside its image."""
    if not isinstance(offsets, Tensor) or offsets.shape != (b, 2):
        shape = tuple(offsets.shape) if isinstance(offsets, Tensor) else type(offsets).__name__
        raise ValueError(f"offsets must have shape ({b}, 2), one (top, left) per image, got {shape}")
    if offsets.is_floating_point() or offsets.is_complex() or offsets.dtype == torch.bool:
        raise ValueError(f"offsets must be integers, got dtype {offsets.dtype}")
    try:
        patch_size = operator.index(patch_size)
    except TypeError:
        patch_size = 0
    if isinstance(patch_size, bool) or patch_size < 1:
        raise ValueError(f"patch_size={patch_size!r} must be a positive integer")
    corners = offsets.tolist()
    for i, (top, left) in enumerate(corners):
        if not (0 <= top <= height - patch_size and 0 <= left <= width - patch_size):
            raise ValueError(f"offsets[{i}]=({top}, {left}): a {patch_size}x{patch_size} patch there leaves "
                             f"the {height}x{width} image")
    return corners


def jpeg_roundtrip_patches(images: Tensor, quality: Tensor | Sequence[int] | int, offsets: Tensor,
                           patch_size: int) -> Tensor:
    """The ``patch_size`` patch at each offset of each image's JPEG round trip, compressing only what it reads.

    Equals ``cut_patches(jpeg_roundtrip(images, quality), offsets, patch_size)`` byte for byte
    (:func:`cirlab.data.loading.cut_patches`): each image whose quality is not ``NO_JPEG`` is
    encoded and decoded over the :func:`jpeg_window` of its patch only, the grid starting at the
    image's corner as in the whole image's round trip. Same codec and device handling as
    :func:`jpeg_roundtrip` (another device goes through host memory).

    Args:
        images: ``(B, 3, H, W)`` uint8 tensor on any device.
        quality: ``(B,)`` (or scalar) integer qualities in ``[10, 100]`` or ``NO_JPEG``.
        offsets: ``(B, 2)`` integer ``(top, left)`` of each patch; the patch must lie inside its image.
        patch_size: side ``P`` of the patches.

    Returns:
        ``(B, 3, P, P)`` uint8 tensor on ``images``' device.
    """
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(
            f"images must be a uint8 (B, 3, H, W) tensor, got {images.dtype} {tuple(images.shape)}"
        )
    b, _, height, width = images.shape
    tops_lefts = _patch_corners(offsets, b, height, width, patch_size)
    q = _qualities(quality, b)
    p = int(patch_size)
    device = images.device
    out = torch.stack([images[i, :, top : top + p, left : left + p] for i, (top, left) in enumerate(tops_lefts)])
    idx = [i for i, v in enumerate(q) if v != NO_JPEG]
    if not idx:
        return out
    _, roundtrip = jpeg_codec()
    host = images
    if device.type != "cpu":
        # only the compressed samples travel, through pinned memory as in jpeg_roundtrip
        sel = images[torch.tensor(idx, device=device)]
        pin = device.type == "cuda"
        host = torch.empty(sel.shape, dtype=torch.uint8, pin_memory=pin)
        host.copy_(sel, non_blocking=pin)
        if pin:
            torch.cuda.current_stream(device).synchronize()
    patches = torch.empty((len(idx), 3, p, p), dtype=torch.uint8)
    for k, i in enumerate(idx):
        top, left = tops_lefts[i]
        y0, y1 = jpeg_window(top, p, height)
        x0, x1 = jpeg_window(left, p, width)
        decoded = roundtrip(host[i if device.type == "cpu" else k, :, y0:y1, x0:x1].contiguous(), q[i])
        patches[k] = decoded[:, top - y0 : top - y0 + p, left - x0 : left - x0 + p]
    if device.type == "cpu":
        out[idx] = patches
        return out
    return out.index_copy(0, torch.tensor(idx, device=device), patches.to(device, non_blocking=device.type == "cuda"))


# --------------------------------------------------------------------------------------------
# Full pipeline
# --------------------------------------------------------------------------------------------


def degrade(
    clean: Tensor,
    levels: Tensor,
    generator: torch.Generator | None = None,
    noise_field: Tensor | None = None,
    blur_backend: str = "auto",
    codes: bool = False,
) -> Tensor:
    """Degrade a batch: blur -> noise -> round/clip to uint8 -> JPEG, one level per sample.

    Args:
        clean: ``(B, 3, H, W)`` floating tensor in [0, 1], CPU or CUDA.
        levels: ``(B, 3)`` task-space levels in [0, 1], columns ``(blur, noise, jpeg)`` (see the
            module docstring for the encoding). May live on another device; it is moved.
        generator: ``torch.Generator`` on ``clean``'s device for the noise field (``None``:
            torch's default RNG). Same generator state => identical output. The field is only
            drawn when some sample has ``sigma > 0`` and ``noise_field`` is not given.
        noise_field: optional ``(B, 3, H, W)`` standard-normal field to use instead of drawing
            one (lets a caller give two images the same noise realisation).
        blur_backend: see :func:`gaussian_blur`.
        codes: return the uint8 codes ``k`` instead (the image is ``k / 255``); the default
            result is exactly ``codes.to(clean.dtype).div_(255)``.

    Returns:
        ``(B, 3, H, W)`` tensor with ``clean``'s dtype and device, values ``k / 255`` (uint8
        ``k`` with ``codes``).

    Raises:
        ValueError: wrong shapes or dtypes, ``clean`` outside [0, 1], levels outside [0, 1].
    """
    pixels, quality = _blur_noise_quantize(clean, levels, generator, noise_field, blur_backend)
    out = jpeg_roundtrip(pixels, quality)
    return out if codes else out.to(clean.dtype).div_(255.0)


def degrade_patches(
    clean: Tensor,
    levels: Tensor,
    offsets: Tensor,
    patch_size: int,
    generator: torch.Generator | None = None,
    noise_field: Tensor | None = None,
    blur_backend: str = "auto",
    codes: bool = False,
) -> Tensor:
    """:func:`degrade` of whole crops, returning the ``patch_size`` patch at each crop's offset.

    ``levels`` may hold several level sets per crop (``k * B`` rows: row ``j`` degrades crop
    ``j mod B``, as the input and the target of a training pair do). Then the result equals,
    byte for byte,

    ``cut_patches(degrade(cat([clean] * k), levels, generator, cat([noise_field] * k),
    blur_backend), cat([offsets] * k), patch_size)``

    (:func:`cirlab.data.loading.cut_patches`): all copies of a crop share its noise field (the
    one given, or one ``clean``-shaped field drawn from ``generator``) and its offset. Blur,
    noise and rounding run on the whole crops with the same operations as :func:`degrade`; the
    JPEG step compresses only the blocks each patch depends on (:func:`jpeg_roundtrip_patches`);
    the crops are not copied ``k`` times.

    Args:
        clean, generator, blur_backend, codes: as for :func:`degrade`.
        levels: ``(k * B, 3)`` task-space levels, ``k >= 1``.
        offsets: ``(B, 2)`` integer ``(top, left)`` of each patch in its crop.
        patch_size: side ``P`` of the patches.
        noise_field: optional ``(B, 3, H, W)`` standard-normal field (``clean``'s shape).

    Returns:
        ``(k * B, 3, P, P)`` tensor with ``clean``'s dtype and device, values ``k / 255`` (uint8
        ``k`` with ``codes``).
    """
    _check_images(clean, "clean", check_range=False)
    b = clean.shape[0]
    _patch_corners(offsets, b, *clean.shape[-2:], patch_size)  # bad offsets fail before any work
    if not isinstance(levels, Tensor) or levels.ndim != 2 or levels.shape[1] != 3 or levels.shape[0] % b \
            or levels.shape[0] == 0:
        shape = tuple(levels.shape) if isinstance(levels, Tensor) else type(levels).__name__
        raise ValueError(f"levels must have shape (k * {b}, 3), k level sets for the {b} crops, got {shape}")
    # A row that repeats an earlier row's crop and levels (a pair whose input and target levels are
    # equal: ~18% of relative-GT pairs) is the same image: made once, then copied.
    first: dict[tuple, int] = {}
    source = [first.setdefault((j % b, *row), j) for j, row in enumerate(levels.tolist())]
    rows = sorted(set(source))
    crop_of = torch.tensor(rows, device=clean.device) % b
    pixels, quality = _blur_noise_quantize(clean, levels[torch.tensor(rows, device=levels.device)], generator,
                                           noise_field, blur_backend, crop_of=crop_of)
    patches = jpeg_roundtrip_patches(pixels, quality, offsets[crop_of.to(offsets.device)], patch_size)
    if len(rows) < len(source):
        position = {j: i for i, j in enumerate(rows)}
        patches = patches[torch.tensor([position[j] for j in source], device=patches.device)]
    return patches if codes else patches.to(clean.dtype).div_(255.0)


def _blur_noise_quantize(
    clean: Tensor,
    levels: Tensor,
    generator: torch.Generator | None,
    noise_field: Tensor | None,
    blur_backend: str,
    crop_of: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Steps 1-2 of :func:`degrade` (validated): the uint8 ``(N, 3, H, W)`` images and the ``(N,)``
    qualities. ``crop_of``: optional ``(N,)`` crop index of each row of ``(N, 3)`` levels (rows of
    one crop share its noise); without it levels must be ``(B, 3)``, one row per crop."""
    _check_images(clean, "clean")
    validate_task_levels(levels, "levels")
    b = clean.shape[0]
    n = levels.shape[0] if crop_of is not None else b
    if levels.shape != (n, 3):
        raise ValueError(
            f"levels must have shape ({b}, 3) to match clean, got {tuple(levels.shape)}"
        )
    if noise_field is not None:
        if not isinstance(noise_field, Tensor) or noise_field.shape != clean.shape:
            shape = (
                tuple(noise_field.shape)
                if isinstance(noise_field, Tensor)
                else type(noise_field).__name__
            )
            raise ValueError(
                f"noise_field must have clean's shape {tuple(clean.shape)}, got {shape}"
            )
        if not noise_field.is_floating_point():
            raise ValueError(
                f"noise_field must be a floating tensor, got dtype {noise_field.dtype}"
            )
    phys = task_to_physical(levels.to(device=clean.device, dtype=torch.float64))
    radius, sigma, quality = phys.unbind(-1)
    r = _per_sample_in_range(radius, n, "radius", clean, BLUR_RADIUS_MAX)
    s = _per_sample_in_range(sigma, n, "sigma", clean, NOISE_SIGMA_MAX)
    if blur_backend not in _BLUR_BACKENDS:
        raise ValueError(f"backend={blur_backend!r} must be one of {', '.join(map(repr, _BLUR_BACKENDS))}")

    # the crops as n images without copying them (the blur reads only the rows it blurs)
    images = clean if crop_of is None else _RepeatedCrops(clean, crop_of)
    noisy = bool((s > 0).any())
    drawing = None
    if noisy and noise_field is None:
        draw = functools.partial(torch.randn, clean.shape, generator=generator, device=clean.device,
                                 dtype=clean.dtype)
        # On CPU the field (~1 ms per 16 crops of 99 px) is drawn on a helper thread while this
        # one blurs: both run in torch without the GIL. Same generator, same single draw, so the
        # values do not depend on the overlap; nothing else uses the generator meanwhile. Not in a
        # DataLoader worker: there the workers are meant to keep every core busy, and the helper
        # only adds thread hand-offs (2 workers on 2 cores: about 8% more pairs/s without it).
        overlap = clean.device.type == "cpu" and get_worker_info() is None
        drawing = _helper_thread().submit(draw) if overlap else None
        noise_field = draw() if drawing is None else None
    try:
        idx, blurred = _blur_active(images, r, blur_backend)
    finally:  # also on an error: the generator is not left in use by the helper
        if drawing is not None:
            noise_field = drawing.result()
    if noisy:
        noise_field = noise_field.to(device=clean.device, dtype=clean.dtype)
        scale = (s / 255.0).to(clean.dtype).view(n, 1, 1, 1)
    # Per element this is add_gaussian_noise and quantize_uint8 on the blurred batch (the same
    # operations in the same order: x + scale * n fused as in torch.addcmul, then *255, round,
    # clamp), run on a few images at a time in one reused buffer that stays in the CPU's cache
    # instead of several whole-batch temporaries. Blurred samples come from `blurred`.
    out = torch.empty((n, *clean.shape[1:]), dtype=torch.uint8, device=clean.device)
    per_image = clean[0].numel()
    step = n if clean.device.type != "cpu" else max(1, min(n, _CHUNK_ELEMENTS // per_image))
    buffer = torch.empty((step, *clean.shape[1:]), dtype=clean.dtype, device=clean.device)
    row_of = {} if idx is None else {i: k for k, i in enumerate(idx.tolist())}  # image -> row of `blurred`
    for start in range(0, n, step):
        stop = min(n, start + step)
        x = buffer[: stop - start]
        if blurred is not None and idx is None:
            x.copy_(blurred[start:stop])
        else:
            if crop_of is None:
                x.copy_(clean[start:stop])
            else:
                torch.index_select(clean, 0, crop_of[start:stop], out=x)
            for j in range(start, stop):
                if j in row_of:
                    x[j - start].copy_(blurred[row_of[j]])
        if noisy:
            field = noise_field[start:stop] if crop_of is None else noise_field.index_select(0, crop_of[start:stop])
            x.addcmul_(field, scale[start:stop])
            # quantize_uint8 done in place (x is finite; the clamp after rounding is the same)
            out[start:stop].copy_(x.mul_(255.0).round_().clamp_(0.0, 255.0))
        else:
            out[start:stop].copy_(quantize_uint8(x))
    return out, quality
