"""Inputs, references and measures of the blind-setting studies (:mod:`cirlab.evaluation.blind`).

Definitions: docs/method.md section 7. Images are ``(B, 3, H, W)`` float in [0, 1].
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from cirlab.data.degradations import degrade
from cirlab.data.image_files import center_crop, crop_to_multiple, list_images, load_image
from cirlab.data.loading import mix_seed
from cirlab.metrics.conventions import quantize_uint8
from cirlab.metrics.fidelity import paper_psnr
from cirlab.models.restoration import PSNR_CAP_DB

__all__ = ["ImageSource", "detail_loss", "hf_energy", "hf_excess", "load_clean_images", "noise_field", "psnr",
           "relative_targets", "step_changes"]


_LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]], dtype=torch.float64)


def _laplacian(images: Tensor) -> Tensor:
    """3x3 Laplacian per channel of the 8-bit image (0..255 scale), valid positions only."""
    x = quantize_uint8(images).to(torch.float64)
    c = x.shape[1]
    return F.conv2d(x, _LAPLACIAN.to(x.device).expand(c, 1, 3, 3), groups=c)


def hf_energy(images: Tensor) -> Tensor:
    """High-frequency energy per image: mean square of the 3x3 Laplacian of the 8-bit image.

    ``images`` ``(B, C, H, W)`` float in [0, 1] is clamped and rounded to 8 bits (the image a user
    sees, as the paper metrics do), the Laplacian is taken per channel on the 0..255 scale over
    valid positions only (no padding, so the border adds nothing), and its square is averaged.
    Returns ``(B,)`` float64.
    """
    return _laplacian(images).pow(2).flatten(1).mean(dim=1)


def hf_excess(outputs: Tensor, targets: Tensor) -> Tensor:
    """``max(0, (E(y) - E(target)) / E(target))`` per image with E = :func:`hf_energy`: the
    fraction of high-frequency energy the output has beyond its target (0 when it has none
    more). NaN where the target has no high-frequency energy at all (a flat image)."""
    e_out, e_ref = hf_energy(outputs), hf_energy(targets)
    ratio = (e_out - e_ref) / e_ref
    return torch.where(e_ref > 0, ratio.clamp_min(0.0), torch.full_like(ratio, math.nan))


def detail_loss(outputs: Tensor, clean: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(hf_ratio, kept, loss)`` per image, with ``L`` the Laplacian of :func:`hf_energy`:

    * ``hf_ratio = E(y) / E(clean)``: all high-frequency energy, detail and leftover noise alike;
    * ``kept = <L y, L clean> / <L clean, L clean>``: the gain of the output's high frequencies
      along the clean image's own, i.e. how much of the clean detail survives. Noise left in the
      output is (nearly) uncorrelated with the clean image and adds (nearly) nothing, so a
      smoothed but still noisy output shows its loss; 1 for the clean image itself;
    * ``loss = max(0, 1 - kept)``: the fraction of the clean detail the output lacks.

    NaN where the clean image has no high frequencies (a flat image)."""
    l_out, l_ref = _laplacian(outputs).flatten(1), _laplacian(clean).flatten(1)
    e_ref = l_ref.pow(2).sum(dim=1)
    nan = torch.full_like(e_ref, math.nan)
    ratio = torch.where(e_ref > 0, l_out.pow(2).sum(dim=1) / e_ref, nan)
    kept = torch.where(e_ref > 0, (l_out * l_ref).sum(dim=1) / e_ref, nan)
    return ratio, kept, (1.0 - kept).clamp_min(0.0)


def step_changes(outputs: Tensor) -> tuple[Tensor, float]:
    """Per-step change of a sweep and its coefficient of variation.

    ``outputs`` ``(K + 1, C, H, W)``: the outputs at K + 1 evenly spaced levels (float, clamped
    to [0, 1], not rounded: rounding would add steps of its own). Returns ``d`` ``(K,)`` with
    ``d_k = RMS(y_{k+1} - y_k)`` on the 0..255 scale, and ``CV = std(d) / mean(d)`` (population
    std): 0 when the output moves by the same amount at every step, large when it jumps at one.
    NaN when the output never changes (mean 0: no modulation at all).
    """
    y = outputs.clamp(0, 1).to(torch.float64) * 255.0
    d = (y[1:] - y[:-1]).pow(2).flatten(1).mean(dim=1).sqrt()
    mean = float(d.mean())
    cv = float(d.std(unbiased=False)) / mean if mean > 0 else math.nan
    return d, cv


def psnr(outputs: Tensor, targets: Tensor) -> Tensor:
    return paper_psnr(outputs.clamp(0, 1), targets).clamp_max(PSNR_CAP_DB)


# --------------------------------------------------------------------------------------------
# Images, inputs and references
# --------------------------------------------------------------------------------------------

ImageSource = str | os.PathLike | Sequence


def load_clean_images(images: ImageSource, crop: int | None = None,
                      config_key: str = "protocol.images") -> list[tuple[str, Tensor]]:
    """``[(name, (1, 3, H, W) float in [0, 1])]`` from a folder, a list of files or a list of
    ``(name, tensor)`` (tensor uint8 ``(3, H, W)`` or float in [0, 1]). Sizes are cropped to even
    (bottom/right, as the evaluation sets) and, with ``crop``, to the central ``crop x crop``."""
    if isinstance(images, (str, os.PathLike)):
        images = list_images(images, config_key=config_key)
    if len(images) == 0:
        raise ValueError(f"{config_key}: no images given")
    out = []
    for item in images:
        if isinstance(item, (str, os.PathLike)):
            name, image = Path(item).stem, load_image(item)
        else:
            name, image = item
        if image.dtype == torch.uint8:
            image = image.float() / 255.0
        if image.ndim == 3:
            image = image[None]
        if image.ndim != 4 or image.shape[:2] != (1, 3):
            raise ValueError(f"{config_key}: image {name!r} has shape {tuple(image.shape)}, expected (3, H, W)")
        image = center_crop(crop_to_multiple(image, 2), crop)
        out.append((str(name), image.contiguous()))
    return out


def noise_field(image: Tensor, seed: int, index: int) -> Tensor:
    generator = torch.Generator().manual_seed(mix_seed(seed, index))
    return torch.randn(image.shape, generator=generator, dtype=image.dtype)


def relative_targets(clean: Tensor, levels_in: Sequence[float], levels_gt: Tensor, field: Tensor) -> tuple[Tensor, Tensor]:
    """The input and its relative ground truths, made as training pairs are (docs/method.md
    section 1; :func:`cirlab.data.sampling.make_pairs`): every image from the same clean
    ``(1, 3, H, W)`` image, each blurred at its own radius, noised with ONE shared standard-normal
    ``field`` scaled by its own sigma, rounded to 8 bits and JPEG-compressed at its own quality,
    in one :func:`~cirlab.data.degradations.degrade` call. Returns ``(input (1, 3, H, W),
    targets (G, 3, H, W))`` for ``levels_gt`` ``(G, 3)`` task levels."""
    levels = torch.cat((torch.tensor([list(levels_in)], dtype=torch.float32), levels_gt.float()))
    n = levels.shape[0]
    out = degrade(clean.expand(n, -1, -1, -1).contiguous(), levels, noise_field=field.expand(n, -1, -1, -1).contiguous())
    return out[:1], out[1:]

