"""TASNet: the network derived from a TASNet search (docs/method.md section 3, "Derivation and
fine-tuning"; TASNet section 3.1, Fig. 2b). A plain ``nn.Module`` with CResMD's layout, built
from an architecture dict (:mod:`cirlab.archs.tasnet_spec`: which maps are shared, which
channels each keeps) and executed by its :class:`~cirlab.archs.tasnet_runtime.SlicedRuntime`.

* Layers: a shared map's convolution is physically that small (fixed channels, computed once per
  image) and a block whose output map is shared is scaled by a learned ``agnostic_scale``
  instead of ``local_scale(t)``; a controller map keeps its controller h_n (channel c on where
  ``h_n(t)_c > 0``) and full-width weights, sliced per task at run time.
* ``forward(x (B, 3, H, W), task (B, cond_dim)) -> (B, 3, H, W)``; ``restore(image, tasks (M,
  cond_dim)) -> (M, 3, H, W)`` runs the shared prefix once for the M tasks. Images in [0, 1],
  task vectors in [0, 1]^cond_dim, any H, W (odd sizes padded, replicate, and cropped back),
  outputs not clamped. Channel decisions are taken in float32 with autocast off.
* Checkpoint (:meth:`TASNet.save` / :meth:`TASNet.load`): ``{"format": "cirlab.tasnet",
  "version", "architecture", "state_dict", "meta"}``, plain containers and tensors
  (read with ``weights_only`` through :mod:`cirlab.checkpoints`), loadable without the search code.
* Costs (:meth:`TASNet.flops`, :meth:`TASNet.cost`): analytic convolution FLOPs of
  :meth:`TASNet.restore`, convention of :mod:`cirlab.archs.flops` (2 FLOPs per MAC, shared
  prefix once).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cirlab.archs.common import init_scaled_kaiming
from cirlab.archs.cresmd import CResMDNet
from cirlab.archs.flops import MaskState, masked_flops, masked_flops_breakdown, searchable_maps
from cirlab.archs.tasnet_runtime import SlicedRuntime
from cirlab.archs.tasnet_spec import (
    FORMAT,
    VERSION,
    fixed_channels,
    make_architecture,
    receptive_radius,
    validate_architecture,
)


class TaskController(nn.Module):
    """h_n: task vectors (M, cond_dim) -> channel importance (M, nf); channel c is on where > 0.
    Same layout (``fc1``, ``fc2``) as the search's controllers, so their weights copy over."""

    def __init__(self, cond_dim: int, channels: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cond_dim, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, task: Tensor) -> Tensor:
        return self.fc2(F.relu(self.fc1(task)))


class DerivedBlock(nn.Module):
    """One residual block: ``conv1`` -> inner map, ``conv2`` + residual -> output map, scaled by
    ``local_scale(t)`` (task-specific output) or ``agnostic_scale`` (shared output)."""

    def __init__(self, in_ch: int, inner_ch: int, out_ch: int, cond_dim: int, shared_out: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, inner_ch, 3, 1, 1, bias=True)
        self.conv2 = nn.Conv2d(inner_ch, out_ch, 3, 1, 1, bias=True)
        if shared_out:
            self.local_scale = None
            self.agnostic_scale = nn.Parameter(torch.zeros(out_ch))
        else:
            self.local_scale = nn.Linear(cond_dim, out_ch, bias=True)
            self.register_parameter("agnostic_scale", None)


