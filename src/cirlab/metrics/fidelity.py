"""Full-reference fidelity metrics: PSNR and SSIM, per image, in two conventions.

All functions take ``pred`` and ``target`` of shape ``(B, C, H, W)`` (RGB or grey) and return one
value per image, shape ``(B,)``. Set averages are means of per-image values, never a PSNR over the
concatenated batch (that would weight the MSE of all images together and differs from the paper
tables whenever images differ in quality).

**"torchmetrics" convention** (:func:`psnr_per_image`, :func:`ssim_per_image`): for monitoring
during training. Float input in ``[0, 1]`` used as is (no clamping, no quantisation),
``data_range=1.0``, computed by :mod:`torchmetrics.functional`. SSIM: Gaussian window 11,
sigma 1.5, K1 = 0.01, K2 = 0.03, computed on a reflect-padded image and averaged over the *whole*
image and all channels (torchmetrics' own border handling, which differs slightly from the
valid-window convention below).

**"paper" convention** (:func:`paper_psnr`, :func:`paper_ssim`): for tables, as BasicSR's
``calculate_psnr`` / ``calculate_ssim`` and the MATLAB scripts they reproduce:

1. clamp to ``[0, 1]`` and quantise to uint8: ``round(x * 255)``, round half to even
   (:func:`~cirlab.metrics.conventions.quantize_uint8`); ``uint8`` input is used as is;
2. ``channel="rgb"`` (default): all channels; ``channel="y"``: BT.601 luma as MATLAB
   ``rgb2ycbcr`` (``Y = 16 + 65.481 R + 128.553 G + 24.966 B``, Y in [16, 235], kept unrounded
   as BasicSR does); ``channel="y_rounded"``: the same Y rounded to integers, as MATLAB's
   ``rgb2ycbcr`` returns it for uint8 images (the HyperRes reference's Y tables; 0.01-0.05 dB
   from ``"y"``), see :func:`~cirlab.metrics.conventions.rgb_to_y_bt601`;
3. ``crop_border`` pixels removed from each edge (default 0: whole image);
4. float64 on the 0..255 scale, ``data_range = 255``.
   PSNR = ``10 log10(255^2 / MSE)`` with the MSE over all pixels and channels of one image
   (``inf`` for identical images). SSIM: Gaussian window 11 x 11, sigma 1.5, K1 = 0.01,
   K2 = 0.03, population (co)variances, "valid" windows only (no padding: the 5-pixel border
   gets no SSIM value of its own), mean of the SSIM map per channel then mean over channels.
   This equals ``skimage.metrics.structural_similarity(..., gaussian_weights=True, sigma=1.5,
   use_sample_covariance=False, data_range=255)``. Unlike Wang et al.'s original ``ssim.m`` there
   is no automatic downsampling of large images (BasicSR does none either).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.functional.image import (
    peak_signal_noise_ratio,
    structural_similarity_index_measure,
)

from cirlab.metrics.conventions import check_pair, quantize_uint8, rgb_to_y_bt601

__all__ = ["paper_psnr", "paper_ssim", "psnr_per_image", "ssim_per_image"]

Channel = Literal["rgb", "y", "y_rounded"]
CHANNELS = ("rgb", "y", "y_rounded")

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


# --------------------------------------------------------------------------------------------
# "torchmetrics" convention
# --------------------------------------------------------------------------------------------
def psnr_per_image(pred: Tensor, target: Tensor) -> Tensor:
    """Per-image PSNR in dB, torchmetrics convention.

    Args:
        pred, target: float ``(B, C, H, W)`` in ``[0, 1]`` (not clamped).

    Returns:
        ``(B,)`` PSNR of each image with ``data_range=1.0`` (``inf`` where identical).
    """
    check_pair(pred, target)
    return peak_signal_noise_ratio(pred, target, data_range=1.0, reduction="none", dim=(1, 2, 3))


def ssim_per_image(pred: Tensor, target: Tensor) -> Tensor:
    """Per-image SSIM, torchmetrics convention (Gaussian 11 / 1.5, ``data_range=1.0``).

    Args:
        pred, target: float ``(B, C, H, W)`` in ``[0, 1]``, H and W at least 6 (reflect padding
            of 5 pixels needs it).

    Returns:
        ``(B,)`` SSIM of each image, averaged over channels and the whole image.
    """
    check_pair(pred, target)
    if min(pred.shape[-2:]) <= SSIM_WINDOW // 2:
        raise ValueError(f"SSIM needs images larger than {SSIM_WINDOW // 2} px, got {tuple(pred.shape)}")
    return structural_similarity_index_measure(
        pred,
        target,
        gaussian_kernel=True,
        sigma=SSIM_SIGMA,
        kernel_size=SSIM_WINDOW,
        data_range=1.0,
        k1=SSIM_K1,
        k2=SSIM_K2,
        reduction="none",
    )


# --------------------------------------------------------------------------------------------
# "paper" convention
# --------------------------------------------------------------------------------------------
def _paper_prepare(pred: Tensor, target: Tensor, channel: str, crop_border: int) -> tuple[Tensor, Tensor]:
    """Quantise, optionally take Y, crop; return float64 tensors on the 0..255 scale."""
    check_pair(pred, target)
    if channel not in CHANNELS:
        raise ValueError(f"channel must be one of {', '.join(CHANNELS)}, got {channel!r}")
    if channel != "rgb" and pred.shape[1] != 3:
        raise ValueError(
            f'channel="{channel}" needs RGB input with 3 channels; got {pred.shape[1]} channels '
            f'(shape {tuple(pred.shape)}); use channel="rgb" for grey images'
        )
    if not isinstance(crop_border, int) or crop_border < 0:
        raise ValueError(f"crop_border must be a non-negative int, got {crop_border!r}")
    h, w = pred.shape[-2:]
    if 2 * crop_border >= min(h, w):
        raise ValueError(f"crop_border={crop_border} leaves nothing of a {h}x{w} image")
    out = []
    for x in (pred, target):
        x = quantize_uint8(x).to(torch.float64)
        if channel != "rgb":
            x = rgb_to_y_bt601(x, data_range=255.0, round_output=channel == "y_rounded")
        if crop_border:
            x = x[..., crop_border:-crop_border, crop_border:-crop_border]
        out.append(x)
    return out[0], out[1]


def paper_psnr(pred: Tensor, target: Tensor, channel: Channel = "rgb", crop_border: int = 0) -> Tensor:
    """Per-image PSNR for tables (paper convention, see the module docstring).

    Args:
        pred, target: ``(B, C, H, W)``, float in ``[0, 1]`` (clamped, quantised to uint8) or uint8.
        channel: ``"rgb"`` (all channels), ``"y"`` (BT.601 luma; needs C = 3) or ``"y_rounded"``
            (that luma rounded to integers, as MATLAB on uint8 images).
        crop_border: pixels removed from each edge before measuring.

    Returns:
        ``(B,)`` float64 PSNR in dB on the 0..255 scale (``inf`` where identical).
    """
    p, t = _paper_prepare(pred, target, channel, crop_border)
    mse = (p - t).pow(2).flatten(1).mean(dim=1)
    return 10.0 * torch.log10(255.0**2 / mse)


def _gaussian_window_1d(size: int, sigma: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    coords = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2.0
    g = torch.exp(-(coords**2) / (2.0 * sigma**2))
    return g / g.sum()


def _valid_filter(x: Tensor, g: Tensor) -> Tensor:
    """Separable Gaussian filter of each channel, "valid" region only (no padding)."""
    c = x.shape[1]
    k = g.numel()
    x = F.conv2d(x, g.view(1, 1, k, 1).expand(c, 1, k, 1), groups=c)
    return F.conv2d(x, g.view(1, 1, 1, k).expand(c, 1, 1, k), groups=c)


def paper_ssim(pred: Tensor, target: Tensor, channel: Channel = "rgb", crop_border: int = 0) -> Tensor:
    """Per-image SSIM for tables (paper convention, see the module docstring).

    Args:
        pred, target: ``(B, C, H, W)``, float in ``[0, 1]`` (clamped, quantised to uint8) or uint8.
        channel: ``"rgb"`` (SSIM per channel, then the mean over channels), ``"y"`` (BT.601 luma)
            or ``"y_rounded"`` (rounded luma).
        crop_border: pixels removed from each edge before measuring.

    Returns:
        ``(B,)`` float64 SSIM (Gaussian 11 / 1.5, data range 255, valid windows).
    """
    p, t = _paper_prepare(pred, target, channel, crop_border)
    if min(p.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(
            f"SSIM needs at least {SSIM_WINDOW}x{SSIM_WINDOW} px after cropping, got {tuple(p.shape)}"
        )
    c1 = (SSIM_K1 * 255.0) ** 2
    c2 = (SSIM_K2 * 255.0) ** 2
    g = _gaussian_window_1d(SSIM_WINDOW, SSIM_SIGMA, p.dtype, p.device)
    mu_p = _valid_filter(p, g)
    mu_t = _valid_filter(t, g)
    var_p = _valid_filter(p * p, g) - mu_p**2
    var_t = _valid_filter(t * t, g) - mu_t**2
    cov = _valid_filter(p * t, g) - mu_p * mu_t
    ssim_map = ((2 * mu_p * mu_t + c1) * (2 * cov + c2)) / ((mu_p**2 + mu_t**2 + c1) * (var_p + var_t + c2))
    # mean over each channel's map, then over channels (equal sizes, so a flat mean is the same)
    return ssim_map.flatten(2).mean(dim=2).mean(dim=1)
