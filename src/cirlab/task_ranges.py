"""The physical ranges of the three degradations and the task-space encoding constants.

Plain numbers, without torch, so that the config schemas (:mod:`cirlab.data.pair_config`) and
with them every Hydra command's ``--help`` import quickly; :mod:`cirlab.tasks` re-exports them
next to the functions that use them (see its docstring for the encoding).
"""

from __future__ import annotations

#: Names of the three degradation types, in the order they are applied and in which the
#: columns of level tensors are stored.
DEGRADATION_TYPES: tuple[str, str, str] = ("blur", "noise", "jpeg")
#: Largest blur radius (Gaussian sigma, pixels); task level 1.
BLUR_RADIUS_MAX: float = 4.0
#: Largest noise standard deviation on the 0..255 scale; task level 1.
NOISE_SIGMA_MAX: float = 50.0
#: Lowest JPEG quality (strongest compression); task level 1.
JPEG_QUALITY_MIN: int = 10
#: Highest JPEG quality (weakest compression); task level 2/92.
JPEG_QUALITY_MAX: int = 100
#: ``t_jpeg = (JPEG_TASK_OFFSET - q) / JPEG_TASK_SCALE`` (CResMD).
JPEG_TASK_OFFSET: int = 102
JPEG_TASK_SCALE: int = 92
#: Physical JPEG "quality" that means "no JPEG" (task level 0).
NO_JPEG: int = 0