class TASNet(nn.Module):
    """The derived TASNet (module docstring). Build with an architecture dict; weights come from
    :meth:`load`, from the derivation (``cirlab.derivation``) or from :meth:`from_cresmd`.

    ``fixed_channels[k]`` is map k's fixed channel tuple, or None where the controller
    ``controllers[str(k)]`` picks them (``controlled_maps`` lists those k). ``execution`` sets how
    :meth:`forward` runs the task-specific part: ``"auto"`` (masked in training, sliced in
    eval), ``"sliced"`` or ``"masked"``. ``runtime`` executes the network and holds its caches.
    """

    def __init__(self, architecture: Mapping) -> None:
        super().__init__()
        arch = validate_architecture(architecture)
        self.architecture = arch
        self.in_nc, self.nf, self.nb, self.cond_dim = arch["in_nc"], arch["nf"], arch["nb"], arch["cond_dim"]
        self.num_maps = 2 * self.nb + 3
        self.shared_maps = arch["shared_maps"]
        maps = arch["maps"]
        self.fixed_channels = fixed_channels(arch)
        width = [self.nf if c is None else len(c) for c in self.fixed_channels]
        nb, cond_dim = self.nb, self.cond_dim
        with warnings.catch_warnings():  # empty maps make zero-size weights ("no-op init" warning)
            warnings.simplefilter("ignore", UserWarning)
            self.conv_first = nn.Conv2d(self.in_nc, width[0], 3, 2, 1, bias=True)
            self.recon_trunk = nn.ModuleList(
                DerivedBlock(width[2 * i], width[2 * i + 1], width[2 * i + 2], cond_dim, maps[2 * i + 2]["shared"])
                for i in range(nb))
            self.upconv = nn.Conv2d(width[2 * nb], 4 * width[2 * nb + 1], 3, 1, 1, bias=True)
            self.pixel_shuffle = nn.PixelShuffle(2)
            self.HRconv = nn.Conv2d(width[2 * nb + 1], width[2 * nb + 2], 3, 1, 1, bias=True)
            self.conv_last = nn.Conv2d(width[-1], self.in_nc, 3, 1, 1, bias=True)
            self.global_scale = nn.Linear(cond_dim, self.in_nc, bias=True)
            init_scaled_kaiming([self.conv_first, self.recon_trunk, self.upconv, self.HRconv, self.conv_last,
                                 self.global_scale])
        self.controllers = nn.ModuleDict({
            str(k): TaskController(cond_dim, self.nf, arch["controller_hidden"])
            for k, fixed in enumerate(self.fixed_channels) if fixed is None})
        self.controlled_maps = [k for k, fixed in enumerate(self.fixed_channels) if fixed is None]
        self.execution = "auto"
        self.runtime = SlicedRuntime(self)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_cresmd(cls, net: CResMDNet, shared_maps: int = 0, reference_task: Tensor | float = 0.5) -> TASNet:
        """CResMD as a TASNet (every map fixed at full width), its first ``shared_maps`` maps
        shared: a shared block is scaled by ``local_scale(reference_task)`` (naive sharing,
        unconditioned). ``shared_maps=0`` computes exactly what ``net`` computes."""
        arch = make_architecture(net.nf, net.nb, net.cond_dim, net.in_nc, shared_maps=shared_maps)
        tasnet = cls(arch)
        state = dict(net.state_dict())
        reference = torch.as_tensor(reference_task, dtype=torch.float32).expand(1, net.cond_dim)
        for i, block in enumerate(net.recon_trunk):
            if tasnet.recon_trunk[i].local_scale is None:
                del state[f"recon_trunk.{i}.local_scale.weight"], state[f"recon_trunk.{i}.local_scale.bias"]
                with torch.no_grad():
                    state[f"recon_trunk.{i}.agnostic_scale"] = block.local_scale(reference.to(block.local_scale.weight))[0]
        tasnet.load_state_dict(state, strict=True)
        return tasnet

    @classmethod
    def from_json(cls, path: str | Path) -> TASNet:
        """A freshly initialised TASNet of the architecture in ``architecture.json``."""
        import json

        return cls(json.loads(Path(path).read_text()))

    # ------------------------------------------------------------------ persistence
    def checkpoint(self, meta: Mapping | None = None) -> dict:
        """The standalone checkpoint: plain containers and tensors only (``weights_only`` loads it)."""
        state = {key: value.detach().cpu().clone() for key, value in self.state_dict().items()}
        return {"format": FORMAT, "version": VERSION, "architecture": copy.deepcopy(self.architecture),
                "state_dict": state, "meta": dict(meta or {})}

    def save(self, path: str | Path, meta: Mapping | None = None) -> Path:
        """Write :meth:`checkpoint` atomically to ``path``."""
        from cirlab.checkpoints import save_torch_file

        return save_torch_file(self.checkpoint(meta), path)

    @classmethod
    def from_checkpoint(cls, checkpoint: Mapping) -> TASNet:
        if checkpoint.get("format") != FORMAT:
            raise ValueError(f"not a standalone TASNet checkpoint (format {checkpoint.get('format')!r})")
        net = cls(checkpoint["architecture"])
        net.load_state_dict(checkpoint["state_dict"], strict=True)
        return net

    @classmethod
    def load(cls, path: str | Path, map_location: str | torch.device = "cpu") -> TASNet:
        """Rebuild a TASNet from a file written by :meth:`save` (``weights_only=True``)."""
        from cirlab.checkpoints import read_checkpoint

        return cls.from_checkpoint(read_checkpoint(path, what="standalone TASNet checkpoint")).to(map_location)

    # ------------------------------------------------------------------ description
    def map_is_shared(self, k: int) -> bool:
        return k < self.shared_maps

    def receptive_radius(self) -> int:
        return receptive_radius(self.nb)

    def extra_repr(self) -> str:
        return f"nf={self.nf}, nb={self.nb}, shared_maps={self.shared_maps}/{self.num_maps}, controllers={len(self.controllers)}"

    # ------------------------------------------------------------------ selection
    def channel_masks(self, tasks: Tensor) -> dict[int, Tensor]:
        """{k: (M, nf) bool} for every controller map: channel c of map k is on for task m.
        float32, autocast off: mixed precision never changes a decision."""
        if not self.controlled_maps:
            return {}
        # float32, or float64 after net.double(): the controllers' own precision when higher
        weight_dtype = next(self.controllers[str(self.controlled_maps[0])].parameters()).dtype
        dtype = torch.float64 if weight_dtype == torch.float64 else torch.float32
        with torch.autocast(device_type=tasks.device.type, enabled=False):
            tasks = tasks.to(dtype)
            return {k: self.controllers[str(k)](tasks) > 0 for k in self.controlled_maps}

    def mask_state(self, tasks: Tensor) -> MaskState:
        """The :class:`~cirlab.archs.flops.MaskState` of the M tasks (for the FLOPs formulas)."""
        count = tasks.shape[0]
        masks = self.channel_masks(tasks)
        rows = []
        for k, fixed in enumerate(self.fixed_channels):
            if fixed is None:
                rows.append(masks[k].cpu())
            else:
                row = torch.zeros(self.nf, dtype=torch.bool)
                row[list(fixed)] = True
                rows.append(row.expand(count, -1))
        return MaskState(MaskState.prefix_phi(self.num_maps, self.shared_maps), rows)

    # ------------------------------------------------------------------ running
    def _check_input(self, x: Tensor, cond: Tensor, pairs: bool) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_nc:
            raise ValueError(f"expected images of shape (B, {self.in_nc}, H, W), got {tuple(x.shape)}")
        if cond.ndim != 2 or cond.shape[1] != self.cond_dim or (pairs and cond.shape[0] != x.shape[0]):
            size = x.shape[0] if pairs else "M"
            raise ValueError(f"expected task vectors of shape ({size}, {self.cond_dim}), got {tuple(cond.shape)}")

    def forward(self, x: Tensor, task: Tensor) -> Tensor:
        """Restore images x (B, 3, H, W) under their own task vectors (B, cond_dim) -> (B, 3, H, W),
        not clamped; any H, W (odd sizes are padded, replicate, and cropped back)."""
        self._check_input(x, task, pairs=True)
        masked = self.execution == "masked" or (self.execution == "auto" and self.training)
        return self.runtime.forward(x, task, masked)

    def restore(self, image: Tensor, tasks: Tensor, max_batch: int | None = None) -> Tensor:
        """One image (3, H, W) or (1, 3, H, W) under M task vectors (M, cond_dim) -> (M, 3, H, W).

        The shared prefix runs once; the task-specific part once per group of tasks with the
        same channels (batched, at most ``max_batch`` tasks per pass), with sliced weights.
        Not clamped. For tiling and mixed precision use :func:`cirlab.inference.restore`.
        """
        image = image[None] if image.ndim == 3 else image
        if image.shape[0] != 1:
            raise ValueError(f"restore() takes one image; got a batch of {image.shape[0]}")
        self._check_input(image, tasks, pairs=False)
        return self.runtime.restore(image, tasks, max_batch)

    # ------------------------------------------------------------------ inference cache
    def clear_cache(self) -> None:
        """Forget the sliced weights cached for inference (:meth:`SlicedRuntime.begin_run` says
        when that is needed: after writing weights through ``p.data`` in eval mode)."""
        runtime = self.__dict__.get("runtime")
        if runtime is not None:
            runtime.clear_cache()

    def train(self, mode: bool = True) -> TASNet:
        self.clear_cache()
        return super().train(mode)

    def _apply(self, fn, recurse: bool = True):  # .to(), .half(), .cuda(): new parameter tensors
        self.clear_cache()
        return super()._apply(fn, recurse)

    # ------------------------------------------------------------------ costs
    def _prefix_modules(self) -> set[str]:
        names = {spec.module for spec in searchable_maps(self.nb, self.nf)[: self.shared_maps]}
        return names | ({"conv_last"} if self.shared_maps == self.num_maps else set())

    def flops(self, tasks: Tensor, height: int, width: int) -> int:
        """Convolution FLOPs of :meth:`restore` for one (height x width) image and these M task
        vectors: shared prefix once, task-specific part per task (cirlab.archs.flops convention)."""
        with torch.no_grad():
            state = self.mask_state(tasks)
        return int(masked_flops(state, self.nf, self.nb, height, width, self.in_nc, self.in_nc))

    def cost(self, tasks: Tensor, height: int, width: int) -> dict:
        """FLOPs split as TASNet's eq. 2: ``{"shared": prefix once, "per_task": [M ints],
        "total": shared + sum(per_task)}`` (equals :meth:`flops`)."""
        with torch.no_grad():
            state = self.mask_state(tasks)
        prefix = self._prefix_modules()
        per_task, shared = [], 0
        for m in range(state.num_tasks):
            single = MaskState(state.phi, [mask[m : m + 1] for mask in state.masks])
            parts = masked_flops_breakdown(single, self.nf, self.nb, height, width, self.in_nc, self.in_nc)
            per_task.append(int(sum(int(v) for name, v in parts.items() if name not in prefix)))
            shared = int(sum(int(v) for name, v in parts.items() if name in prefix))
        return {"shared": shared, "per_task": per_task, "total": shared + sum(per_task)}


