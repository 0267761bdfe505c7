"""TASNet: the derived network of a TASNet search (METHOD.md section 3, "Derivation and
fine-tuning"; TASNet section 3.1, Fig. 2b). A plain ``nn.Module``, no Lightning, and no use of
the supernetwork classes: it builds itself from an *architecture* (a JSON-able dict, below) and
loads its weights from a standalone checkpoint (:meth:`TASNet.save` / :meth:`TASNet.load`,
``torch.load(weights_only=True)`` compatible).

Feature maps
------------
The network has CResMD's layout and its ``N = 2 nb + 3`` searchable feature maps
(:func:`cirlab.archs.flops.searchable_maps`; JSON ``index`` n = 1..N, code uses k = n - 1):
``conv_first``, per block ``inner`` (conv1) and ``out`` (conv2 + residual add), the shuffled
``upconv`` output and ``HRconv``; ``conv_last`` (-> 3 channels) and ``global_scale`` follow.
Each map is either

* **shared** (the first ``shared_maps`` maps, phi = 1): a fixed channel list (the search's
  task-agnostic channels). Its convolution is physically that small (weights sliced on the
  output side, and on the input side wherever the input map is fixed too), runs once per image
  and does not depend on the task vector: a block whose output map is shared scales its residual
  by a learned vector ``agnostic_scale`` (the search's, sliced) instead of ``local_scale(t)``;
* **task-specific** with ``selection: "controller"``: the search's controller h_n is kept and
  picks the channels ``{c : h_n(t)_c > 0}`` per task; the convolution weights are stored at full
  width ``nf`` and *sliced per task* (``index_select`` on rows and columns), so a switched-off
  channel costs nothing;
* **task-specific** with ``selection: "fixed"``: a fixed channel list (physically sliced) that
  is still computed once per task (after the first task-dependent operation). CResMD itself
  (:meth:`TASNet.from_cresmd`) and the naive-shared CResMDs (:func:`naive_shared`) use it.

A channel that is off in map n is exactly zero in the search network, so slicing it away gives
the same numbers (up to float summation order); an empty map gives zeros and the next conv
returns its bias. Residual adds align the channel lists of the two maps (channels present only
in the new map start from zero).

Execution
---------
* :meth:`TASNet.restore` (one image, M task vectors): the shared prefix runs **once** (it is
  task-agnostic), then the task-specific part runs per group of tasks whose controllers pick
  identical channels everywhere (one batched pass per group; ``max_batch`` bounds the batch).
* :meth:`TASNet.forward` (B images, B task vectors, training and evaluation): prefix on the B
  images, then the task-specific part either sliced per group ("sliced", evaluation) or at full
  width with the 0/1 channel masks multiplied in ("masked", training: one batched pass whatever
  the mix of tasks; the values and gradients are those of the sliced execution).
* Inference (no autograd) takes a faster route to the same numbers (up to float rounding):
  ReLU, block scale and residual add work in place, a one-task batch folds its block scales and
  ``global_scale`` into the sliced weights, and (eval mode) the sliced weights and the task
  groups are cached per selection, so a workload seen before slices nothing. The cache is
  checked against the parameters' data pointers and version counters on every run and dropped
  by ``train()`` / ``eval()`` and device/dtype moves; see :meth:`TASNet.clear_cache`.
* A pass on a channels_last image stays channels_last throughout: every map and sliced weight
  gets exact channels_last strides (one- and zero-channel maps too, which are also "plain
  contiguous" and would otherwise turn the rest of the pass NCHW), and the residual channel
  alignment and the pixel shuffle work on channels_last rows.

Controller decisions are computed in float32 with autocast disabled, so mixed precision never
flips a channel decision.

Architecture dict (``architecture.json`` has these keys plus an informative ``summary``)::

    {"format": "cirlab.tasnet", "version": 1, "in_nc": 3, "nf": 64, "nb": 32, "cond_dim": 3,
     "controller_hidden": 32, "shared_maps": S,
     "maps": [{"index": 1, "name": "conv_first", "shared": true, "selection": "fixed",
               "channels": [0, 3, ...]},
              {"index": 9, "name": "recon_trunk.3.out", "shared": false, "selection": "controller",
               "channels": null}, ...]}          # N entries, shared ones first

Costs: :meth:`TASNet.flops` / :meth:`TASNet.cost` give the analytic convolution FLOPs of
:meth:`TASNet.restore` for given tasks and image size (the convention of
:mod:`cirlab.archs.flops`: 2 FLOPs per MAC, convolutions only, shared prefix once).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cirlab.archs.cresmd import CResMDNet, init_scaled_kaiming
from cirlab.archs.flops import MaskState, masked_flops, masked_flops_breakdown, searchable_maps

FORMAT = "cirlab.tasnet"  # = cirlab.checkpoints.TASNET_FORMAT (not imported: loading a TASNet stays light)
VERSION = 1
SELECTIONS = ("fixed", "controller")
SLICE_CACHE_BYTES = 256 * 2**20  # inference cache of sliced weights: emptied when it would grow past this


def _plain(value: Any) -> Any:
    """OmegaConf containers -> plain dicts/lists (Hydra passes the architecture as a DictConfig)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, (DictConfig, ListConfig)):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    return value


