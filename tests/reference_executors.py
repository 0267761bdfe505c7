"""Test oracles: two reference executors of a pruned, partly shared CResMD (docs/method.md
section 3) for a :class:`~cirlab.archs.flops.MaskState`, with the same semantics.

* :func:`dense_masked_forward`: the full CResMDNet on M copies of the image, every searchable
  map multiplied by its (binary or soft) mask per task; differentiable.
* :func:`run_masked`: the pruned network executed with sliced weights (only active channels;
  shared prefix once per image, task-specific maps once per task, ``conv_last`` once if
  everything is shared). Its convolution FLOPs under ``FlopCounterMode`` equal
  :func:`~cirlab.archs.flops.masked_flops` exactly. Binary masks only.

Both take x (1, 3, H, W) (``dense_masked_forward`` also (M, 3, H, W)) and tasks (M, cond_dim)
and return (M, 3, H, W), not clamped. A block's ``local_scale`` belongs to its output map: where
that map is shared it is evaluated at the caller's fixed ``prefix_task`` (cond_dim,), else at
each task's vector; ``global_scale`` always uses each task's vector.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cirlab.archs.common import pad_to_even
from cirlab.archs.cresmd import CResMDNet
from cirlab.archs.flops import MaskState, searchable_maps


def _check(net: CResMDNet, x: Tensor, tasks: Tensor, state: MaskState, prefix_task: Tensor | None) -> Tensor | None:
    specs = searchable_maps(net.nb, net.nf)
    if state.num_maps != len(specs):
        raise ValueError(f"state has {state.num_maps} maps; the network (nb={net.nb}) has N={len(specs)}")
    if state.channels != [s.channels for s in specs]:
        raise ValueError(f"state's mask widths {state.channels} do not match nf={net.nf}")
    if x.ndim != 4 or x.shape[1] != net.in_nc:
        raise ValueError(f"expected input of shape (B, {net.in_nc}, H, W), got {tuple(x.shape)}")
    if tasks.ndim != 2 or tasks.shape != (state.num_tasks, net.cond_dim):
        raise ValueError(f"expected task vectors of shape ({state.num_tasks}, {net.cond_dim}), got {tuple(tasks.shape)}")
    # A block's modulation belongs to its output map 3 + 2i; block 0's is map 3.
    if state.num_shared >= 3:
        if prefix_task is None:
            raise ValueError("a block's output map is shared: pass prefix_task, the task vector of the shared blocks")
        if prefix_task.shape != (net.cond_dim,):
            raise ValueError(f"prefix_task must have shape ({net.cond_dim},), got {tuple(prefix_task.shape)}")
        return prefix_task.reshape(1, -1).to(tasks)
    return None


def _block_cond(state: MaskState, block: int, tasks: Tensor, prefix: Tensor | None) -> Tensor:
    """(M, cond_dim): the vectors modulating ``block``'s output map."""
    if bool(state.phi[2 + 2 * block]):
        return prefix.expand(tasks.shape[0], -1)
    return tasks


def dense_masked_forward(
    net: CResMDNet, x: Tensor, tasks: Tensor, state: MaskState, prefix_task: Tensor | None = None
) -> Tensor:
    """Full CResMD forward with every searchable map multiplied by its mask, per task.

    Args:
        net: the supernetwork.
        x: (1, 3, H, W) one image for all M tasks, or (M, 3, H, W) one image per task.
        tasks: (M, cond_dim) task vectors, row m goes with mask row m.
        state: masks (binary or soft) and sharing decision.
        prefix_task: (cond_dim,) vector for ``local_scale`` of blocks whose output map is
            shared; needed only when S >= 3.

    Returns:
        (M, 3, H, W), not clamped; differentiable in the masks and the weights.
    """
    prefix = _check(net, x, tasks, state, prefix_task)
    count = state.num_tasks
    if x.shape[0] not in (1, count):
        raise ValueError(f"x must hold 1 or M={count} images, got {x.shape[0]}")
    height, width = x.shape[-2:]
    padded = pad_to_even(x).expand(count, -1, -1, -1)

    def mask(n: int) -> Tensor:
        return state.masks[n - 1].to(padded.dtype)[:, :, None, None]

    feature = net.conv_first(padded) * mask(1)
    for i, block in enumerate(net.recon_trunk):
        inner = F.relu(block.conv1(feature)) * mask(2 + 2 * i)
        scale = block.local_scale(_block_cond(state, i, tasks, prefix))[:, :, None, None]
        feature = (feature + block.conv2(inner) * scale) * mask(3 + 2 * i)
    n_up = 2 * net.nb + 2
    out = F.relu(net.pixel_shuffle(net.upconv(feature))) * mask(n_up)
    out = F.relu(net.HRconv(out)) * mask(n_up + 1)
    out = net.conv_last(out)
    out = padded + out * net.global_scale(tasks)[:, :, None, None]
    return out[..., :height, :width]


