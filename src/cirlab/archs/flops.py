"""Analytic FLOPs of CResMD and of pruned, partly shared CResMDs (TASNet eq. 9 as executed).

Convention
----------
* **2 FLOPs per multiply-accumulate, convolutions only.** A 3x3 convolution producing ``C_out``
  channels of size ``H_out x W_out`` from ``C_in`` channels costs ``2 * 9 * H_out * W_out *
  C_out * C_in``. Bias adds, ReLUs, PixelShuffle, the residual adds and the modulation
  multiplies are not counted. This is exactly what ``torch.utils.flop_counter.FlopCounterMode``
  reports for ``aten.convolution`` (the tests check it).
* The linear layers (``recon_trunk.i.local_scale``, ``global_scale``) are left out of every
  figure here; :func:`linear_flops` reports them separately (about 12 kFLOPs per inference for
  the reference network, under 0.01% of the convolutions even at 32x32).
* Sizes: CResMDNet pads odd inputs (replicate) to even size, so the trunk runs at
  ``ceil(H/2) x ceil(W/2)`` and the full-resolution maps at twice that; the formulas use those
  executed sizes.

Searchable feature maps (docs/method.md section 3, N = 2 * nb + 3, 67 for the reference nb = 32)
----------------------------------------------------------------------------------------
In forward order, ``n = 1..N`` (map 0 is the input image, ``in_channels`` channels, fixed):

====================  ==========================  ==========  ============
n                     produced by                 channels    resolution
====================  ==========================  ==========  ============
1                     ``conv_first`` (stride 2)   nf          H/2
2 + 2i                ``recon_trunk.i.conv1``     nf          H/2
3 + 2i                ``recon_trunk.i.conv2`` +   nf          H/2
                      residual add
2 nb + 2              ``upconv`` + PixelShuffle   nf          H
2 nb + 3 = N          ``HRconv``                  nf          H
====================  ==========================  ==========  ============

``upconv`` makes ``4 nf`` channels at H/2 which PixelShuffle(2) turns into ``nf`` channels at H;
post-shuffle channel ``c`` comes from upconv output channels ``4c .. 4c+3``. Counting it in
post-shuffle terms (``|active|`` channels at H x W) gives the same number as ``4 |active|``
channels at H/2 x W/2. ``conv_last`` (nf -> 3) is not searchable.

Mask states and eq. 9
---------------------
A :class:`MaskState` for M tasks holds ``phi`` (N,) bool with prefix structure (the first S maps
are shared, the rest task-specific) and one mask per map, ``masks[n-1]`` of shape (M, C_n),
binary (bool or 0/1) or soft (floats in [0, 1], e.g. straight-through gates). A shared map has
one mask, stored as M equal rows (validated). With ``a_{m,n} = sum_c masks[n-1][m, c]`` and
``B_n = 2 * K^2 * H_n * W_n``:

    FLOPs = sum_{n: phi_n = 1} B_n * a_n * a_{n-1}                       (shared prefix, once)
          + sum_{n: phi_n = 0} B_n * sum_m a_{m,n} * a_{m,n-1}          (once per task)
          + B_last * 3 * (a_N if phi_N = 1 else sum_m a_{m,N})          (conv_last)

where ``a_0 = in_channels`` and, for the first task-specific map, ``a_{m,n-1}`` is the shared
width of map ``n-1`` (the executed network reads the shared map there; docs/method.md's [choice] of
computing R1 from the masks actually applied). For a shared map the width is the mean of its
rows' sums (all equal), so with soft masks the gradient is split evenly over the M rows.

The "27-point workload at 1280x720" (:func:`workload_flops`) is the paper's Table 1 setting: one
HD image (1280x720) restored under the M = 27 task vectors of CResMD's test grid, all 27
outputs counted (shared prefix once). It is plain :func:`masked_flops` at that size; divide by
27 for the paper's "average cost per inference".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

KERNEL_SIZE = 3
_BASE = 2 * KERNEL_SIZE * KERNEL_SIZE  # 2 FLOPs per MAC times K^2


@dataclass(frozen=True)
class MapSpec:
    """One searchable feature map of CResMD.

    Attributes:
        index: ``n`` in 1..N (forward order).
        name: a readable name (``conv_first``, ``recon_trunk.i.inner``, ``recon_trunk.i.out``,
            ``upconv.shuffled``, ``HRconv``).
        module: the name of the convolution producing it (CResMDNet parameter prefix).
        channels: ``C_n`` (always ``nf``; for ``upconv`` the post-shuffle count).
        scale: resolution relative to the input, 0.5 (trunk) or 1.0.
    """

    index: int
    name: str
    module: str
    channels: int
    scale: float


def num_searchable_maps(nb: int) -> int:
    """N = 2 * nb + 3 (67 for the reference nb = 32)."""
    return 2 * nb + 3


def searchable_maps(nb: int = 32, nf: int = 64) -> list[MapSpec]:
    """The N = 2 nb + 3 searchable feature maps of a CResMDNet, in forward order."""
    if nb < 1 or nf < 1:
        raise ValueError(f"nb={nb} and nf={nf} must be >= 1")
    specs = [MapSpec(1, "conv_first", "conv_first", nf, 0.5)]
    for i in range(nb):
        specs.append(MapSpec(2 + 2 * i, f"recon_trunk.{i}.inner", f"recon_trunk.{i}.conv1", nf, 0.5))
        specs.append(MapSpec(3 + 2 * i, f"recon_trunk.{i}.out", f"recon_trunk.{i}.conv2", nf, 0.5))
    specs.append(MapSpec(2 * nb + 2, "upconv.shuffled", "upconv", nf, 1.0))
    specs.append(MapSpec(2 * nb + 3, "HRconv", "HRconv", nf, 1.0))
    return specs


def _executed_sizes(height: int, width: int) -> tuple[int, int, int, int]:
    """(h/2, w/2, H, W) as CResMDNet executes them (odd sizes are padded to even)."""
    if height < 1 or width < 1:
        raise ValueError(f"image size {height}x{width} must be positive")
    half_h, half_w = math.ceil(height / 2), math.ceil(width / 2)
    return half_h, half_w, 2 * half_h, 2 * half_w


def _map_bases(nb: int, height: int, width: int) -> list[int]:
    """B_n = 2 K^2 H_n W_n for n = 1..N, then B for conv_last (index N)."""
    half_h, half_w, full_h, full_w = _executed_sizes(height, width)
    half, full = _BASE * half_h * half_w, _BASE * full_h * full_w
    return [half] * (2 * nb + 1) + [full, full] + [full]


def cresmd_flops_breakdown(
    nf: int = 64, nb: int = 32, height: int = 720, width: int = 1280, tasks: int = 1,
    in_channels: int = 3, out_channels: int = 3,
) -> dict[str, int]:
    """Convolution FLOPs of the unpruned CResMDNet per module, for ``tasks`` inferences.

    Keys are the module names (``conv_first``, ``recon_trunk.i.conv1``, ``recon_trunk.i.conv2``,
    ``upconv``, ``HRconv``, ``conv_last``) in forward order.
    """
    if tasks < 0:
        raise ValueError(f"tasks={tasks} must be >= 0")
    specs = searchable_maps(nb, nf)
    bases = _map_bases(nb, height, width)
    out: dict[str, int] = {}
    previous = in_channels
    for spec, base in zip(specs, bases):
        out[spec.module] = tasks * base * spec.channels * previous
        previous = spec.channels
    out["conv_last"] = tasks * bases[-1] * out_channels * previous
    return out


def cresmd_flops(
    nf: int = 64, nb: int = 32, height: int = 720, width: int = 1280, tasks: int = 1,
    in_channels: int = 3, out_channels: int = 3,
) -> int:
    """Convolution FLOPs of the unpruned CResMDNet for ``tasks`` inferences (tasks x one).

    The reference network (nf 64, nb 32) at 1280x720 costs 1,227,040,358,400 FLOPs (1,227.0 G)
    per inference in our convention; TASNet's Table 1 gives 1,124.3 G (ratio 0.916, convention
    not stated in the paper).
    """
    return sum(cresmd_flops_breakdown(nf, nb, height, width, tasks, in_channels, out_channels).values())


def linear_flops(nf: int = 64, nb: int = 32, cond_dim: int = 3, out_channels: int = 3, tasks: int = 1) -> int:
    """FLOPs of the linear layers (all ``local_scale`` and ``global_scale``) for ``tasks`` inferences.

    2 FLOPs per MAC, bias adds not counted (as FlopCounterMode's ``aten.addmm``): 12,306 per
    inference for the reference network. Excluded from every other figure in this module.
    """
    return tasks * (nb * 2 * cond_dim * nf + 2 * cond_dim * out_channels)


# --------------------------------------------------------------------------- mask states
@dataclass(frozen=True, eq=False)
class MaskState:
    """Sharing decision and channel masks of a pruned CResMD for M tasks.

    Attributes:
        phi: (N,) bool, prefix structure: ``phi[n-1]`` is True for the S shared maps n <= S
            and False after (S = 0..N).
        masks: N tensors, ``masks[n-1]`` of shape (M, C_n) for map n, always M rows; a shared
            map's rows must all be equal (its single mask). Entries are bool, 0/1, or floats
            in [0, 1] (soft masks for a differentiable FLOPs regulariser).

    Validation happens on construction (ValueError on a violation). Tensors may carry
    gradients; validation reads them detached.
    """

    phi: Tensor
    masks: list[Tensor]

    def __post_init__(self) -> None:
        phi = self.phi
        if not isinstance(phi, Tensor) or phi.ndim != 1 or phi.dtype != torch.bool:
            raise ValueError("phi must be a 1-D bool tensor")
        n_maps = phi.numel()
        if n_maps < 1:
            raise ValueError("phi must have at least one map")
        shared = int(phi.sum())
        if not torch.equal(phi.cpu(), torch.arange(n_maps) < shared):
            raise ValueError(f"phi must be a prefix (ones then zeros), got {phi.int().tolist()}")
        if len(self.masks) != n_maps:
            raise ValueError(f"expected {n_maps} masks (one per map), got {len(self.masks)}")
        tasks = None
        for n, mask in enumerate(self.masks, start=1):
            if not isinstance(mask, Tensor) or mask.ndim != 2:
                raise ValueError(f"masks[{n - 1}] (map {n}) must be a 2-D tensor (M, C_n)")
            if tasks is None:
                tasks = mask.shape[0]
                if tasks < 1:
                    raise ValueError("masks need at least one task row")
            elif mask.shape[0] != tasks:
                raise ValueError(f"masks[{n - 1}] (map {n}) has {mask.shape[0]} rows, expected M={tasks}")
            values = mask.detach()
            if values.is_complex():
                raise ValueError(f"masks[{n - 1}] must be real")
            if values.dtype != torch.bool and values.numel() and (values.min() < 0 or values.max() > 1):
                raise ValueError(f"masks[{n - 1}] (map {n}) has values outside [0, 1]")
            if n <= shared and not bool((values == values[:1]).all()):
                raise ValueError(f"map {n} is shared (phi=1) but its mask rows differ across tasks")

    # ------------------------------------------------------------------ properties
    @property
    def num_maps(self) -> int:
        """N."""
        return self.phi.numel()

    @property
    def num_tasks(self) -> int:
        """M."""
        return self.masks[0].shape[0]

    @property
    def num_shared(self) -> int:
        """S, the number of shared maps (the prefix length of phi)."""
        return int(self.phi.sum())

    @property
    def channels(self) -> list[int]:
        """C_n for n = 1..N."""
        return [mask.shape[1] for mask in self.masks]

    def is_binary(self) -> bool:
        """True if every mask entry is 0 or 1."""
        return all(
            mask.dtype == torch.bool or bool(((mask.detach() == 0) | (mask.detach() == 1)).all())
            for mask in self.masks
        )

    def active(self, n: int, task: int = 0) -> Tensor:
        """Indices (long) of the active channels of map n (1-based) for ``task`` (binary masks)."""
        return torch.nonzero(self.masks[n - 1][task].detach() > 0.5).flatten()

    # ------------------------------------------------------------------ constructors
    @staticmethod
    def prefix_phi(num_maps: int, shared: int, device: torch.device | str | None = None) -> Tensor:
        """phi with the first ``shared`` of ``num_maps`` maps shared."""
        if not 0 <= shared <= num_maps:
            raise ValueError(f"shared={shared} must be in 0..{num_maps}")
        return torch.arange(num_maps, device=device) < shared

    @classmethod
    def full(cls, nb: int, nf: int, tasks: int = 1, shared: int = 0) -> MaskState:
        """All channels on (the unpruned network), first ``shared`` maps shared."""
        specs = searchable_maps(nb, nf)
        return cls(cls.prefix_phi(len(specs), shared), [torch.ones(tasks, s.channels, dtype=torch.bool) for s in specs])

    @classmethod
    def random(
        cls, nb: int, nf: int, tasks: int, shared: int | None = None, keep: float = 0.6,
        generator: torch.Generator | None = None,
    ) -> MaskState:
        """Random binary state (for tests): each channel on with probability ``keep``.

        ``shared`` None draws S uniformly in 0..N.
        """
        specs = searchable_maps(nb, nf)
        n_maps = len(specs)
        if shared is None:
            shared = int(torch.randint(0, n_maps + 1, (1,), generator=generator))
        masks = []
        for spec in specs:
            rows = 1 if spec.index <= shared else tasks
            mask = torch.rand(rows, spec.channels, generator=generator) < keep
            masks.append(mask.expand(tasks, -1).clone())
        return cls(cls.prefix_phi(n_maps, shared), masks)


# --------------------------------------------------------------------------- masked FLOPs
def _check_state(state: MaskState, nf: int, nb: int) -> list[MapSpec]:
    specs = searchable_maps(nb, nf)
    if state.num_maps != len(specs):
        raise ValueError(f"state has {state.num_maps} maps; a CResMD with nb={nb} has N={len(specs)}")
    for spec, channels in zip(specs, state.channels):
        if channels != spec.channels:
            raise ValueError(f"map {spec.index} ({spec.name}) has {channels} mask channels, expected {spec.channels}")
    return specs


def masked_flops_breakdown(
    state: MaskState, nf: int = 64, nb: int = 32, height: int = 720, width: int = 1280,
    in_channels: int = 3, out_channels: int = 3,
) -> dict[str, Tensor]:
    """Eq. 9 as executed, per convolution (keys as :func:`cresmd_flops_breakdown`).

    Each value is a 0-dim tensor: int64 when every mask is bool or integer (exact), float64
    otherwise (differentiable with respect to soft masks).
    """
    specs = _check_state(state, nf, nb)
    exact = not any(mask.is_floating_point() for mask in state.masks)
    dtype = torch.int64 if exact else torch.float64
    device = state.masks[0].device
    phi = state.phi.tolist()
    bases = _map_bases(nb, height, width)
    tasks = state.num_tasks

    prev_shared = torch.tensor(in_channels, dtype=dtype, device=device)  # a_0
    prev_tasks = prev_shared.expand(tasks)  # a_{m,0}
    out: dict[str, Tensor] = {}
    for spec, base, is_shared, mask in zip(specs, bases, phi, state.masks):
        if is_shared:
            rows = mask.to(dtype)
            width_n = rows[0].sum() if exact else rows.sum(dim=1).mean()
            out[spec.module] = base * width_n * prev_shared
            prev_shared, prev_tasks = width_n, width_n.expand(tasks)
        else:
            widths = mask.to(dtype).sum(dim=1)
            out[spec.module] = base * (widths * prev_tasks).sum()
            prev_tasks = widths
    last = prev_shared if phi[-1] else prev_tasks.sum()
    out["conv_last"] = bases[-1] * out_channels * last
    return out


def masked_flops(
    state: MaskState, nf: int = 64, nb: int = 32, height: int = 720, width: int = 1280,
    in_channels: int = 3, out_channels: int = 3,
) -> Tensor:
    """Convolution FLOPs of the pruned, partly shared network for the state's M tasks (eq. 9).

    The shared prefix counts once, every task-specific map once per task, the first
    task-specific conv reads the shared map's width, ``conv_last`` counts once when the whole
    network is shared and once per task otherwise. Returns a 0-dim tensor: int64 (exact) for
    bool/integer masks, float64 and differentiable for soft masks.
    """
    return torch.stack(list(masked_flops_breakdown(state, nf, nb, height, width, in_channels, out_channels).values())).sum()


def normalised_flops(
    state: MaskState, nf: int = 64, nb: int = 32, height: int = 720, width: int = 1280,
    in_channels: int = 3, out_channels: int = 3,
) -> Tensor:
    """R1 of docs/method.md: :func:`masked_flops` / :func:`cresmd_flops` for the same M tasks.

    1 for the unpruned, unshared network; 1/M for the unpruned, fully shared one. The result
    has the soft masks' float dtype (float64 for binary masks), so it adds to a loss cleanly.
    """
    flops = masked_flops(state, nf, nb, height, width, in_channels, out_channels)
    reference = cresmd_flops(nf, nb, height, width, state.num_tasks, in_channels, out_channels)
    floats = [mask.dtype for mask in state.masks if mask.is_floating_point()]
    dtype = floats[0] if floats else torch.float64
    return (flops.to(torch.float64) / reference).to(dtype)


def workload_flops(state: MaskState, height: int = 720, width: int = 1280, nf: int = 64, nb: int = 32) -> Tensor:
    """FLOPs of the "27-point workload at 1280x720": one HD image under M task vectors.

    With ``state`` built for the 27 task vectors of CResMD's test grid this is the setting of
    TASNet Table 1 (all 27 outputs of one image, shared prefix once). Identical to
    :func:`masked_flops`; divide by ``state.num_tasks`` for the paper's per-inference average.
    """
    return masked_flops(state, nf, nb, height, width)


__all__ = [
    "KERNEL_SIZE",
    "MapSpec",
    "MaskState",
    "cresmd_flops",
    "cresmd_flops_breakdown",
    "linear_flops",
    "masked_flops",
    "masked_flops_breakdown",
    "normalised_flops",
    "num_searchable_maps",
    "searchable_maps",
    "workload_flops",
]