def receptive_radius(nb: int) -> int:
    """How far (pixels, full resolution) an output pixel of a CResMD-layout network sees.

    ``conv_first`` (3x3, stride 2) reads +-1 pixel, each of the ``2 nb`` trunk convs and ``upconv``
    +-1 half-resolution pixel (2 pixels), ``HRconv`` and ``conv_last`` +-1 pixel each, plus the
    rounding of the stride-2 grid: ``4 nb + 6`` (134 for nb = 32). Tiles whose borders lie at
    least this far from the pixels they keep reproduce the untiled output.
    """
    return 4 * nb + 6


def make_architecture(nf: int, nb: int, cond_dim: int = 3, in_nc: int = 3, controller_hidden: int = 32,
                      shared_maps: int = 0, channels: list[list[int] | None] | None = None) -> dict:
    """An architecture dict (module docstring). ``channels[k]`` is the fixed channel list of map
    k (None: a controller picks them per task; only allowed for task-specific maps); default:
    every map fixed at all ``nf`` channels (CResMD with its first ``shared_maps`` maps shared)."""
    specs = searchable_maps(nb, nf)
    if channels is None:
        channels = [list(range(nf))] * len(specs)
    if len(channels) != len(specs):
        raise ValueError(f"expected {len(specs)} channel entries (one per map), got {len(channels)}")
    maps = []
    for k, (spec, chosen) in enumerate(zip(specs, channels)):
        shared = k < shared_maps
        maps.append({"index": spec.index, "name": spec.name, "shared": shared,
                     "selection": "controller" if chosen is None else "fixed",
                     "channels": None if chosen is None else sorted(int(c) for c in chosen)})
    arch = {"format": FORMAT, "version": VERSION, "in_nc": in_nc, "nf": nf, "nb": nb, "cond_dim": cond_dim,
            "controller_hidden": controller_hidden, "shared_maps": shared_maps, "maps": maps}
    return validate_architecture(arch)


def validate_architecture(architecture: Mapping) -> dict:
    """Check an architecture dict and return its core part (a deep copy, extra keys dropped)."""
    arch = _plain(architecture)
    if not isinstance(arch, Mapping):
        raise ValueError(f"a TASNet architecture must be a dict, got {type(arch).__name__}")
    if arch.get("format") != FORMAT:
        raise ValueError(f"not a TASNet architecture (format {arch.get('format')!r}, expected {FORMAT!r})")
    if int(arch.get("version", -1)) > VERSION:
        raise ValueError(f"TASNet architecture version {arch.get('version')} is newer than this code ({VERSION})")
    core = {key: arch[key] for key in ("in_nc", "nf", "nb", "cond_dim", "controller_hidden", "shared_maps")}
    for key, value in core.items():
        if not isinstance(value, int) or value < 0 or (key != "shared_maps" and value < 1):
            raise ValueError(f"architecture.{key}={value!r} must be a positive integer")
    nf, nb = core["nf"], core["nb"]
    specs = searchable_maps(nb, nf)
    maps = arch.get("maps")
    if not isinstance(maps, (list, tuple)) or len(maps) != len(specs):
        raise ValueError(f"architecture.maps must list the {len(specs)} maps of a CResMD with nb={nb}")
    if core["shared_maps"] > len(specs):
        raise ValueError(f"architecture.shared_maps={core['shared_maps']} exceeds the {len(specs)} maps")
    clean = []
    for k, (spec, entry) in enumerate(zip(specs, maps)):
        where = f"architecture.maps[{k}] ({spec.name})"
        shared, selection, chosen = bool(entry["shared"]), entry["selection"], entry.get("channels")
        if shared != (k < core["shared_maps"]):
            raise ValueError(f"{where}: shared={shared} but the first {core['shared_maps']} maps are the shared ones")
        if selection not in SELECTIONS:
            raise ValueError(f"{where}: selection {selection!r} must be one of {SELECTIONS}")
        if selection == "controller":
            if shared:
                raise ValueError(f"{where}: a shared map has fixed channels, not a controller")
            chosen = None
        else:
            if chosen is None:
                raise ValueError(f"{where}: a fixed map needs its channel list")
            chosen = [int(c) for c in chosen]
            if sorted(set(chosen)) != chosen or any(c < 0 or c >= nf for c in chosen):
                raise ValueError(f"{where}: channels must be distinct, sorted indices in 0..{nf - 1}")
        clean.append({"index": spec.index, "name": spec.name, "shared": shared, "selection": selection, "channels": chosen})
    return {"format": FORMAT, "version": VERSION, **core, "maps": clean}


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