# [choice] TASNet Table 4's naive-sharing variants, keyed by the paper's "% shared layers"
# label, are defined by the paper's own FLOPs for them (per inference on the 27-point workload,
# of CResMD's 189.1 G): 132.0, 69.5 and 7.0 G. Counting CResMD's 2 nb + 4 = 68 convolutions
# instead (31% -> 21, 62% -> 42 maps) gives 0.733 and 0.453 of CResMD's FLOPs, and no count of
# layers reproduces 0.698 and 0.368; the maps whose FLOPs match are 24, 48 and 67 at nb = 32.
TABLE4_FLOPS = {0.31: 132.0 / 189.1, 0.62: 69.5 / 189.1, 0.99: 7.0 / 189.1}


def naive_flops_fraction(nf: int, nb: int, shared_maps: int, tasks: int = 27, height: int = 720,
                         width: int = 1280) -> float:
    """FLOPs of CResMD with its first ``shared_maps`` maps shared (computed once for ``tasks``
    task vectors) over CResMD's for the same tasks, on one ``height x width`` image."""
    from cirlab.archs.flops import cresmd_flops

    maps = 2 * nb + 3
    if not 0 <= shared_maps <= maps:
        raise ValueError(f"shared_maps={shared_maps} must be in [0, {maps}]")
    phi = torch.arange(maps) < shared_maps
    state = MaskState(phi=phi, masks=[torch.ones(tasks, nf, dtype=torch.bool) for _ in range(maps)])
    return float(masked_flops(state, nf, nb, height, width)) / float(cresmd_flops(nf, nb, height, width, tasks=tasks))


