"""Settings of the blind-setting studies (:mod:`cirlab.evaluation.blind`), checked on creation.

Each config is what a ``conf/protocol/blind_*.yaml`` holds (less its ``name``/``study`` keys);
levels are task-space values in [0, 1] (:mod:`cirlab.tasks`), input degradations physical
(blur radius in px, noise sigma on 0..255, JPEG quality). Errors name ``protocol.<key>``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

from cirlab.tasks import BLUR_RADIUS_MAX, physical_to_task_scalar

__all__ = ["CONFIGS", "ArtifactsConfig", "ModulationConfig", "OversmoothingConfig", "protocol_config", "study_config"]

_TOL = 1e-6



def _fail(key: str, message: str) -> None:
    raise ValueError(f"protocol.{key}: {message}")


def _levels(key: str, values: Sequence[float]) -> tuple[float, ...]:
    try:
        levels = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        _fail(key, f"{values!r} must be a list of numbers")
    if len(levels) < 2:
        _fail(key, f"needs at least 2 levels, got {list(levels)}")
    for i, v in enumerate(levels):
        if not (-_TOL <= v <= 1 + _TOL):
            _fail(f"{key}[{i}]", f"{v} is outside the task range [0, 1]")
    if any(b <= a for a, b in zip(levels, levels[1:])):
        _fail(key, f"{list(levels)} must be strictly increasing")
    return levels


@dataclass(frozen=True)
class _Common:
    #: base seed; image i is degraded with a generator seeded ``mix_seed(seed, i)``
    seed: int = 0
    #: central crop side in pixels (None: whole images, cropped to even size)
    crop: int | None = None
    #: how many images (the first ones) get an image strip
    strips: int = 1
    #: use at most this many images (the first ones in name order; None: all)
    max_images: int | None = None

    def _check_common(self) -> None:
        if not isinstance(self.seed, int) or self.seed < 0:
            _fail("seed", f"{self.seed!r} must be a non-negative integer")
        if self.crop is not None and (not isinstance(self.crop, int) or self.crop < 8):
            _fail("crop", f"{self.crop!r} must be null or an integer >= 8")
        if not isinstance(self.strips, int) or self.strips < 0:
            _fail("strips", f"{self.strips!r} must be a non-negative integer")
        if self.max_images is not None and (not isinstance(self.max_images, int) or self.max_images < 1):
            _fail("max_images", f"{self.max_images!r} must be null or a positive integer")


@dataclass(frozen=True)
class ArtifactsConfig(_Common):
    """Study (a). Input: blur ``blur`` px, noise ``sigma`` (0..255), JPEG ``quality``; swept
    task vectors ``(t, 0, 0)`` for ``t`` in ``levels`` (each at most the input's ``blur / 4``)."""

    blur: float = 2.0
    sigma: float = 15.0
    quality: int = 50
    levels: tuple[float, ...] = (0.0, 0.125, 0.25, 0.375, 0.5)

    def __post_init__(self) -> None:
        self._check_common()
        object.__setattr__(self, "levels", _levels("levels", self.levels))
        try:
            _ = self.input_levels  # the property raises ValueError on levels out of range
        except ValueError as error:
            _fail("blur/sigma/quality", str(error))
        top = self.input_levels[0]
        for i, v in enumerate(self.levels):
            if v > top + _TOL:
                _fail(f"levels[{i}]", f"deblur level {v} exceeds the input's blur level {top:g} "
                      f"(blur={self.blur} px): relative ground truth cannot remove more blur than there is")

    @property
    def input_levels(self) -> tuple[float, float, float]:
        return physical_to_task_scalar(self.blur, self.sigma, self.quality)


@dataclass(frozen=True)
class ModulationConfig(_Common):
    """Study (b). Input: blur ``blur`` px only (8-bit); swept task vectors ``(t, 0, 0)`` for
    ``t`` in ``levels``, evenly spaced (default 0, 0.1, ..., 1 on an r = 4 input)."""

    blur: float = 4.0
    levels: tuple[float, ...] = tuple(round(0.1 * k, 10) for k in range(11))

    def __post_init__(self) -> None:
        self._check_common()
        levels = _levels("levels", self.levels)
        object.__setattr__(self, "levels", levels)
        if len(levels) < 3:
            _fail("levels", "needs at least 3 levels (2 steps) for a spread of steps")
        steps = [b - a for a, b in zip(levels, levels[1:])]
        if max(steps) - min(steps) > 1e-6:
            _fail("levels", f"{list(levels)} must be evenly spaced (steps {steps})")
        if not (0 < self.blur <= BLUR_RADIUS_MAX):
            _fail("blur", f"{self.blur} must be in (0, {BLUR_RADIUS_MAX}] px")


@dataclass(frozen=True)
class OversmoothingConfig(_Common):
    """Study (c). Input: noise ``sigma`` (0..255) only; swept task vectors ``(0, t, 0)`` for
    ``t`` in ``levels``: the first is the true level ``sigma / 50``, the others above it."""

    sigma: float = 15.0
    levels: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)

    def __post_init__(self) -> None:
        self._check_common()
        levels = _levels("levels", self.levels)
        object.__setattr__(self, "levels", levels)
        if not (0 < self.sigma <= 50):
            _fail("sigma", f"{self.sigma} must be in (0, 50]")
        true = self.sigma / 50.0
        if abs(levels[0] - true) > 1e-6:
            _fail("levels[0]", f"{levels[0]} must be the true noise level sigma/50 = {true:g}: "
                  "every output is reported against the output at the true level")


def _plain(values) -> dict:
    if values is None:
        return {}
    if not isinstance(values, Mapping):
        raise ValueError(f"protocol: expected a mapping of settings, got {type(values).__name__}")
    try:  # an OmegaConf DictConfig from Hydra
        from omegaconf import DictConfig, OmegaConf

        if isinstance(values, DictConfig):
            return dict(OmegaConf.to_container(values, resolve=True))
    except ImportError:  # pragma: no cover - omegaconf ships with hydra, a dependency
        pass
    return dict(values)


#: study name -> its config class
CONFIGS = {"artifacts": ArtifactsConfig, "modulation": ModulationConfig, "oversmoothing": OversmoothingConfig}


def study_config(study: str, values: Mapping | None = None):
    """The config of ``study`` from a mapping (e.g. a ``conf/protocol/blind_*.yaml`` without its
    ``name``/``study`` keys); unknown keys are an error naming ``protocol.<key>``."""
    if study not in CONFIGS:
        raise ValueError(f"protocol.study={study!r} must be one of {', '.join(CONFIGS)}")
    cls = CONFIGS[study]
    values = _plain(values)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"protocol.{unknown[0]}: not a setting of the {study} study (known: {', '.join(sorted(known))})")
    if "levels" in values and values["levels"] is not None:
        values["levels"] = tuple(values["levels"])
    return cls(**values)


#: keys of a protocol config that belong to ``cirlab-eval``, not to the study
PROTOCOL_KEYS = ("name", "runner", "flops_resolution")


def protocol_config(protocol: Mapping):
    """``(study, config)`` from a whole ``conf/protocol/blind_*.yaml`` (its ``study`` key names the
    study; ``name``, ``runner`` and ``flops_resolution`` are ``cirlab-eval``'s, not settings)."""
    values = _plain(protocol)
    for key in PROTOCOL_KEYS:
        values.pop(key, None)
    if "study" not in values:
        raise ValueError(f"protocol.study: missing; one of {', '.join(CONFIGS)}")
    study = values.pop("study")
    return study, study_config(study, values)