@dataclass
class _Sel:
    """How one map is held at run time: ``index`` physical channels to keep (None: all),
    ``mask`` (B, C) 0/1 multiplier (masked execution) or None, ``logical`` the supernetwork
    channel ids the tensor holds, in order."""

    index: Tensor | None
    mask: Tensor | None
    logical: tuple[int, ...]


def _nhwc(x: Tensor) -> bool:
    """``x`` is a 4-d tensor laid out channels_last (and not also plain contiguous)."""
    return x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _as_nhwc(x: Tensor) -> Tensor:
    """``x`` (N, C, H, W) with the exact channels_last strides: a view when its memory already
    is in that order (always so for one channel), else a copy. oneDNN picks a convolution's
    output layout from these strides, and a one- or zero-channel map with plain strides (which
    is channels_last too, ambiguously) would switch every later convolution of the pass to
    NCHW, about twice as slow on thin maps."""
    batch, channels, height, width = x.shape
    strides = (height * width * channels, 1, width * channels, channels)
    if x.stride() == strides:
        return x
    if x.is_contiguous(memory_format=torch.channels_last):
        return x.as_strided(x.shape, strides)
    return x.new_empty(batch, height, width, channels).permute(0, 3, 1, 2).copy_(x)


def _new_map(like: Tensor, shape: tuple[int, ...], nhwc: bool) -> Tensor:
    """An uninitialised 4-d ``shape`` with ``like``'s dtype and device, channels_last when ``nhwc``."""
    if not nhwc:
        return like.new_empty(shape)
    batch, channels, height, width = shape
    return like.new_empty(batch, height, width, channels).permute(0, 3, 1, 2)


