"""Training-pair sampling with relative ground truth (TASNet eq. 11) or absolute ground truth.

A training pair is two degraded versions of one clean crop: the *input* at task-space levels
``l_in`` and the *target* at ``l_gt <= l_in`` (per type); the task vector is
``t = l_in - l_gt`` (docs/method.md section 1). Absolute ground truth (CResMD) is ``l_gt = 0``.

Sampling rule of :class:`PairSampler` (per pair, all draws from the caller's generator)
-----------------------------------------------------------------------------------------
1. *Active types.* With probability ``p_multiple`` (only when at least two types are enabled)
   the pair has several active types, their number uniform in ``{2, ..., n_enabled}``;
   otherwise exactly one. The active types are a uniformly random subset of that size of the
   enabled types. With the three types enabled, CResMD's mix (one, two or three types with
   probability 1/3 each) is ``p_multiple = 2/3``. Inactive and disabled types are 0 in both
   ``l_in`` and ``l_gt``.
2. *Granularity.* With probability ``p_binary`` the pair is binary: every level drawn below is
   ``0`` or the type's top level, each with probability 1/2. Otherwise it is continuous: levels
   come from ``distribution`` on the type's grid.
3. *Levels.* For each active type two levels ``a, b`` are drawn independently.
   ``relative``: ``l_in = max(a, b)``, ``l_gt = min(a, b)``. ``absolute``: ``l_in = a``,
   ``l_gt = 0``. (An active type can thus have ``l_in = l_gt``, including 0: the network also
   sees "keep this type as it is".)

Grids (physical units, converted to task space by :mod:`cirlab.data.degradations`)
    blur ``r in {0, s_b, 2 s_b, ...} <= blur_radius_max``; noise
    ``sigma in {0, s_n, 2 s_n, ...} <= noise_sigma_max``; JPEG ``none`` plus
    ``q in {100, 100 - s_q, 100 - 2 s_q, ...} >= jpeg_quality_min`` (with the defaults
    ``t_jpeg`` is a multiple of 2/92, 0 = none). The *top level* of a type is its grid's largest
    task level (equal to the configured maximum when the stride divides it).

Distributions on a grid
    ``uniform``: every grid point (0 included) equally likely. ``beta`` (CResMD): ``u ~
    Beta(beta_a, beta_b)`` (default Beta(0.5, 1), which favours small levels), scaled to the
    top level and snapped to the nearest grid point.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from cirlab.data.degradations import degrade, degrade_patches
from cirlab.data.pair_config import DegradationConfig, SamplingConfig  # re-exported
from cirlab.tasks import (
    BLUR_RADIUS_MAX,
    JPEG_QUALITY_MAX,
    JPEG_TASK_OFFSET,
    JPEG_TASK_SCALE,
    NOISE_SIGMA_MAX,
    task_to_physical,
)

__all__ = [
    "DegradationConfig",
    "PairSampler",
    "SamplingConfig",
    "make_pair_codes",
    "make_pairs",
    "pairs_from_codes",
    "sample_beta",
]


# --------------------------------------------------------------------------------------------
# Random variates from a torch.Generator
# --------------------------------------------------------------------------------------------


def _sample_gamma(
    shape_param: float, n: int, generator: torch.Generator | None, device: torch.device
) -> Tensor:
    """``n`` Gamma(shape_param, 1) variates (float64) by Marsaglia-Tsang, vectorised rejection."""
    boost = shape_param < 1.0
    alpha = shape_param + 1.0 if boost else shape_param
    d = alpha - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    out = torch.empty(n, dtype=torch.float64, device=device)
    pending = torch.arange(n, device=device)
    while pending.numel() > 0:
        m = pending.numel()
        x = torch.randn(m, generator=generator, device=device, dtype=torch.float64)
        u = torch.rand(m, generator=generator, device=device, dtype=torch.float64)
        v = (1.0 + c * x) ** 3
        ok = (v > 0) & (
            torch.log(u) < 0.5 * x * x + d - d * v + d * torch.log(v.clamp_min(1e-300))
        )
        out[pending[ok]] = (d * v)[ok]
        pending = pending[~ok]
    if boost:
        u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
        out = out * u.pow(1.0 / shape_param)
    return out


def sample_beta(
    a: float,
    b: float,
    shape: tuple[int, ...],
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Beta(a, b) variates (float64) of the given shape using only ``generator``.

    Exact inverse-CDF sampling when ``a == 1`` or ``b == 1`` (CResMD's Beta(0.5, 1) is
    ``U ** (1 / 0.5)``); otherwise ``X / (X + Y)`` with Gamma variates.
    """
    device = (
        torch.device(device)
        if device is not None
        else (generator.device if generator is not None else torch.device("cpu"))
    )
    n = math.prod(shape)
    if b == 1.0:
        return torch.rand(
            shape, generator=generator, device=device, dtype=torch.float64
        ).pow(1.0 / a)
    if a == 1.0:
        u = torch.rand(shape, generator=generator, device=device, dtype=torch.float64)
        return 1.0 - u.pow(1.0 / b)
    x = _sample_gamma(a, n, generator, device)
    y = _sample_gamma(b, n, generator, device)
    return (x / (x + y).clamp_min(1e-300)).reshape(shape)