def maps_for_flops_fraction(nf: int, nb: int, flops_fraction: float, tasks: int = 27) -> int:
    """The number of shared maps whose :func:`naive_flops_fraction` is closest to ``flops_fraction``
    (ties: fewer maps)."""
    if not 0.0 < flops_fraction <= 1.0:
        raise ValueError(f"model.net.flops_fraction={flops_fraction} must be in (0, 1]")
    costs = [naive_flops_fraction(nf, nb, s, tasks) for s in range(2 * nb + 4)]
    return min(range(len(costs)), key=lambda s: (abs(costs[s] - flops_fraction), s))


def table4_shared_maps(nf: int, nb: int, label: float) -> int:
    """Shared maps of Table 4's naive variant ``label`` (0.31, 0.62 or 0.99): FLOPs as the paper's."""
    key = round(float(label), 2)
    if key not in TABLE4_FLOPS:
        raise ValueError(f"{label}: Table 4's naive-sharing variants are {sorted(TABLE4_FLOPS)}")
    return maps_for_flops_fraction(nf, nb, TABLE4_FLOPS[key])


def naive_shared(nf: int = 64, nb: int = 32, cond_dim: int = 3, in_nc: int = 3, out_nc: int = 3,
                 shared_fraction: float | None = None, shared_maps: int | None = None,
                 flops_fraction: float | None = None, reference_task: float = 0.5) -> TASNet:
    """CResMD with its first layers naively shared (TASNet Table 4), freshly initialised.

    How many maps are shared, exactly one of:

    * ``flops_fraction`` (Table 4's variants, ``TABLE4_FLOPS``): the number of maps whose FLOPs
      on the 27-point workload, over CResMD's, is closest to it (:func:`maps_for_flops_fraction`;
      nb = 32: 0.698 -> 24, 0.368 -> 48, 0.037 -> 67 maps);
    * ``shared_maps``: that number;
    * ``shared_fraction``: a fraction of CResMD's ``2 nb + 4`` convolutions (``conv_first``, the
      trunk, ``upconv``, ``HRconv``, ``conv_last``), ``round(fraction * (2 nb + 4))`` maps, at
      most all ``2 nb + 3`` (``conv_last`` then runs once and only ``global_scale(t)`` stays
      per task); nb = 32: 0.31 -> 21, 0.62 -> 42.

    Shared blocks are unconditioned: scaled by a learned vector, initialised like CResMD's
    ``local_scale`` at ``t = reference_task``. Usable as a Hydra ``_target_`` (``model.net``).
    """
    if in_nc != out_nc:
        raise ValueError(f"in_nc={in_nc} must equal out_nc={out_nc}")
    given = [k for k, v in (("flops_fraction", flops_fraction), ("shared_maps", shared_maps),
                            ("shared_fraction", shared_fraction)) if v is not None]
    if len(given) > 1:
        raise ValueError(f"model.net: give one of flops_fraction, shared_maps, shared_fraction (got {', '.join(given)})")
    maps = 2 * nb + 3
    if flops_fraction is not None:
        shared_maps = maps_for_flops_fraction(nf, nb, flops_fraction)
    elif shared_maps is None:
        fraction = 0.0 if shared_fraction is None else shared_fraction
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"model.net.shared_fraction={fraction} must be in [0, 1]")
        shared_maps = min(maps, math.floor(fraction * (maps + 1) + 0.5))
    net = TASNet(make_architecture(nf, nb, cond_dim, in_nc, shared_maps=shared_maps))
    reference = torch.full((1, cond_dim), float(reference_task))
    with torch.no_grad():
        for block in net.recon_trunk:
            if block.agnostic_scale is not None:
                fresh = nn.Linear(cond_dim, nf)
                init_scaled_kaiming([fresh])
                block.agnostic_scale.copy_(fresh(reference)[0, : block.agnostic_scale.numel()])
    return net


# FORMAT, make_architecture and receptive_radius are re-exported from tasnet_spec (long-standing import path)
__all__ = ["FORMAT", "TABLE4_FLOPS", "DerivedBlock", "TASNet", "TaskController", "make_architecture", "maps_for_flops_fraction",
           "naive_flops_fraction", "naive_shared", "receptive_radius", "table4_shared_maps"]