def _rows(x: Tensor) -> Tensor:
    """A channels_last (N, C, H, W) tensor as its (N H W, C) matrix (a view)."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def _select_channels(x: Tensor, index: Tensor) -> Tensor:
    """``x.index_select(1, index)``; on channels_last input a row gather that keeps the layout
    (``index_select`` itself returns NCHW there and is several times slower)."""
    if not _nhwc(x):
        return x.index_select(1, index)
    batch, _, height, width = x.shape
    return _rows(x).index_select(1, index).view(batch, height, width, -1).permute(0, 3, 1, 2)


def _pad_even(x: Tensor) -> Tensor:
    height, width = x.shape[-2:]
    if height % 2 or width % 2:
        return F.pad(x, (0, width % 2, 0, height % 2), mode="replicate")
    return x


class TASNet(nn.Module):
    """The derived TASNet (module docstring). Build with an architecture dict; weights come from
    :meth:`load`, from the derivation (``cirlab.derivation``) or from :meth:`from_cresmd`."""

    def __init__(self, architecture: Mapping) -> None:
        super().__init__()
        arch = validate_architecture(architecture)
        self.architecture = arch
        self.in_nc, self.nf, self.nb, self.cond_dim = arch["in_nc"], arch["nf"], arch["nb"], arch["cond_dim"]
        self.num_maps = 2 * self.nb + 3
        self.shared_maps = arch["shared_maps"]
        maps = arch["maps"]
        self._fixed: list[tuple[int, ...] | None] = [
            None if m["selection"] == "controller" else tuple(m["channels"]) for m in maps]
        width = [self.nf if c is None else len(c) for c in self._fixed]
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
            for k, fixed in enumerate(self._fixed) if fixed is None})
        self._controlled = [k for k, fixed in enumerate(self._fixed) if fixed is None]
        self._index_cache: dict[tuple, Tensor] = {}
        self._align_plans: dict[tuple, tuple] = {}
        self._slice_cache: dict[tuple, tuple[Tensor, ...]] = {}
        self._slice_stamp: tuple | None = None
        self._slice_bytes = 0
        self._inplace = False  # set per run by _begin_run
        self._nhwc_run = False  # set per run from the image's layout: keep every map channels_last
        self._caching = False
        self.prefix_calls = 0  # how many times the shared prefix ran (tests, benchmarks)
        self.execution = "auto"  # forward(): "auto" (masked in training, sliced in eval), "sliced", "masked"

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
        if not self._controlled:
            return {}
        # float32, or float64 after net.double(): the controllers' own precision when higher
        weight_dtype = next(self.controllers[str(self._controlled[0])].parameters()).dtype
        dtype = torch.float64 if weight_dtype == torch.float64 else torch.float32
        with torch.autocast(device_type=tasks.device.type, enabled=False):
            tasks = tasks.to(dtype)
            return {k: self.controllers[str(k)](tasks) > 0 for k in self._controlled}

    def mask_state(self, tasks: Tensor) -> MaskState:
        """The :class:`~cirlab.archs.flops.MaskState` of the M tasks (for the FLOPs formulas)."""
        count = tasks.shape[0]
        masks = self.channel_masks(tasks)
        rows = []
        for k, fixed in enumerate(self._fixed):
            if fixed is None:
                rows.append(masks[k].cpu())
            else:
                row = torch.zeros(self.nf, dtype=torch.bool)
                row[list(fixed)] = True
                rows.append(row.expand(count, -1))
        return MaskState(MaskState.prefix_phi(self.num_maps, self.shared_maps), rows)

    def _tensor(self, values: tuple[int, ...], device: torch.device) -> Tensor:
        key = (values, device)
        cached = self._index_cache.get(key)
        if cached is None:
            cached = torch.tensor(values, dtype=torch.long, device=device)
            if len(self._index_cache) > 4096:
                self._index_cache.clear()
            self._index_cache[key] = cached
        return cached

    def _fixed_sel(self, k: int) -> _Sel:
        if k < 0:
            return _Sel(None, None, tuple(range(self.in_nc)))
        return _Sel(None, None, self._fixed[k])

    def _groups(self, tasks: Tensor, masked: bool) -> list[tuple[Tensor | None, dict[int, _Sel]]]:
        """Partition the rows of ``tasks`` into groups run as one batch, with each map's run-time
        selection. ``masked``: one group, controller maps at full width times their masks."""
        device = tasks.device
        sels = {k: self._fixed_sel(k) for k in range(-1, self.num_maps) if k < 0 or self._fixed[k] is not None}
        if not self._controlled:
            return [(None, sels)]
        self._begin_run()
        key = None
        if self._caching and not masked:  # the same task vectors again: the same groups
            host = tasks.detach().cpu()
            key = ("groups", str(tasks.dtype), str(device), tuple(host.shape), host.numpy().tobytes())
            cached = self._slice_cache.get(key)
            if cached is not None:
                return cached
        masks = self.channel_masks(tasks)
        if masked:
            full = tuple(range(self.nf))
            dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else tasks.dtype
            sels.update({k: _Sel(None, masks[k].to(dtype), full) for k in self._controlled})
            return [(None, sels)]
        stacked = torch.cat([masks[k] for k in self._controlled], dim=1).to(torch.uint8).cpu()
        unique, inverse = torch.unique(stacked, dim=0, return_inverse=True)
        if unique.shape[0] == 1:
            rows_list = [None]
        else:
            rows_list = [torch.nonzero(inverse == g).flatten().to(device) for g in range(unique.shape[0])]
        groups = []
        for g, rows in enumerate(rows_list):
            group_sels = dict(sels)
            for j, k in enumerate(self._controlled):
                on = tuple(torch.nonzero(unique[g, j * self.nf:(j + 1) * self.nf]).flatten().tolist())
                group_sels[k] = _Sel(self._tensor(on, device), None, on)
            groups.append((rows, group_sels))
        if key is not None:
            if len(self._slice_cache) > 65536:
                self._slice_cache.clear()
                self._slice_bytes = 0
            self._slice_cache[key] = groups
        return groups

    # ------------------------------------------------------------------ inference fast path
    def _begin_run(self) -> None:
        """Fix, once per run of the prefix or of the task-specific part, how it executes.

        Without autograd (``torch.no_grad`` / ``inference_mode``) activations are updated in place
        (ReLU, block scale and residual add) and a task-specific block's scale is folded into its
        ``conv2`` weights when the batch is one task. In eval mode without autograd, the weights
        sliced for a channel selection are also cached (:meth:`_sliced`), so a selection seen
        before costs no slicing. The cache is dropped when any parameter was replaced or modified
        in place (its data pointer or version counter changed), when the module changes mode
        (``train()`` / ``eval()``) and when it moves or changes dtype (``to``, ``half``...). Writes
        that bypass the version counter in eval mode (``p.data.copy_``, fused optimisers) must be
        followed by :meth:`clear_cache`.
        """
        self._inplace = not torch.is_grad_enabled()
        self._caching = self._inplace and not self.training
        if self._caching:
            stamp = tuple((p.data_ptr(), p._version) for m in self._cached_modules() for p in m._parameters.values()
                          if p is not None)
            if stamp != self._slice_stamp:
                self._slice_cache.clear()
                self._slice_bytes = 0
                self._slice_stamp = stamp

    def _cached_modules(self) -> list[nn.Module]:
        """The modules whose parameters the inference cache derives from: the task-specific
        convolutions and block scales, ``conv_last`` and the controllers (their decisions)."""
        modules = self.__dict__.get("_cache_modules")
        if modules is None:
            modules = [self.conv_last, *self.controllers.values()]
            for k in range(self.shared_maps, self.num_maps):
                if k <= 2 * self.nb:
                    modules.append(self.conv_first if k == 0 else self.recon_trunk[(k - 1) // 2])
                else:
                    modules.append(self.upconv if k == 2 * self.nb + 1 else self.HRconv)
            modules = list(dict.fromkeys(sub for m in modules for sub in m.modules()))
            self.__dict__["_cache_modules"] = modules
        return modules

    def clear_cache(self) -> None:
        """Forget the sliced weights cached for inference (see :meth:`_begin_run`)."""
        if "_slice_cache" in self.__dict__:
            self._slice_cache.clear()
            self._slice_bytes = 0
            self._slice_stamp = None
            self.__dict__.pop("_cache_modules", None)  # rebuilt on next use (submodules may be replaced)

    def train(self, mode: bool = True) -> TASNet:
        self.clear_cache()
        return super().train(mode)

    def _apply(self, fn, recurse: bool = True):  # .to(), .half(), .cuda(): new parameter tensors
        self.clear_cache()
        return super()._apply(fn, recurse)

    def _sliced(self, key: tuple, build) -> tuple[Tensor, ...]:
        """``build()`` (sliced weights), cached under ``key`` when :attr:`_caching`."""
        if not self._caching:
            return build()
        value = self._slice_cache.get(key)
        if value is None:
            value = tuple(build())
            size = sum(t.numel() * t.element_size() for t in value)
            if self._slice_bytes + size > SLICE_CACHE_BYTES:  # many distinct selections (e.g. a slider)
                self._slice_cache.clear()
                self._slice_bytes = 0
            self._slice_cache[key] = value
            self._slice_bytes += size
        return value

    # ------------------------------------------------------------------ primitives
    def _conv(self, conv: nn.Conv2d, x: Tensor, out_index: Tensor | None, in_index: Tensor | None,
              key: tuple | None = None, scale: Tensor | None = None) -> Tensor:
        """``conv`` restricted to output rows ``out_index`` and input columns ``in_index`` (None:
        all physical ones); ``x`` holds exactly the kept input channels. No output rows: an
        empty tensor; no input channels: the bias (the dense conv of an all-zero input).
        ``key`` names the selection for the sliced-weight cache; ``scale`` (one value per kept
        output row) is folded into the weights and bias (the output times ``scale``)."""
        batch, _, height, width = x.shape
        (kh, kw), (sh, sw), (ph, pw) = conv.kernel_size, conv.stride, conv.padding
        out_h, out_w = (height + 2 * ph - kh) // sh + 1, (width + 2 * pw - kw) // sw + 1
        rows = conv.weight.shape[0] if out_index is None else out_index.numel()
        if rows == 0:
            return _new_map(x, (batch, 0, out_h, out_w), self._nhwc_run)
        if x.shape[1] == 0:
            bias = conv.bias if out_index is None else conv.bias.index_select(0, out_index)
            if scale is not None:
                bias = bias * scale
            bias = bias.to(x.dtype).view(1, -1, 1, 1)
            if not self._inplace:
                return bias.expand(batch, -1, out_h, out_w)
            # in-place callers need their own tensor, in the run's layout
            out = _new_map(x, (batch, rows, out_h, out_w), self._nhwc_run)
            return out.copy_(bias.expand_as(out))
        if self._nhwc_run:
            x = _as_nhwc(x)
        if out_index is None and in_index is None and scale is None:
            return conv(x)  # the module itself: hooks see every unsliced conv

        def build() -> tuple[Tensor, Tensor]:
            weight, bias = conv.weight, conv.bias
            if out_index is not None:
                weight, bias = weight.index_select(0, out_index), bias.index_select(0, out_index)
            if in_index is not None:
                weight = weight.index_select(1, in_index)
            return weight, bias

        if self._nhwc_run:  # oneDNN wants the weights in the input's layout: convert them once, not per call
            sliced = build

            def build() -> tuple[Tensor, Tensor]:
                weight, bias = sliced()
                return _as_nhwc(weight), bias

            key = None if key is None else (*key, "nhwc")
        weight, bias = build() if key is None else self._sliced(key, build)
        if scale is not None:
            weight, bias = weight * scale.to(weight.dtype)[:, None, None, None], bias * scale.to(bias.dtype)
        return F.conv2d(x, weight, bias, conv.stride, conv.padding)

    def _align_plan(self, have: tuple[int, ...], want: tuple[int, ...], device: torch.device) -> tuple:
        """How the channels ``want`` come from a tensor holding ``have``: ``("same",)``,
        ``("select", src)`` (every wanted channel present) or ``("scatter", dst, src)``."""
        key = (have, want, device)
        plan = self._align_plans.get(key)
        if plan is None:
            position = {c: p for p, c in enumerate(have)}
            present = [(p, position[c]) for p, c in enumerate(want) if c in position]
            if have == want:
                plan = ("same",)
            elif len(present) == len(want):
                plan = ("select", self._tensor(tuple(s for _, s in present), device))
            else:
                plan = ("scatter", self._tensor(tuple(d for d, _ in present), device),
                        self._tensor(tuple(s for _, s in present), device))
            if len(self._align_plans) > 4096:
                self._align_plans.clear()
            self._align_plans[key] = plan
        return plan

    def _align(self, x: Tensor, have: tuple[int, ...], want: tuple[int, ...]) -> Tensor:
        """The channels ``want`` of a map whose tensor ``x`` holds channels ``have`` (absent: 0)."""
        plan = self._align_plan(have, want, x.device)
        if plan[0] == "same":
            return x
        if plan[0] == "select":
            return _select_channels(x, plan[1])
        out = _new_map(x, (x.shape[0], len(want), *x.shape[2:]), self._nhwc_run).zero_()
        if plan[1].numel():
            out = out.index_copy(1, plan[1], x.index_select(1, plan[2]))
        return out

    def _add_aligned_(self, y: Tensor, x: Tensor, have: tuple[int, ...], want: tuple[int, ...]) -> Tensor:
        """``y + _align(x, have, want)``, in place into ``y`` where its batch allows."""
        plan = self._align_plan(have, want, x.device)
        if y.shape[0] < x.shape[0]:  # y still holds one row for the whole batch
            return y + self._align(x, have, want)
        if plan[0] == "same":
            return y.add_(x)
        if plan[0] == "select":
            return y.add_(_select_channels(x, plan[1]))
        if not plan[1].numel():
            return y
        if _nhwc(y) and _nhwc(x) and y.shape[0] == x.shape[0]:
            _rows(y).index_add_(1, plan[1], _rows(x).index_select(1, plan[2]))
        else:
            y.index_add_(1, plan[1], x.index_select(1, plan[2]).expand(y.shape[0], -1, -1, -1))
        return y

    @staticmethod
    def _shuffle_grouped(x: Tensor) -> Tensor:
        """``pixel_shuffle(x, 2)`` for a tensor whose channels are ordered (sub-pixel, channel),
        i.e. channel ``(2 i + j) C + c`` goes to channel c at offset (i, j); in channels_last this
        is a copy of contiguous runs (``F.pixel_shuffle`` expects the order (channel, sub-pixel)
        and is several times slower on thin channels_last maps)."""
        batch, channels, height, width = x.shape
        c = channels // 4
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            nhwc = x.permute(0, 2, 3, 1).reshape(batch, height, width, 2, 2, c)
            out = nhwc.permute(0, 1, 3, 2, 4, 5).reshape(batch, 2 * height, 2 * width, c)
            return out.permute(0, 3, 1, 2)
        return x.reshape(batch, 2, 2, c, height, width).permute(0, 3, 4, 1, 5, 2).reshape(batch, c, 2 * height, 2 * width)

    def _produce(self, k: int, values: dict[int, Tensor], sels: dict[int, _Sel], cond: Tensor | None) -> Tensor:
        """Map k from the maps before it."""
        sel, prev = sels[k], sels[k - 1]
        x = values[k - 1]
        nb = self.nb
        key = (k, None if sel.index is None else sel.logical, None if prev.index is None else prev.logical)
        if k == 0:
            y = self._conv(self.conv_first, x, sel.index, None, key)
        elif k <= 2 * nb:
            block = self.recon_trunk[(k - 1) // 2]
            if k % 2 == 1:
                y = self._conv(block.conv1, x, sel.index, prev.index, key)
                y = y.relu_() if self._inplace else F.relu(y)
            else:
                if block.local_scale is None:
                    scale = block.agnostic_scale[None]
                elif sel.index is None:
                    scale = block.local_scale(cond)
                else:
                    weight, bias = self._sliced(("scale", k, sel.logical), lambda: (
                        block.local_scale.weight.index_select(0, sel.index),
                        block.local_scale.bias.index_select(0, sel.index)))
                    scale = F.linear(cond, weight, bias)
                skip, have = values[k - 2], sels[k - 2].logical
                if self._inplace and x.shape[1] == 0:
                    # empty inner map: the residual is conv2's bias, one constant per channel;
                    # one pass over the map (a zero-input conv would be materialised first)
                    bias = block.conv2.bias if sel.index is None else block.conv2.bias.index_select(0, sel.index)
                    y = self._align(skip, have, sel.logical) + (bias * scale).to(x.dtype)[:, :, None, None]
                elif self._inplace:
                    if scale.shape[0] == 1 and (sel.index is not None or prev.index is not None):
                        # one scale vector: fold it into the (already sliced) weights
                        y = self._conv(block.conv2, x, sel.index, prev.index, key, scale=scale[0])
                    else:
                        y = self._conv(block.conv2, x, sel.index, prev.index, key)
                        y = y.mul_(scale[:, :, None, None]) if y.shape[0] >= scale.shape[0] else y * scale[:, :, None, None]
                    y = self._add_aligned_(y, skip, have, sel.logical)
                else:
                    residual = self._conv(block.conv2, x, sel.index, prev.index, key)
                    # the conv output first: the sum keeps its memory format (channels_last stays so)
                    y = residual * scale[:, :, None, None] + self._align(skip, have, sel.logical)
        elif k == 2 * nb + 1:
            if sel.index is None:
                y = self.pixel_shuffle(self._conv(self.upconv, x, None, prev.index, key))
                y = y.relu_() if self._inplace else F.relu(y)
            else:
                # rows ordered (sub-pixel, channel): the shuffle is a plain strided copy
                index = sel.index
                rows = (torch.arange(4, device=index.device)[:, None] + 4 * index[None, :]).reshape(-1)
                y = self._conv(self.upconv, x, rows, prev.index, key)
                y = self._shuffle_grouped(y.relu_() if self._inplace else F.relu(y))  # ReLU commutes with it
        else:
            y = self._conv(self.HRconv, x, sel.index, prev.index, key)
            y = y.relu_() if self._inplace else F.relu(y)
        if sel.mask is not None:
            y = y * sel.mask[:, :, None, None]
        return y

    # ------------------------------------------------------------------ the two parts
    def run_prefix(self, padded: Tensor) -> dict[int, Tensor]:
        """The shared prefix on even-sized images (B, in_nc, H, W): the last two shared maps
        (what the task-specific part reads), plus ``"y"`` (conv_last's output) when every map
        is shared. Task vectors play no part. Counted in ``prefix_calls``."""
        self.prefix_calls += 1
        self._begin_run()
        self._nhwc_run = _nhwc(padded)
        values: dict[Any, Tensor] = {-1: padded}
        sels = {k: self._fixed_sel(k) for k in range(-1, self.shared_maps)}
        for k in range(self.shared_maps):
            values[k] = self._produce(k, values, sels, None)
            values.pop(k - 2, None)
        if self.shared_maps == self.num_maps:
            values["y"] = self._conv(self.conv_last, values[self.num_maps - 1], None, None)
        values.pop(-1, None)
        return values

    def run_specific(self, prefix: dict, padded: Tensor, cond: Tensor, sels: dict[int, _Sel]) -> Tensor:
        """The task-specific part for a batch: ``prefix`` from :meth:`run_prefix` (batch 1 or
        B), ``padded`` the images (batch 1 or B), ``cond`` (B, cond_dim) -> (B, 3, H, W).
        Batch-1 inputs of convolutions are repeated per task (every task's convolutions run, as
        :meth:`flops` counts them); the image itself is only broadcast in the final sum."""
        self._begin_run()
        self._nhwc_run = _nhwc(padded)
        batch = cond.shape[0]

        def rows(t: Tensor) -> Tensor:
            if t.shape[0] != 1 or batch == 1:
                return t
            if self._nhwc_run and t.ndim == 4:
                return _as_nhwc(t.expand(batch, *t.shape[1:]).contiguous(memory_format=torch.channels_last))
            return t.expand(batch, *t.shape[1:])

        values: dict[Any, Tensor] = {k: v for k, v in prefix.items() if k != "y"}
        if self.shared_maps > 0 and self.shared_maps < self.num_maps:  # the first specific conv's input
            values[self.shared_maps - 1] = rows(values[self.shared_maps - 1])
        values[-1] = rows(padded) if self.shared_maps == 0 else padded
        y = prefix.get("y")
        global_scale = self.global_scale(cond)[:, :, None, None]
        if y is None:
            for k in range(self.shared_maps, self.num_maps):
                values[k] = self._produce(k, values, sels, cond)
                if k - 2 >= 0:
                    values.pop(k - 2, None)
            last = sels[self.num_maps - 1]
            key = ("conv_last", None if last.index is None else last.logical)
            if self._inplace and cond.shape[0] == 1 and last.index is not None:
                y = self._conv(self.conv_last, values[self.num_maps - 1], None, last.index, key,
                               scale=global_scale[0, :, 0, 0])
                return y.add_(padded) if y.shape[0] >= padded.shape[0] else y + padded
            y = self._conv(self.conv_last, values[self.num_maps - 1], None, last.index, key)
        return padded + y * global_scale

    # ------------------------------------------------------------------ public calls
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
        height, width = x.shape[-2:]
        padded = _pad_even(x)
        masked = self.execution == "masked" or (self.execution == "auto" and self.training)
        prefix = self.run_prefix(padded)
        groups = self._groups(task, masked)
        if len(groups) == 1:
            out = self.run_specific(prefix, padded, task, groups[0][1])
        else:
            out = padded.new_empty(padded.shape[0], self.in_nc, *padded.shape[2:])
            for rows, sels in groups:
                part = {k: v.index_select(0, rows) for k, v in prefix.items()}
                result = self.run_specific(part, padded.index_select(0, rows), task.index_select(0, rows), sels)
                out = out.index_copy(0, rows, result.to(out.dtype))
        return out[..., :height, :width]

    def restore(self, image: Tensor, tasks: Tensor, max_batch: int | None = None) -> Tensor:
        """One image (3, H, W) or (1, 3, H, W) under M task vectors (M, cond_dim) -> (M, 3, H, W).

        The shared prefix runs once; the task-specific part once per group of tasks with the
        same channels (batched, at most ``max_batch`` tasks per pass), with sliced weights.
        Not clamped. For tiling and mixed precision use :func:`cirlab.inference.restore`.
        """
        image = image[None] if image.ndim == 3 else image
        if image.shape[0] != 1:
            raise ValueError(f"restore() takes one image; got a batch of {image.shape[0]}")
        if image.ndim == 4 and image.is_contiguous(memory_format=torch.channels_last) and image.stride(0) != image[0].numel():
            image = image.clone(memory_format=torch.channels_last)  # an HWC view: keep the convs in NHWC
        self._check_input(image, tasks, pairs=False)
        height, width = image.shape[-2:]
        padded = _pad_even(image)
        prefix = self.run_prefix(padded)
        count = tasks.shape[0]
        out = None
        for rows, sels in self._groups(tasks, masked=False):
            rows = torch.arange(count, device=tasks.device) if rows is None else rows
            for chunk in rows.split(max_batch or count):
                result = self.run_specific(prefix, padded, tasks.index_select(0, chunk), sels)
                if out is None:
                    out = result.new_empty(count, *result.shape[1:])
                out[chunk] = result
        return out[..., :height, :width]

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


def naive_shared(nf: int = 64, nb: int = 32, cond_dim: int = 3, in_nc: int = 3, out_nc: int = 3,
                 shared_fraction: float = 0.0, shared_maps: int | None = None,
                 reference_task: float = 0.5) -> TASNet:
    """CResMD with its first layers naively shared (TASNet Table 4), freshly initialised.

    ``shared_fraction`` counts CResMD's ``2 nb + 4`` convolutions (``conv_first``, the trunk,
    ``upconv``, ``HRconv``, ``conv_last``): the first ``round(fraction * (2 nb + 4))`` maps are
    shared, at most all ``2 nb + 3`` (``conv_last`` then runs once and only ``global_scale(t)``
    stays per task). For nb = 32: 31% -> 21, 62% -> 42, 99% -> 67 maps. Shared blocks are
    unconditioned: scaled by a learned vector, initialised like CResMD's ``local_scale`` at
    ``t = reference_task``. Usable as a Hydra ``_target_`` (``model.net``).
    """
    if in_nc != out_nc:
        raise ValueError(f"in_nc={in_nc} must equal out_nc={out_nc}")
    maps = 2 * nb + 3
    if shared_maps is None:
        if not 0.0 <= shared_fraction <= 1.0:
            raise ValueError(f"model.net.shared_fraction={shared_fraction} must be in [0, 1]")
        shared_maps = min(maps, math.floor(shared_fraction * (maps + 1) + 0.5))
    net = TASNet(make_architecture(nf, nb, cond_dim, in_nc, shared_maps=shared_maps))
    reference = torch.full((1, cond_dim), float(reference_task))
    with torch.no_grad():
        for block in net.recon_trunk:
            if block.agnostic_scale is not None:
                fresh = nn.Linear(cond_dim, nf)
                init_scaled_kaiming([fresh])
                block.agnostic_scale.copy_(fresh(reference)[0, : block.agnostic_scale.numel()])
    return net


__all__ = ["FORMAT", "TASNet", "TaskController", "make_architecture", "naive_shared", "receptive_radius",
           "validate_architecture"]
