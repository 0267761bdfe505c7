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
    Both backends are selectable (``backend=``) and the tests check they agree.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

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
    "gaussian_blur",
    "gaussian_kernel1d",
    "jpeg_codec",
    "jpeg_roundtrip",
]

#: Side of the square Gaussian blur kernel, in pixels.
KERNEL_SIZE: int = 21
# Tolerance for range checks on float levels (absorbs float round-off of grid arithmetic).
_EPS = 1e-5
# Above this image side the banded-matrix blur costs too much memory; use convolution.
_MATMUL_MAX_SIDE = 2048


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
        backend: ``"matmul"`` (banded-matrix products; fast on CPU), ``"kornia"``
            (:func:`kornia.filters.filter2d_separable`) or ``"auto"`` (matmul on CPU when
            ``max(H, W) <= 2048``, kornia otherwise).

    Returns:
        ``(B, C, H, W)`` tensor, same dtype and device; a new tensor unless nothing was blurred.
    """
    if images.ndim != 4 or not images.is_floating_point():
        raise ValueError(
            f"images must be a floating (B, C, H, W) tensor, got {images.dtype} {tuple(images.shape)}"
        )
    b = images.shape[0]
    r = _per_sample_in_range(radius, b, "radius", images, BLUR_RADIUS_MAX)
    if backend == "auto":
        use_matmul = (
            images.device.type == "cpu" and max(images.shape[-2:]) <= _MATMUL_MAX_SIDE
        )
        backend = "matmul" if use_matmul else "kornia"
    if backend not in ("matmul", "kornia"):
        raise ValueError(f"backend={backend!r} must be 'auto', 'matmul' or 'kornia'")
    active = r > 0
    n_active = int(active.sum())
    if n_active == 0:
        return images
    fn = _blur_matmul if backend == "matmul" else _blur_kornia
    if n_active == b:
        return fn(images, gaussian_kernel1d(r, dtype=images.dtype))
    idx = active.nonzero().squeeze(1)
    blurred = fn(
        images.index_select(0, idx), gaussian_kernel1d(r[idx], dtype=images.dtype)
    )
    return images.index_copy(0, idx, blurred)


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


# --------------------------------------------------------------------------------------------
# Full pipeline
# --------------------------------------------------------------------------------------------


def degrade(
    clean: Tensor,
    levels: Tensor,
    generator: torch.Generator | None = None,
    noise_field: Tensor | None = None,
    blur_backend: str = "auto",
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

    Returns:
        ``(B, 3, H, W)`` tensor with ``clean``'s dtype and device, values ``k / 255``.

    Raises:
        ValueError: wrong shapes or dtypes, ``clean`` outside [0, 1], levels outside [0, 1].
    """
    _check_images(clean, "clean")
    validate_task_levels(levels, "levels")
    b = clean.shape[0]
    if levels.shape != (b, 3):
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

    x = gaussian_blur(clean, radius, backend=blur_backend)
    if bool((sigma > 0).any()):
        x = add_gaussian_noise(x, sigma, noise_field=noise_field, generator=generator)
        # quantize_uint8 done in place: x is a fresh tensor here, and finite
        x = x.mul_(255.0).round_().clamp_(0.0, 255.0).to(torch.uint8)
    else:
        x = quantize_uint8(x)
    x = jpeg_roundtrip(x, quality)
    return x.to(clean.dtype).div_(255.0)