# --------------------------------------------------------------------------------------------
# Sampler
# --------------------------------------------------------------------------------------------


def _grids(
    degradation: DegradationConfig, sampling: SamplingConfig
) -> list[list[float]]:
    """Task-space grid levels per type (ascending, starting with 0); ``[0]`` for disabled types."""
    eps = 1e-9
    n_b = math.floor(degradation.blur_radius_max / sampling.blur_stride + eps)
    n_n = math.floor(degradation.noise_sigma_max / sampling.noise_stride + eps)
    blur = [k * sampling.blur_stride / BLUR_RADIUS_MAX for k in range(n_b + 1)]
    noise = [k * sampling.noise_stride / NOISE_SIGMA_MAX for k in range(n_n + 1)]
    qs = range(
        JPEG_QUALITY_MAX, degradation.jpeg_quality_min - 1, -sampling.jpeg_stride
    )
    jpeg = [0.0] + [(JPEG_TASK_OFFSET - q) / JPEG_TASK_SCALE for q in qs]
    grids = [blur, noise, jpeg]
    return [g if on else [0.0] for g, on in zip(grids, degradation.enabled)]


class PairSampler:
    """Draws ``(levels_in, levels_gt)`` task-space level pairs; see the module docstring.

    Args:
        degradation: enabled types and their ranges.
        sampling: ground-truth mode, probabilities, distribution and grid strides.

    Attributes:
        grids: per type (blur, noise, jpeg) the ascending task-space grid (first entry 0).
        top_levels: ``(3,)`` largest grid level per type (0 for disabled types).
    """

    def __init__(
        self,
        degradation: DegradationConfig | None = None,
        sampling: SamplingConfig | None = None,
    ) -> None:
        self.degradation = (
            degradation if degradation is not None else DegradationConfig()
        )
        self.sampling = sampling if sampling is not None else SamplingConfig()
        self.grids = _grids(self.degradation, self.sampling)
        self.top_levels = tuple(g[-1] for g in self.grids)
        self.enabled = tuple(
            on and len(g) > 1 for on, g in zip(self.degradation.enabled, self.grids)
        )
        sizes = [len(g) for g in self.grids]
        width = max(sizes)
        padded = torch.full((3, width), math.inf, dtype=torch.float64)
        for i, g in enumerate(self.grids):
            padded[i, : len(g)] = torch.tensor(g, dtype=torch.float64)
        self._grid = padded  # (3, width), +inf padding
        self._sizes = torch.tensor(sizes, dtype=torch.float64)
        self._cache: dict[torch.device, tuple[Tensor, Tensor, Tensor, Tensor]] = {}

    def __repr__(self) -> str:
        return (
            f"PairSampler(degradation={self.degradation!r}, sampling={self.sampling!r})"
        )

    def _tensors(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        if device not in self._cache:
            self._cache[device] = (
                self._grid.to(device),
                self._sizes.to(device),
                torch.tensor(self.top_levels, dtype=torch.float64, device=device),
                torch.tensor(self.enabled, dtype=torch.bool, device=device),
            )
        return self._cache[device]

    def _draw_continuous(
        self,
        shape: tuple[int, ...],
        generator: torch.Generator | None,
        device: torch.device,
    ) -> Tensor:
        """Grid levels ``shape + (3,)`` (float64) from the configured distribution."""
        grid, sizes, top, _ = self._tensors(device)
        if self.sampling.distribution == "uniform":
            u = torch.rand(
                *shape, 3, generator=generator, device=device, dtype=torch.float64
            )
            idx = torch.minimum((u * sizes).floor(), sizes - 1).long()
        else:
            v = (
                sample_beta(
                    self.sampling.beta_a,
                    self.sampling.beta_b,
                    (*shape, 3),
                    generator,
                    device,
                )
                * top
            )
            idx = (
                (v.unsqueeze(-1) - grid).abs().argmin(dim=-1)
            )  # nearest grid point (inf padding)
        flat = idx.reshape(-1, 3)
        vals = torch.gather(grid, 1, flat.T.contiguous()).T  # (N, 3)
        return vals.reshape(*shape, 3)

    def sample_levels(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Draw ``batch_size`` pairs of task-space levels.

        Args:
            batch_size: number of pairs B (>= 1).
            generator: ``torch.Generator`` on ``device`` (``None``: torch's default RNG).
            device: where to draw; defaults to the generator's device, else CPU.

        Returns:
            ``(levels_in, levels_gt)``, each ``(B, 3)`` float32 in [0, 1] with columns
            (blur, noise, jpeg), on the grids, ``levels_gt <= levels_in`` element-wise
            (``levels_gt == 0`` in absolute mode).
        """
        if (
            not isinstance(batch_size, int)
            or isinstance(batch_size, bool)
            or batch_size < 1
        ):
            raise ValueError(f"batch_size={batch_size!r} must be a positive integer")
        if device is None:
            device = generator.device if generator is not None else torch.device("cpu")
        device = torch.device(device)
        b = batch_size
        _, _, top, enabled = self._tensors(device)
        n_enabled = int(sum(self.enabled))
        f64 = torch.float64

        # 1. active types: a uniformly random subset of the enabled types of size k.
        u = torch.rand(b, 3, generator=generator, device=device, dtype=f64)
        if n_enabled >= 2:
            multiple = u[:, 0] < self.sampling.p_multiple
            k = torch.where(
                multiple,
                2 + (u[:, 1] * (n_enabled - 1)).floor().clamp_max(n_enabled - 2),
                1.0,
            )
        else:
            k = torch.ones(b, dtype=f64, device=device)
        binary = u[:, 2] < self.sampling.p_binary
        scores = torch.rand(b, 3, generator=generator, device=device, dtype=f64)
        scores = torch.where(enabled, scores, 2.0)  # disabled types rank last
        ranks = scores.argsort(dim=1).argsort(dim=1)
        active = (ranks < k.unsqueeze(1)) & enabled

        # 2./3. two independent draws per type, binary or from the distribution.
        cont = self._draw_continuous((b, 2), generator, device)  # (B, 2, 3)
        bits = torch.rand(b, 2, 3, generator=generator, device=device, dtype=f64) < 0.5
        draws = torch.where(binary.view(b, 1, 1), bits.to(f64) * top, cont)
        if self.sampling.ground_truth == "relative":
            l_in, l_gt = draws.max(dim=1).values, draws.min(dim=1).values
        else:
            l_in, l_gt = draws[:, 0], torch.zeros_like(draws[:, 0])
        zero = torch.zeros((), dtype=f64, device=device)
        l_in = torch.where(active, l_in, zero).float()
        l_gt = torch.where(active, l_gt, zero).float()
        return l_in, l_gt


def make_pairs(
    clean: Tensor,
    sampler: PairSampler,
    generator: torch.Generator | None = None,
    offsets: Tensor | None = None,
    patch_size: int | None = None,
) -> dict[str, Tensor]:
    """Degrade a batch of clean crops into (input, target) training pairs.

    Both images start from the same clean crop (each blurred from it at its own radius) and
    share ONE standard-normal noise field, scaled by each image's own sigma (docs/method.md
    section 1 choice), so removing part of the noise is a well-posed mapping. Input and target
    are produced by one :func:`~cirlab.data.degradations.degrade` call on 2B images.

    With ``offsets``, ``clean`` holds margin crops (:class:`~cirlab.data.loading.CropDataset`):
    the whole crop is degraded (blur reads the pixels around the patch, the JPEG grid starts at
    the crop's corner, the noise field covers the crop) and the ``patch_size`` patch at each
    sample's offset is cut out of input and target afterwards.

    Equals ``pairs_from_codes(**make_pair_codes(clean, ...), dtype=clean.dtype)``, which is how it
    is computed.

    Args:
        clean: ``(B, 3, H, W)`` floating tensor in [0, 1], any device.
        sampler: the :class:`PairSampler`.
        generator: ``torch.Generator`` on ``clean``'s device; levels are drawn first, then the
            noise field. Same generator state => identical output.
        offsets: optional ``(B, 2)`` integer ``(top, left)`` of each sample's patch in its crop.
        patch_size: side ``P`` of the patches (required with ``offsets``).

    Returns:
        dict with ``input``, ``target`` ``(B, 3, P, P)`` (``P = H = W`` without offsets; clean's
        dtype/device, values k/255); ``levels_in``, ``levels_gt``, ``task = levels_in -
        levels_gt`` ``(B, 3)`` float32 task space; ``physical_in``, ``physical_gt`` ``(B, 3)`` as
        ``(r, sigma, q)`` with q = 0 for no JPEG (see
        :func:`~cirlab.data.degradations.task_to_physical`).
    """
    return pairs_from_codes(**make_pair_codes(clean, sampler, generator, offsets, patch_size), dtype=clean.dtype)


def make_pair_codes(
    clean: Tensor,
    sampler: PairSampler,
    generator: torch.Generator | None = None,
    offsets: Tensor | None = None,
    patch_size: int | None = None,
) -> dict[str, Tensor]:
    """:func:`make_pairs` before the conversion to floats: the pairs' uint8 codes and their levels.

    The compact form of a pair batch (a quarter of the float bytes, two tensors instead of seven):
    what DataLoader workers send to the main process, and on to the training device;
    :func:`pairs_from_codes` turns it into :func:`make_pairs`'s dict on whatever device it lives.
    Arguments as for :func:`make_pairs`, same draws from ``generator``.

    Returns:
        dict with ``codes`` ``(2B, 3, P, P)`` uint8 on ``clean``'s device (rows ``0..B-1`` the
        inputs, ``B..2B-1`` the targets; image = code / 255) and ``levels`` ``(2B, 3)`` float32
        task-space levels (the inputs' ``l_in``, then the targets' ``l_gt``).
    """
    if not isinstance(clean, Tensor):
        raise TypeError(f"clean must be a torch.Tensor, got {type(clean).__name__}")
    if clean.ndim != 4:
        raise ValueError(
            f"clean must have shape (B, 3, H, W), got {tuple(clean.shape)}"
        )
    if offsets is not None and patch_size is None:
        raise ValueError("make_pairs: patch_size is required with offsets")
    b = clean.shape[0]
    levels_in, levels_gt = sampler.sample_levels(
        b, generator=generator, device=clean.device
    )
    levels = torch.cat((levels_in, levels_gt))
    # [choice] On CPU the blur runs as banded products cut into blocks ("blocks" backend: same
    # matrix entries, about half the multiply-adds of the full band on 99 px crops; equal to the
    # full band's result to float rounding). Margin crops go through degrade_patches, which equals
    # degrading the whole crop and cutting the patch, byte for byte, but JPEG-compresses only the
    # blocks the patch depends on.
    backend = "blocks" if clean.device.type == "cpu" else "auto"
    if offsets is None:
        noise = None
        if bool((levels[:, 1] > 0).any()):
            field_ = torch.randn(clean.shape, generator=generator, device=clean.device, dtype=clean.dtype)
            noise = torch.cat((field_, field_))
        codes = degrade(torch.cat((clean, clean)), levels, noise_field=noise, blur_backend=backend, codes=True)
    else:
        # input and target of crop i are rows i and B + i of levels; degrade_patches draws the
        # crops' noise field from `generator` itself, the same draw as above (after the levels, only
        # when some level has noise), overlapped with the blur on CPU
        codes = degrade_patches(clean, levels, offsets, patch_size, generator=generator, blur_backend=backend,
                                codes=True)
    return {"codes": codes, "levels": levels}


def pairs_from_codes(codes: Tensor, levels: Tensor, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """:func:`make_pair_codes`'s output as :func:`make_pairs`'s dict, on ``codes``' device.

    Args:
        codes: ``(2B, 3, P, P)`` uint8, inputs then targets.
        levels: ``(2B, 3)`` task-space levels, same order (moved to ``codes``' device).
        dtype: floating dtype of ``input`` and ``target`` (``code / 255``, computed as
            ``codes.to(dtype).div_(255)``).

    Returns:
        :func:`make_pairs`'s dict.
    """
    for name, value in (("codes", codes), ("levels", levels)):
        if not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__} (a batch from DataLoader "
                            "workers holds numpy arrays: pass it through on_before_batch_transfer first)")
    if codes.dtype != torch.uint8 or codes.ndim != 4 or codes.shape[0] % 2:
        raise ValueError(f"codes must be a uint8 (2B, C, P, P) tensor, got {codes.dtype} {tuple(codes.shape)}")
    b = codes.shape[0] // 2
    if levels.shape != (2 * b, 3):
        raise ValueError(f"levels must have shape ({2 * b}, 3) to match codes, got {tuple(levels.shape)}")
    out = codes.to(dtype).div_(255.0)
    levels = levels.to(codes.device)
    levels_in, levels_gt = levels[:b], levels[b:]
    phys = task_to_physical(levels)
    return {
        "input": out[:b],
        "target": out[b:],
        "task": levels_in - levels_gt,
        "levels_in": levels_in,
        "levels_gt": levels_gt,
        "physical_in": phys[:b],
        "physical_gt": phys[b:],
    }
