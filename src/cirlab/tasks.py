"""The task space: physical degradation levels, task vectors ``t``, named grids and resolutions.

Words used across cirlab (``docs/architecture.md``):

* **physical levels** ``(r, sigma, q)``: blur radius in pixels ``[0, 4]`` (the Gaussian's
  standard deviation), noise standard deviation on the 0..255 scale ``[0, 50]``, integer JPEG
  quality ``[10, 100]`` or ``NO_JPEG`` (0) for none. Tensors ``(..., 3)`` in that column order.
* **task vector** ``t`` in ``[0, 1]^3``, CResMD's encoding: ``t = (r / 4, sigma / 50,
  (102 - q) / 92)`` with ``t_jpeg = 0`` for no JPEG (so q = 100 is 2/92 and q = 10 is 1).
  Going back, ``t_jpeg < 1/92`` means no JPEG, else ``q = clamp(round(102 - 92 t), 10, 100)``.
  The same encoding describes a degraded input's levels (``l_in``) and a target's (``l_gt``).
* **grid**: a named list of task vectors an evaluation scores (``cresmd27``, ``single``).
* **resolution**: ``(height, width)`` of a FLOPs or latency workload (``HD`` = 1280x720).

HyperRes's **scalar level** (a noise sigma, a JPEG quality, an SR scale) is a different axis;
it lives with HyperRes's data in :mod:`cirlab.data.hyperres`.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

from cirlab.task_ranges import (  # re-exported: the ranges live without torch
    BLUR_RADIUS_MAX,
    DEGRADATION_TYPES,
    JPEG_QUALITY_MAX,
    JPEG_QUALITY_MIN,
    JPEG_TASK_OFFSET,
    JPEG_TASK_SCALE,
    NO_JPEG,
    NOISE_SIGMA_MAX,
)

# Tolerance for range checks on float levels (absorbs float round-off of grid arithmetic).
_EPS = 1e-5

# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def first_bad(values: Tensor, bad: Tensor) -> tuple[tuple[int, ...], float]:
    idx = tuple(int(i) for i in bad.nonzero()[0].tolist())
    return idx, float(values[idx])


def _check_levels_tensor(levels: Tensor, name: str) -> None:
    if not isinstance(levels, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(levels).__name__}")
    if levels.ndim < 1 or levels.shape[-1] != 3:
        raise ValueError(
            f"{name} must have shape (..., 3) with columns (blur, noise, jpeg), "
            f"got {tuple(levels.shape)}"
        )
    if not levels.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor, got dtype {levels.dtype}")


def validate_task_levels(levels: Tensor, name: str = "levels") -> None:
    """Raise ``ValueError`` unless ``levels`` is a float tensor ``(..., 3)`` in ``[0, 1]``.

    The message names the offending entry, e.g. ``levels[2, 1] (noise)=1.3``.
    A tolerance of 1e-5 absorbs float round-off.
    """
    _check_levels_tensor(levels, name)
    bad = ~((levels >= -_EPS) & (levels <= 1.0 + _EPS))  # also catches NaN
    if bool(bad.any()):
        idx, val = first_bad(levels, bad)
        kind = DEGRADATION_TYPES[idx[-1]]
        raise ValueError(
            f"{name}[{', '.join(map(str, idx))}] ({kind})={val} is outside the task range [0, 1]"
        )


def validate_physical(phys: Tensor, name: str = "physical") -> None:
    """Raise ``ValueError`` unless ``phys`` ``(..., 3)`` holds valid ``(r, sigma, q)`` levels.

    ``r`` in ``[0, 4]``, ``sigma`` in ``[0, 50]``, ``q`` an integer in ``[10, 100]`` or
    ``NO_JPEG`` (0). The message names the offending entry and value.
    """
    _check_levels_tensor(phys, name)
    r, s, q = phys[..., 0], phys[..., 1], phys[..., 2]
    checks = (
        (
            0,
            r,
            ~((r >= -_EPS) & (r <= BLUR_RADIUS_MAX + _EPS)),
            f"[0, {BLUR_RADIUS_MAX}]",
        ),
        (
            1,
            s,
            ~((s >= -_EPS) & (s <= NOISE_SIGMA_MAX + _EPS)),
            f"[0, {NOISE_SIGMA_MAX}]",
        ),
        (
            2,
            q,
            ~(
                ((q == NO_JPEG) | ((q >= JPEG_QUALITY_MIN) & (q <= JPEG_QUALITY_MAX)))
                & (q == torch.round(q))
            ),
            f"an integer in [{JPEG_QUALITY_MIN}, {JPEG_QUALITY_MAX}] or NO_JPEG={NO_JPEG}",
        ),
    )
    labels = ("r (blur radius)", "sigma (noise)", "q (JPEG quality)")
    for col, values, bad, rng in checks:
        if bool(bad.any()):
            idx, val = first_bad(values, bad)
            where = ", ".join(map(str, (*idx, col)))
            raise ValueError(f"{name}[{where}] {labels[col]}={val} must be {rng}")


# --------------------------------------------------------------------------------------------
# Task vectors <-> physical levels
# --------------------------------------------------------------------------------------------


def physical_to_task(phys: Tensor) -> Tensor:
    """Physical levels ``(..., 3)`` = ``(r, sigma, q)`` -> task-space levels ``(..., 3)`` in [0, 1].

    ``t = (r / 4, sigma / 50, (102 - q) / 92)``, with ``q = NO_JPEG`` (0) mapped to ``t_jpeg = 0``.
    Raises ``ValueError`` for out-of-range values (see :func:`validate_physical`).
    Returns a tensor with ``phys``'s dtype and device.
    """
    validate_physical(phys, "physical")
    r, s, q = phys.unbind(-1)
    t_jpeg = torch.where(
        q == NO_JPEG, torch.zeros_like(q), (JPEG_TASK_OFFSET - q) / JPEG_TASK_SCALE
    )
    out = torch.stack((r / BLUR_RADIUS_MAX, s / NOISE_SIGMA_MAX, t_jpeg), dim=-1)
    return out.clamp_(0.0, 1.0)


def task_to_physical(levels: Tensor) -> Tensor:
    """Task-space levels ``(..., 3)`` in [0, 1] -> physical ``(..., 3)`` = ``(r, sigma, q)``.

    ``r = 4 t_blur`` (pixels), ``sigma = 50 t_noise`` (0..255 scale); JPEG:
    ``t_jpeg < 1/92`` (including 0) -> ``NO_JPEG`` (0), else
    ``q = clamp(round(102 - 92 t_jpeg), 10, 100)`` (an integer value stored as float).
    Raises ``ValueError`` for levels outside [0, 1]. Returns ``levels``' dtype and device.
    """
    validate_task_levels(levels, "levels")
    levels = levels.clamp(0.0, 1.0)
    tb, tn, tj = levels.unbind(-1)
    q = torch.round(JPEG_TASK_OFFSET - JPEG_TASK_SCALE * tj.double()).clamp_(
        JPEG_QUALITY_MIN, JPEG_QUALITY_MAX
    )
    q = torch.where(
        tj.double() * JPEG_TASK_SCALE < 1.0, torch.full_like(q, NO_JPEG), q
    ).to(levels.dtype)
    return torch.stack((tb * BLUR_RADIUS_MAX, tn * NOISE_SIGMA_MAX, q), dim=-1)


def physical_to_task_scalar(
    r: float, sigma: float, q: int | None
) -> tuple[float, float, float]:
    """Scalar version of :func:`physical_to_task`; ``q`` may be ``None`` or ``NO_JPEG`` for no JPEG."""
    qv = NO_JPEG if q is None else q
    t = physical_to_task(
        torch.tensor([[float(r), float(sigma), float(qv)]], dtype=torch.float64)
    )
    return tuple(float(v) for v in t[0])  # type: ignore[return-value]


def task_to_physical_scalar(
    t_blur: float, t_noise: float, t_jpeg: float
) -> tuple[float, float, int]:
    """Scalar version of :func:`task_to_physical`: returns ``(r, sigma, q)``, ``q = NO_JPEG`` for none."""
    p = task_to_physical(
        torch.tensor(
            [[float(t_blur), float(t_noise), float(t_jpeg)]], dtype=torch.float64
        )
    )
    return float(p[0, 0]), float(p[0, 1]), int(p[0, 2])


# --------------------------------------------------------------------------------------------
# Named grids
# --------------------------------------------------------------------------------------------

# Task-space axes of CResMD's 27-point test grid: r in {0, 1, 4}, sigma in {0, 15, 50},
# JPEG in {none, q=80, q=10}.
CRESMD27_AXES = ((0.0, 0.25, 1.0), (0.0, 0.3, 1.0), (0.0, 22 / 92, 1.0))


def level_grid(name: str | list) -> torch.Tensor:
    """Task-space levels (G, 3) of a named grid, or of an explicit list of [t_blur, t_noise, t_jpeg].

    Names: ``cresmd27`` (27 points, blur-major order) and ``single`` (the 7 points of cresmd27
    with at most one active type: clean, then each type at its two non-zero levels).
    """
    if isinstance(name, str):
        if name == "cresmd27":
            return torch.tensor(list(itertools.product(*CRESMD27_AXES)), dtype=torch.float32)
        if name == "single":
            points = [(0.0, 0.0, 0.0)]
            for axis, values in enumerate(CRESMD27_AXES):
                for value in values[1:]:
                    point = [0.0, 0.0, 0.0]
                    point[axis] = value
                    points.append(tuple(point))
            return torch.tensor(points, dtype=torch.float32)
        raise ValueError(f"data grid {name!r} is unknown; use 'cresmd27', 'single' or a list of [t_blur, t_noise, t_jpeg]")
    levels = torch.tensor([list(map(float, point)) for point in name], dtype=torch.float32)
    if levels.ndim != 2 or levels.shape[1] != 3:
        raise ValueError(f"data grid must be a list of [t_blur, t_noise, t_jpeg] triples, got shape {tuple(levels.shape)}")
    if (levels < 0).any() or (levels > 1).any():
        raise ValueError("data grid levels must lie in [0, 1] (task space)")
    return levels


def grid_labels(levels: torch.Tensor) -> list[str]:
    """Readable physical names of grid points, e.g. ``r1.0_s15_q80`` (``qnone`` = no JPEG)."""
    labels = []
    for r, sigma, q in task_to_physical(levels).tolist():
        jpeg = "none" if q == 0 else f"{int(round(q))}"
        labels.append(f"r{r:.1f}_s{int(round(sigma))}_q{jpeg}")
    return labels


# --------------------------------------------------------------------------------------------
# Task vectors given as text, and their labels
# --------------------------------------------------------------------------------------------


def parse_tasks(text: str, cond_dim: int = 3) -> Tensor:
    """``"0,0.3,0;1,1,0"`` -> (2, 3) tensor (rows by ``;``, values by ``,``, each in [0, 1])."""
    rows = [row for row in (part.strip() for part in text.split(";")) if row]
    try:
        values = [[float(v) for v in row.split(",")] for row in rows]
    except ValueError:
        raise ValueError(f"--tasks {text!r}: expected numbers like '0,0.3,0;1,1,0'") from None
    if not values or any(len(row) != cond_dim for row in values):
        raise ValueError(f"--tasks {text!r}: every task vector needs {cond_dim} values")
    tasks = torch.tensor(values, dtype=torch.float32)
    if not torch.isfinite(tasks).all() or (tasks < 0).any() or (tasks > 1).any():  # NaN compares false
        raise ValueError(f"--tasks {text!r}: values must be numbers in [0, 1]")
    return tasks


def task_label(task: Tensor) -> str:
    """``t=(0.25,0.30,0.00)`` plus the physical levels, e.g. ``r1.0 s15 qnone``."""
    values = "t=(" + ",".join(f"{v:.2f}" for v in task.tolist()) + ")"
    if task.numel() != 3:
        return values
    return f"{values} {grid_labels(task[None])[0].replace('_', ' ')}"


# --------------------------------------------------------------------------------------------
# Workload resolutions
# --------------------------------------------------------------------------------------------

#: ``(height, width)`` of the paper's cost workload (1280x720).
HD: tuple[int, int] = (720, 1280)
#: The paper's Table-1 sizes. [choice] "2k" is 2048x1080 (DCI 2K), not 1920x1080: the table's 2K FLOPs
#: are 2.40 x its HD FLOPs for both networks, the pixel ratio of 2048x1080 (1920x1080 gives 2.25);
#: its 4K figures are 9.0 x HD, the ratio of 3840x2160.
RESOLUTIONS: dict[str, tuple[int, int]] = {"hd": HD, "2k": (1080, 2048), "4k": (2160, 3840)}


def parse_resolutions(text: str, key: str = "--resolutions") -> list[tuple[int, int]]:
    """``"hd,180x320"`` -> ``[(720, 1280), (180, 320)]``: names of :data:`RESOLUTIONS` or ``HxW``."""
    out = []
    for part in (p.strip().lower() for p in text.split(",") if p.strip()):
        if part in RESOLUTIONS:
            out.append(RESOLUTIONS[part])
            continue
        try:
            height, width = (int(v) for v in part.split("x"))
        except ValueError:
            raise ValueError(f"{key}: {part!r} is not HxW (e.g. 180x320) or one of {', '.join(RESOLUTIONS)}") from None
        if height < 1 or width < 1:
            raise ValueError(f"{key}: {part!r} must have positive sides")
        out.append((height, width))
    if not out:
        raise ValueError(f"{key}: no resolution given")
    return out
