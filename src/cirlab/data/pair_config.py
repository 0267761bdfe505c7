"""The settings of training-pair synthesis: :class:`DegradationConfig` and :class:`SamplingConfig`.

They type the ``degradation`` and ``sampling`` config groups (:func:`cirlab.config.register_configs`)
and check their values on construction, naming the key. Kept free of torch, so that composing a
config (and every Hydra command's ``--help``) does not load it; :mod:`cirlab.data.sampling` uses
them (and re-exports them) to draw the pairs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from cirlab.task_ranges import (
    BLUR_RADIUS_MAX,
    DEGRADATION_TYPES,
    JPEG_QUALITY_MAX,
    JPEG_QUALITY_MIN,
    JPEG_TASK_OFFSET,
    JPEG_TASK_SCALE,
    NOISE_SIGMA_MAX,
)

__all__ = ["DegradationConfig", "SamplingConfig"]


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_in(
    prefix: str, name: str, value: object, lo: float, hi: float, lo_open: bool = False
) -> None:
    ok = (
        _is_number(value)
        and math.isfinite(float(value))
        and (
            (float(value) > lo if lo_open else float(value) >= lo)
            and float(value) <= hi
        )
    )
    if not ok:
        left = "(" if lo_open else "["
        raise ValueError(f"{prefix}.{name}={value!r} must be in {left}{lo}, {hi}]")


def _check_int(prefix: str, name: str, value: object) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool)):
        raise ValueError(f"{prefix}.{name}={value!r} must be an integer")  # noqa: TRY004


@dataclass
class DegradationConfig:
    """Which degradations are used and how strong they may get (physical units).

    Attributes:
        types: enabled types, a subset of ``["blur", "noise", "jpeg"]``; disabled types are
            always level 0.
        blur_radius_max: largest blur radius (Gaussian sigma, pixels), in (0, 4].
        noise_sigma_max: largest noise sigma (0..255 scale), in (0, 50].
        jpeg_quality_min: lowest JPEG quality (strongest compression), integer in [10, 100].
    """

    types: list[str] = field(default_factory=lambda: ["blur", "noise", "jpeg"])
    blur_radius_max: float = BLUR_RADIUS_MAX
    noise_sigma_max: float = NOISE_SIGMA_MAX
    jpeg_quality_min: int = JPEG_QUALITY_MIN

    def __post_init__(self) -> None:
        p = "degradation"
        types = list(self.types)
        if not types:
            raise ValueError(
                f"{p}.types={types!r} must enable at least one of {list(DEGRADATION_TYPES)}"
            )
        for t in types:
            if t not in DEGRADATION_TYPES:
                raise ValueError(
                    f"{p}.types contains {t!r}; allowed: {list(DEGRADATION_TYPES)}"
                )
        if len(set(types)) != len(types):
            raise ValueError(f"{p}.types={types!r} lists a type twice")
        _check_in(
            p,
            "blur_radius_max",
            self.blur_radius_max,
            0.0,
            BLUR_RADIUS_MAX,
            lo_open=True,
        )
        _check_in(
            p,
            "noise_sigma_max",
            self.noise_sigma_max,
            0.0,
            NOISE_SIGMA_MAX,
            lo_open=True,
        )
        _check_int(p, "jpeg_quality_min", self.jpeg_quality_min)
        _check_in(
            p,
            "jpeg_quality_min",
            self.jpeg_quality_min,
            JPEG_QUALITY_MIN,
            JPEG_QUALITY_MAX,
        )

    @property
    def enabled(self) -> tuple[bool, bool, bool]:
        """Per type (blur, noise, jpeg): whether it is enabled."""
        return tuple(t in self.types for t in DEGRADATION_TYPES)  # type: ignore[return-value]

    @property
    def max_levels(self) -> tuple[float, float, float]:
        """Task-space maxima (blur, noise, jpeg) of the configured ranges (0 for disabled types)."""
        m = (
            self.blur_radius_max / BLUR_RADIUS_MAX,
            self.noise_sigma_max / NOISE_SIGMA_MAX,
            (JPEG_TASK_OFFSET - self.jpeg_quality_min) / JPEG_TASK_SCALE,
        )
        return tuple(v if on else 0.0 for v, on in zip(m, self.enabled))  # type: ignore[return-value]


@dataclass
class SamplingConfig:
    """How input/target level pairs are drawn (see the module docstring for the rule).

    Attributes:
        ground_truth: ``"relative"`` (TASNet, ``l_gt <= l_in``) or ``"absolute"`` (``l_gt = 0``).
        p_multiple: probability that a pair has more than one active type (then 2..n_enabled,
            uniform); CResMD's 1/3-1/3-1/3 mix of 1, 2, 3 types is ``p_multiple = 2/3``.
        p_binary: probability that a pair's levels are binary ({0, top level}) rather than
            continuous.
        distribution: ``"uniform"`` on the grid or ``"beta"`` (Beta(beta_a, beta_b) snapped to
            the grid, CResMD).
        beta_a, beta_b: Beta parameters (> 0); CResMD uses (0.5, 1).
        blur_stride: blur grid stride in pixels (docs/method.md: 0.1).
        noise_stride: noise grid stride on the 0..255 scale (docs/method.md: 1).
        jpeg_stride: JPEG quality grid stride (docs/method.md: 2): q = 100, 100 - s, ... plus none.
    """

    ground_truth: str = "relative"
    p_multiple: float = 0.5
    p_binary: float = 0.5
    distribution: str = "uniform"
    beta_a: float = 0.5
    beta_b: float = 1.0
    blur_stride: float = 0.1
    noise_stride: float = 1.0
    jpeg_stride: int = 2

    def __post_init__(self) -> None:
        p = "sampling"
        if self.ground_truth not in ("relative", "absolute"):
            raise ValueError(
                f"{p}.ground_truth={self.ground_truth!r} must be 'relative' or 'absolute'"
            )
        _check_in(p, "p_multiple", self.p_multiple, 0.0, 1.0)
        _check_in(p, "p_binary", self.p_binary, 0.0, 1.0)
        if self.distribution not in ("uniform", "beta"):
            raise ValueError(
                f"{p}.distribution={self.distribution!r} must be 'uniform' or 'beta'"
            )
        _check_in(p, "beta_a", self.beta_a, 0.0, 1e6, lo_open=True)
        _check_in(p, "beta_b", self.beta_b, 0.0, 1e6, lo_open=True)
        _check_in(
            p, "blur_stride", self.blur_stride, 0.0, BLUR_RADIUS_MAX, lo_open=True
        )
        _check_in(
            p, "noise_stride", self.noise_stride, 0.0, NOISE_SIGMA_MAX, lo_open=True
        )
        _check_int(p, "jpeg_stride", self.jpeg_stride)
        _check_in(
            p, "jpeg_stride", self.jpeg_stride, 1, JPEG_QUALITY_MAX - JPEG_QUALITY_MIN
        )
