"""How a :class:`~cirlab.archs.tasnet.TASNet` executes: the shared prefix once, the task-specific
part per group of tasks with weights sliced to each group's channels, and the cache of those
sliced weights. Each TASNet owns one :class:`SlicedRuntime` (``net.runtime``).

* Prefix: the first ``shared_maps`` maps, task-agnostic, once per image batch
  (:meth:`SlicedRuntime.run_prefix`).
* Task-specific part (:meth:`SlicedRuntime.run_specific`): tasks whose controllers pick the same
  channels in every map form a group run as one batch; a controller map's convolutions are
  sliced (``index_select`` on weight rows and columns), so a switched-off channel costs nothing.
  Training uses the "masked" execution instead: full width times the 0/1 channel masks, one
  batch whatever the tasks, with the values and gradients of the sliced one.
* Equivalence: an off channel is exactly zero in the search network, so the outputs equal the
  masked network's up to float summation order. An empty map gives zeros (the next conv
  returns its bias); residual adds align the channel lists of their two maps.
* Without autograd, ReLU, block scale and residual add work in place and a one-task batch folds
  its block scale and ``global_scale`` into the sliced weights. In eval mode without autograd the
  sliced weights and task groups are also cached per selection (at most
  :data:`SLICE_CACHE_BYTES`; see :meth:`SlicedRuntime.begin_run` for when it is dropped).
* Layout: a pass on a channels_last image stays channels_last (every map and sliced weight gets
  exact channels_last strides), which oneDNN runs about twice as fast on thin maps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cirlab.archs.common import pad_to_even

if TYPE_CHECKING:
    from cirlab.archs.tasnet import TASNet

SLICE_CACHE_BYTES = 256 * 2**20  # inference cache of sliced weights: emptied when it would grow past this


@dataclass
class Selection:
    """How one map is held at run time: ``index`` physical channels to keep (None: all),
    ``mask`` (B, C) 0/1 multiplier (masked execution) or None, ``logical`` the supernetwork
    channel ids the tensor holds, in order."""

    index: Tensor | None
    mask: Tensor | None
    logical: tuple[int, ...]


# ---------------------------------------------------------------------------- channels_last helpers
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


def pixel_shuffle_grouped(x: Tensor) -> Tensor:
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


# ---------------------------------------------------------------------------- the runtime
class SlicedRuntime:
    """Executes one TASNet (module docstring) and holds its inference caches.

    ``cache`` maps a selection key to its sliced weights (or, under ``("groups", ...)`` keys, to
    the task groups of a tensor of task vectors); ``cache_bytes`` is the size of the weights in
    it. ``prefix_calls`` counts the runs of the shared prefix (tests, benchmarks).
    """

    def __init__(self, net: TASNet) -> None:
        self.net = net
        self.cache: dict[tuple, Any] = {}
        self.cache_bytes = 0
        self.prefix_calls = 0
        self._cache_stamp: tuple | None = None
        self._cache_modules: list[nn.Module] | None = None
        self._index_cache: dict[tuple, Tensor] = {}
        self._align_plans: dict[tuple, tuple] = {}
        self._inplace = False  # set per run by begin_run
        self._nhwc_run = False  # set per run from the image's layout: keep every map channels_last
        self._caching = False

    # ------------------------------------------------------------------ cache
    def begin_run(self) -> None:
        """Fix, once per run of the prefix or of the task-specific part, how it executes.

        Without autograd (``torch.no_grad`` / ``inference_mode``) activations are updated in place
        (ReLU, block scale and residual add) and a task-specific block's scale is folded into its
        ``conv2`` weights when the batch is one task. In eval mode without autograd, the weights
        sliced for a channel selection are also cached (:meth:`_sliced`), so a selection seen
        before costs no slicing. The cache is dropped when any parameter was replaced or modified
        in place (its data pointer or version counter changed), when the module changes mode
        (``train()`` / ``eval()``) and when it moves or changes dtype (``to``, ``half``...). Writes
        that bypass the version counter in eval mode (``p.data.copy_``, fused optimisers) must be
        followed by :meth:`clear_cache` (``net.clear_cache()``).
        """
        self._inplace = not torch.is_grad_enabled()
        self._caching = self._inplace and not self.net.training
        if self._caching:
            stamp = tuple((p.data_ptr(), p._version) for m in self._cached_modules() for p in m._parameters.values()
                          if p is not None)
            if stamp != self._cache_stamp:
                self.cache.clear()
                self.cache_bytes = 0
                self._cache_stamp = stamp

    def _cached_modules(self) -> list[nn.Module]:
        """The modules whose parameters the inference cache derives from: the task-specific
        convolutions and block scales, ``conv_last`` and the controllers (their decisions)."""
        modules = self._cache_modules
        if modules is None:
            net = self.net
            modules = [net.conv_last, *net.controllers.values()]
            for k in range(net.shared_maps, net.num_maps):
                if k <= 2 * net.nb:
                    modules.append(net.conv_first if k == 0 else net.recon_trunk[(k - 1) // 2])
                else:
                    modules.append(net.upconv if k == 2 * net.nb + 1 else net.HRconv)
            modules = list(dict.fromkeys(sub for m in modules for sub in m.modules()))
            self._cache_modules = modules
        return modules

    def clear_cache(self) -> None:
        """Forget the sliced weights and task groups cached for inference (see :meth:`begin_run`)."""
        self.cache.clear()
        self.cache_bytes = 0
        self._cache_stamp = None
        self._cache_modules = None  # rebuilt on next use (submodules may be replaced)

    def _sliced(self, key: tuple, build) -> tuple[Tensor, ...]:
        """``build()`` (sliced weights), cached under ``key`` when :attr:`_caching`."""
        if not self._caching:
            return build()
        value = self.cache.get(key)
        if value is None:
            value = tuple(build())
            size = sum(t.numel() * t.element_size() for t in value)
            if self.cache_bytes + size > SLICE_CACHE_BYTES:  # many distinct selections (e.g. a slider)
                self.cache.clear()
                self.cache_bytes = 0
            self.cache[key] = value
            self.cache_bytes += size
        return value

    # ------------------------------------------------------------------ selection
    def _tensor(self, values: tuple[int, ...], device: torch.device) -> Tensor:
        key = (values, device)
        cached = self._index_cache.get(key)
        if cached is None:
            cached = torch.tensor(values, dtype=torch.long, device=device)
            if len(self._index_cache) > 4096:
                self._index_cache.clear()
            self._index_cache[key] = cached
        return cached

    def _fixed_selection(self, k: int) -> Selection:
        if k < 0:
            return Selection(None, None, tuple(range(self.net.in_nc)))
        return Selection(None, None, self.net.fixed_channels[k])

    def groups(self, tasks: Tensor, masked: bool = False) -> list[tuple[Tensor | None, dict[int, Selection]]]:
        """Partition the rows of ``tasks`` into groups run as one batch, with each map's run-time
        selection (rows None: all of them). ``masked``: one group, controller maps at full width
        times their masks."""
        net = self.net
        device = tasks.device
        sels = {k: self._fixed_selection(k) for k in range(-1, net.num_maps)
                if k < 0 or net.fixed_channels[k] is not None}
        if not net.controlled_maps:
            return [(None, sels)]
        self.begin_run()
        key = None
        if self._caching and not masked:  # the same task vectors again: the same groups
            host = tasks.detach().cpu()
            key = ("groups", str(tasks.dtype), str(device), tuple(host.shape), host.numpy().tobytes())
            cached = self.cache.get(key)
            if cached is not None:
                return cached
        masks = net.channel_masks(tasks)
        if masked:
            full = tuple(range(net.nf))
            dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else tasks.dtype
            sels.update({k: Selection(None, masks[k].to(dtype), full) for k in net.controlled_maps})
            return [(None, sels)]
        stacked = torch.cat([masks[k] for k in net.controlled_maps], dim=1).to(torch.uint8).cpu()
        unique, inverse = torch.unique(stacked, dim=0, return_inverse=True)
        if unique.shape[0] == 1:
            rows_list = [None]
        else:
            rows_list = [torch.nonzero(inverse == g).flatten().to(device) for g in range(unique.shape[0])]
        groups = []
        for g, rows in enumerate(rows_list):
            group_sels = dict(sels)
            for j, k in enumerate(net.controlled_maps):
                on = tuple(torch.nonzero(unique[g, j * net.nf:(j + 1) * net.nf]).flatten().tolist())
                group_sels[k] = Selection(self._tensor(on, device), None, on)
            groups.append((rows, group_sels))
        if key is not None:
            if len(self.cache) > 65536:
                self.cache.clear()
                self.cache_bytes = 0
            self.cache[key] = groups
        return groups

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

    def _produce(self, k: int, values: dict[int, Tensor], sels: dict[int, Selection], cond: Tensor | None) -> Tensor:
        """Map k from the maps before it."""
        net = self.net
        sel, prev = sels[k], sels[k - 1]
        x = values[k - 1]
        nb = net.nb
        key = (k, None if sel.index is None else sel.logical, None if prev.index is None else prev.logical)
        if k == 0:
            y = self._conv(net.conv_first, x, sel.index, None, key)
        elif k <= 2 * nb:
            block = net.recon_trunk[(k - 1) // 2]
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
                y = net.pixel_shuffle(self._conv(net.upconv, x, None, prev.index, key))
                y = y.relu_() if self._inplace else F.relu(y)
            else:
                # rows ordered (sub-pixel, channel): the shuffle is a plain strided copy
                index = sel.index
                rows = (torch.arange(4, device=index.device)[:, None] + 4 * index[None, :]).reshape(-1)
                y = self._conv(net.upconv, x, rows, prev.index, key)
                y = pixel_shuffle_grouped(y.relu_() if self._inplace else F.relu(y))  # ReLU commutes with it
        else:
            y = self._conv(net.HRconv, x, sel.index, prev.index, key)
            y = y.relu_() if self._inplace else F.relu(y)
        if sel.mask is not None:
            y = y * sel.mask[:, :, None, None]
        return y

    # ------------------------------------------------------------------ the two parts
    def run_prefix(self, padded: Tensor) -> dict[int, Tensor]:
        """The shared prefix on even-sized images (B, in_nc, H, W): the last two shared maps
        (what the task-specific part reads), plus ``"y"`` (conv_last's output) when every map
        is shared. Task vectors play no part. Counted in ``prefix_calls``."""
        net = self.net
        self.prefix_calls += 1
        self.begin_run()
        self._nhwc_run = _nhwc(padded)
        values: dict[Any, Tensor] = {-1: padded}
        sels = {k: self._fixed_selection(k) for k in range(-1, net.shared_maps)}
        for k in range(net.shared_maps):
            values[k] = self._produce(k, values, sels, None)
            values.pop(k - 2, None)
        if net.shared_maps == net.num_maps:
            values["y"] = self._conv(net.conv_last, values[net.num_maps - 1], None, None)
        values.pop(-1, None)
        return values

    def run_specific(self, prefix: dict, padded: Tensor, cond: Tensor, sels: dict[int, Selection]) -> Tensor:
        """The task-specific part for a batch: ``prefix`` from :meth:`run_prefix` (batch 1 or
        B), ``padded`` the images (batch 1 or B), ``cond`` (B, cond_dim), ``sels`` one group's
        selections from :meth:`groups` -> (B, in_nc, H, W). Batch-1 inputs of convolutions are
        repeated per task (every task's convolutions run, as ``TASNet.flops`` counts them); the
        image itself is only broadcast in the final sum."""
        net = self.net
        self.begin_run()
        self._nhwc_run = _nhwc(padded)
        batch = cond.shape[0]

        def rows(t: Tensor) -> Tensor:
            if t.shape[0] != 1 or batch == 1:
                return t
            if self._nhwc_run and t.ndim == 4:
                return _as_nhwc(t.expand(batch, *t.shape[1:]).contiguous(memory_format=torch.channels_last))
            return t.expand(batch, *t.shape[1:])

        values: dict[Any, Tensor] = {k: v for k, v in prefix.items() if k != "y"}
        if net.shared_maps > 0 and net.shared_maps < net.num_maps:  # the first specific conv's input
            values[net.shared_maps - 1] = rows(values[net.shared_maps - 1])
        values[-1] = rows(padded) if net.shared_maps == 0 else padded
        y = prefix.get("y")
        global_scale = net.global_scale(cond)[:, :, None, None]
        if y is None:
            for k in range(net.shared_maps, net.num_maps):
                values[k] = self._produce(k, values, sels, cond)
                if k - 2 >= 0:
                    values.pop(k - 2, None)
            last = sels[net.num_maps - 1]
            key = ("conv_last", None if last.index is None else last.logical)
            if self._inplace and cond.shape[0] == 1 and last.index is not None:
                y = self._conv(net.conv_last, values[net.num_maps - 1], None, last.index, key,
                               scale=global_scale[0, :, 0, 0])
                return y.add_(padded) if y.shape[0] >= padded.shape[0] else y + padded
            y = self._conv(net.conv_last, values[net.num_maps - 1], None, last.index, key)
        return padded + y * global_scale

    # ------------------------------------------------------------------ whole passes
    def forward(self, x: Tensor, task: Tensor, masked: bool) -> Tensor:
        """Images x (B, in_nc, H, W) under their own task vectors (B, cond_dim) -> (B, in_nc, H, W):
        prefix on the B images, then the task-specific part masked (one pass) or per group."""
        height, width = x.shape[-2:]
        padded = pad_to_even(x)
        prefix = self.run_prefix(padded)
        groups = self.groups(task, masked)
        if len(groups) == 1:
            out = self.run_specific(prefix, padded, task, groups[0][1])
        else:
            out = padded.new_empty(padded.shape[0], self.net.in_nc, *padded.shape[2:])
            for rows, sels in groups:
                part = {k: v.index_select(0, rows) for k, v in prefix.items()}
                result = self.run_specific(part, padded.index_select(0, rows), task.index_select(0, rows), sels)
                out = out.index_copy(0, rows, result.to(out.dtype))
        return out[..., :height, :width]

    def restore(self, image: Tensor, tasks: Tensor, max_batch: int | None = None) -> Tensor:
        """One image (1, in_nc, H, W) under M task vectors (M, cond_dim) -> (M, in_nc, H, W): the
        prefix once, the task-specific part per group, at most ``max_batch`` tasks per pass."""
        if image.is_contiguous(memory_format=torch.channels_last) and image.stride(0) != image[0].numel():
            image = image.clone(memory_format=torch.channels_last)  # an HWC view: keep the convs in NHWC
        height, width = image.shape[-2:]
        padded = pad_to_even(image)
        prefix = self.run_prefix(padded)
        count = tasks.shape[0]
        out = None
        for rows, sels in self.groups(tasks, masked=False):
            rows = torch.arange(count, device=tasks.device) if rows is None else rows
            for chunk in rows.split(max_batch or count):
                result = self.run_specific(prefix, padded, tasks.index_select(0, chunk), sels)
                if out is None:  # under autocast groups may end in bf16 or fp32: keep the image's dtype
                    out = result.new_empty(count, *result.shape[1:], dtype=image.dtype)
                out[chunk] = result.to(out.dtype)
        return out[..., :height, :width]


__all__ = ["SLICE_CACHE_BYTES", "Selection", "SlicedRuntime", "pixel_shuffle_grouped"]