# --------------------------------------------------------------------------- sliced executor
def _sliced_conv(x: Tensor, in_idx: Tensor, conv: nn.Conv2d, out_rows: Tensor) -> Tensor:
    """``conv`` restricted to output rows ``out_rows`` and input channels ``in_idx``.

    ``x`` holds exactly the channels ``in_idx`` (in that order). Zero output rows give an empty
    tensor; zero input channels give the bias (what the dense conv of an all-zero input gives).
    """
    (kh, kw), (sh, sw), (ph, pw) = conv.kernel_size, conv.stride, conv.padding
    batch, _, height, width = x.shape
    out_h, out_w = (height + 2 * ph - kh) // sh + 1, (width + 2 * pw - kw) // sw + 1
    bias = conv.bias.index_select(0, out_rows) if conv.bias is not None else None
    if out_rows.numel() == 0:
        return x.new_zeros(batch, 0, out_h, out_w)
    if in_idx.numel() == 0:
        if bias is None:
            return x.new_zeros(batch, out_rows.numel(), out_h, out_w)
        return bias.view(1, -1, 1, 1).expand(batch, -1, out_h, out_w).clone()
    weight = conv.weight.index_select(0, out_rows).index_select(1, in_idx)
    return F.conv2d(x, weight, bias, conv.stride, conv.padding)


def _gather(x: Tensor, in_idx: Tensor, out_idx: Tensor, channels: int) -> Tensor:
    """Channels ``out_idx`` of the full ``channels``-wide map whose active part is (x, in_idx)."""
    full = x.new_zeros(x.shape[0], channels, *x.shape[2:])
    full = full.index_copy(1, in_idx, x)
    return full.index_select(1, out_idx)


def run_masked(
    net: CResMDNet, x: Tensor, tasks: Tensor, state: MaskState, prefix_task: Tensor | None = None
) -> Tensor:
    """Execute the pruned, partly shared network with sliced weights.

    Args:
        net: the supernetwork whose weights are sliced.
        x: (1, 3, H, W) one image.
        tasks: (M, cond_dim) task vectors.
        state: binary masks (bool or 0/1) and sharing decision.
        prefix_task: (cond_dim,) modulation vector of shared blocks; needed when S >= 3.

    Returns:
        (M, 3, H, W), equal to :func:`dense_masked_forward` (up to float rounding) while
        computing only the active channels: the shared prefix once, the rest once per task.
    """
    prefix = _check(net, x, tasks, state, prefix_task)
    if x.shape[0] != 1:
        raise ValueError(f"run_masked restores one image under M task vectors; got a batch of {x.shape[0]}")
    if not state.is_binary():
        raise ValueError("run_masked needs binary masks (0/1 or bool)")
    height, width = x.shape[-2:]
    padded = pad_to_even(x)
    count, nf, nb = state.num_tasks, net.nf, net.nb
    n_maps = state.num_maps
    phi = state.phi.tolist()
    device = padded.device
    # active[n][m]: active channel indices of map n for task m (map 0: the input image).
    active = [[torch.arange(net.in_nc, device=device)] * count]
    for n in range(1, n_maps + 1):
        active.append([state.active(n, m).to(device) for m in range(count)])
    task_rows = [tasks[m : m + 1] for m in range(count)]

    # values[n][m]: the active channels of map n for task m as consumed downstream (post-ReLU
    # where a ReLU follows). A shared map is one tensor referenced by all M entries.
    values: list[list[Tensor]] = [[padded] * count]

    def produce(n: int, m: int) -> Tensor:
        out_idx, prev_idx = active[n][m], active[n - 1][m]
        prev = values[n - 1][m]
        if n == 1:
            return _sliced_conv(prev, prev_idx, net.conv_first, out_idx)
        if n <= 2 * nb + 1:
            block_index, is_inner = divmod(n - 2, 2)
            block = net.recon_trunk[block_index]
            if is_inner == 0:
                return F.relu(_sliced_conv(prev, prev_idx, block.conv1, out_idx))
            cond = prefix if phi[n - 1] else task_rows[m]
            scale = F.linear(cond, block.local_scale.weight.index_select(0, out_idx), block.local_scale.bias.index_select(0, out_idx))
            residual = _sliced_conv(prev, prev_idx, block.conv2, out_idx) * scale[:, :, None, None]
            skip = _gather(values[n - 2][m], active[n - 2][m], out_idx, nf)
            return skip + residual
        if n == 2 * nb + 2:
            rows = (4 * out_idx[:, None] + torch.arange(4, device=device)).reshape(-1)
            return F.relu(net.pixel_shuffle(_sliced_conv(prev, prev_idx, net.upconv, rows)))
        return F.relu(_sliced_conv(prev, prev_idx, net.HRconv, out_idx))

    for n in range(1, n_maps + 1):
        if phi[n - 1]:
            values.append([produce(n, 0)] * count)
        else:
            values.append([produce(n, m) for m in range(count)])

    all_out = torch.arange(net.out_nc, device=device)
    last_runs = 1 if phi[-1] else count
    finals = [_sliced_conv(values[n_maps][m], active[n_maps][m], net.conv_last, all_out) for m in range(last_runs)]
    outputs = []
    for m in range(count):
        final = finals[0] if phi[-1] else finals[m]
        outputs.append(padded + final * net.global_scale(task_rows[m])[:, :, None, None])
    return torch.cat(outputs)[..., :height, :width]


__all__ = ["dense_masked_forward", "run_masked"]
