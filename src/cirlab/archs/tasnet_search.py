"""TASNet's search space over a CResMD supernetwork (TASNet section 3.2, docs/method.md section 3).

Pieces, each a plain ``nn.Module`` or function:

* ``gate(z)``: the straight-through channel gate g (eq. 3): forward ``1[z > 0]``, backward
  through ``sigmoid(z)``.
* ``ChannelController``: the controller h_n (eq. 4), a small MLP from the task vector to one
  importance z^s per channel of feature map n.
* ``agreement`` (eq. 6, threshold gamma) and ``sharing_decision`` (eq. 7): eta and phi from the
  task-specific and task-agnostic gates.
* ``disagreement``: R2 of eq. 10.
* ``TASNetSearchNet``: CResMD with a channel mask on each of its N = 2 nb + 3 searchable
  feature maps (``cirlab.archs.flops.searchable_maps``): the mask of map n is g(z^a_n) where
  phi_n = 1 (shared), else g(z^s_{m,n}) per task. It keeps the task-agnostic importance z^a
  (eq. 5) as an exponential moving average in the buffer ``z_agnostic``, and eta and phi as
  buffers.

Choices (docs/method.md marks them [choice]; written here next to the code):

* The forward pass uses the EMA value of z^a (stable decisions) while its gradient flows through
  the current batch mean of z^s.
* Controllers start with every channel on: their output bias is ``init_bias`` > 0.
* A block inside the shared prefix must not depend on t. Its residual is scaled by a learnable
  task-agnostic vector ``agnostic_scale`` (one per block, nf values) instead of
  ``local_scale(t)``; it starts as ``local_scale(t_ref)`` for a reference task vector
  (``reset_agnostic_scales``; default t_ref = (0.5, 0.5, 0.5), the mean task of uniform
  sampling), so a pretrained CResMD starts the search close to its own behaviour.
* ``decision="declared"`` (default): z^a (eq. 5), eta (eq. 6) and phi (eq. 7) are computed over
  a declared task set (buffer ``decision_tasks``: the evaluation grid plus a few hundred task
  vectors drawn from the training distribution, set by ``TASNetSearch``), not over the batch's
  M tasks. Controllers are tiny MLPs, so evaluating them on a few hundred task vectors costs
  nothing next to the images; the decision is then a function of the weights alone, the same
  at every step, at derivation (:meth:`TASNetSearchNet.decide`) and on any machine, up to the
  weights' own numerics. ``decision="batch"``: the batch's task vectors (M = batch size) with
  z^a an EMA of the batch means (the rule before; kept for comparison and old checkpoints).
* In training mode the decision is recomputed every step and stored; in eval mode the stored
  decision is used, so evaluation does not depend on which tasks happen to share a batch.
  ``sharing=False`` forces phi = 0 (TSNet); so does ``sharing_on = False`` (a buffer the search
  module clears during its warm-up, ``model.sharing_warmup``), while eta is still computed.
  Reason for the warm-up: a search that starts with every channel on starts with every map
  shared, and a shared map's controllers only receive the gradient of z^a (the mean over
  tasks) and R2's pull towards it, so they never learn what each task needs and the map stays
  shared; measured in docs/results.md.
* Under DDP (``rank_sync = True``, set by the search module when it trains on several ranks)
  the statistics the decision thresholds are summed over the ranks before thresholding: the
  z^s means behind z^a (the declared set's, or the batch's for ``batch``, so the EMA sees the
  global batch) and the per-task overlaps of eq. 6 with their task count. Every rank then takes
  one decision (z^a, eta, phi identical bit for bit) and runs the same masked network, so DDP
  averages gradients of one architecture. The gradient of z^a stays the rank's own mean (DDP
  averages it over ranks like every other gradient).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from cirlab.archs.cresmd import CResMDNet


def gate(z: torch.Tensor) -> torch.Tensor:
    """Straight-through gate: value ``1[z > 0]`` (exactly 0 or 1), gradient ``sigmoid'(z)``."""
    soft = torch.sigmoid(z)
    hard = (z > 0).to(z.dtype)
    return hard + (soft - soft.detach())


class ChannelController(nn.Module):
    """h_n: task vector (M, cond_dim) -> channel importance z^s (M, channels)."""

    def __init__(self, cond_dim: int, channels: int, hidden: int = 32, init_bias: float = 3.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cond_dim, hidden)
        self.fc2 = nn.Linear(hidden, channels)
        nn.init.normal_(self.fc2.weight, std=0.01)
        nn.init.constant_(self.fc2.bias, init_bias)

    def forward(self, task: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(task)))


def agreement(gates_specific: torch.Tensor, gates_agnostic: torch.Tensor, gamma: float) -> torch.Tensor:
    """eta_n of eq. 6 for one map: mean_m sum_c g(z^s) g(z^a) > gamma * sum_c g(z^a).

    ``gates_specific`` (M, C), ``gates_agnostic`` (C,); returns a bool scalar tensor.
    """
    overlap = (gates_specific * gates_agnostic).sum(dim=1).mean()
    return overlap > gamma * gates_agnostic.sum()


def agreement_ratio(gates_specific: torch.Tensor, gates_agnostic: torch.Tensor) -> torch.Tensor:
    """The left side of eq. 6 over its right side without gamma: the mean fraction of the
    task-agnostic channels that a task also selects (``eta_n = ratio > gamma``; 0 for a map whose
    task-agnostic selection is empty, where eq. 6 is false for any gamma)."""
    overlap = (gates_specific * gates_agnostic).sum(dim=1).mean()
    return overlap / gates_agnostic.sum().clamp(min=1)


def sum_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """``values`` (detached) summed over the ranks of the default process group, as a new tensor;
    ``values`` itself when no group of two or more ranks is running. Every rank must call it."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return values
    total = values.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def sharing_decision(eta: torch.Tensor) -> torch.Tensor:
    """phi of eq. 7: phi_n = prod_{i <= n} eta_i (bool (N,)); phi_0 = 1 is implicit."""
    return torch.cumprod(eta.to(torch.int64), dim=0).bool()


@dataclass
class SearchOutput:
    """What one search forward pass used: the restored images and the applied masks.

    ``masks[n]`` is (M, C_n): the gate values applied to map n for each of the M tasks (rows
    equal for shared maps); ``phi`` (N,) bool; ``gates_specific[n]`` (M, C_n) and
    ``gates_agnostic[n]`` (C_n,) for the regularisers.
    """

    output: torch.Tensor
    masks: list[torch.Tensor]
    phi: torch.Tensor
    gates_specific: list[torch.Tensor]
    gates_agnostic: list[torch.Tensor]
    maps: list[torch.Tensor] | None = None


class TASNetSearchNet(nn.Module):
    """CResMD supernetwork with searchable channel masks and a shared prefix.

    Args:
        nf, nb, cond_dim, in_nc: the supernetwork (``CResMDNet``; its parameters live under
            ``supernet.`` with the reference names, so a CResMD checkpoint loads into it).
        controller_hidden: width of each controller's hidden layer.
        gamma: agreement threshold of eq. 6.
        ema_momentum: momentum of the z^a moving average (per training step).
        init_bias: controllers' initial output bias (> 0: all channels on).
        sharing: False disables the shared prefix (TSNet).
        decision: ``declared`` (z^a, eta, phi over the task set ``decision_tasks``) or ``batch``
            (over the batch's tasks, z^a an EMA with ``ema_momentum``); module docstring.
    """

    def __init__(self, nf: int = 64, nb: int = 32, cond_dim: int = 3, in_nc: int = 3, controller_hidden: int = 32,
                 gamma: float = 0.5, ema_momentum: float = 0.99, init_bias: float = 3.0, sharing: bool = True,
                 decision: str = "declared") -> None:
        super().__init__()
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"model.net.gamma={gamma} must be in [0, 1]")
        if not 0.0 <= ema_momentum < 1.0:
            raise ValueError(f"model.net.ema_momentum={ema_momentum} must be in [0, 1)")
        if decision not in ("declared", "batch"):
            raise ValueError(f"model.net.decision={decision!r}: 'declared' (over a declared task set) or 'batch'")
        self.decision = decision
        self.supernet = CResMDNet(in_nc=in_nc, out_nc=in_nc, nf=nf, nb=nb, cond_dim=cond_dim)
        self.nf, self.nb, self.cond_dim = nf, nb, cond_dim
        self.num_maps = 2 * nb + 3
        self.gamma, self.ema_momentum, self.sharing = gamma, ema_momentum, sharing
        self.controllers = nn.ModuleList(
            ChannelController(cond_dim, nf, controller_hidden, init_bias) for _ in range(self.num_maps))
        self.agnostic_scale = nn.Parameter(torch.zeros(nb, nf))
        self.register_buffer("z_agnostic", torch.zeros(self.num_maps, nf))
        self.register_buffer("ema_started", torch.zeros((), dtype=torch.bool))
        self.register_buffer("eta", torch.ones(self.num_maps, dtype=torch.bool))
        self.register_buffer("phi", torch.zeros(self.num_maps, dtype=torch.bool))
        # the agreement ratio of each map at the last decision (how close eta sits to gamma)
        self.register_buffer("agreement", torch.zeros(self.num_maps), persistent=False)
        # the declared task set of decision="declared" (default: the 27-point grid; the search
        # module adds task vectors from the training distribution)
        from cirlab.tasks import level_grid

        default = level_grid("cresmd27") if cond_dim == 3 else torch.zeros(0, cond_dim)
        self.register_buffer("decision_tasks", default)
        # False during the search's warm-up: phi = 0 (every map task-specific), eta still computed
        self.register_buffer("sharing_on", torch.ones((), dtype=torch.bool))
        # True: the decision's statistics are summed over the DDP ranks (module docstring); every
        # rank must then run each training forward (TASNetSearch sets it when world_size > 1)
        self.rank_sync = False
        self.reset_agnostic_scales()

    def set_decision_tasks(self, tasks: torch.Tensor) -> None:
        """Declare the task set of the sharing decision, (K, cond_dim) with K >= 1."""
        if tasks.ndim != 2 or tasks.shape[1] != self.cond_dim or tasks.shape[0] < 1:
            raise ValueError(f"decision tasks must be (K >= 1, {self.cond_dim}), got {tuple(tasks.shape)}")
        self.decision_tasks = tasks.detach().to(self.z_agnostic.device, torch.float32).clone()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        key = prefix + "decision_tasks"  # the declared set has the size its search gave it
        if key not in state_dict and self.decision == "batch":
            state_dict[key] = self.decision_tasks  # a checkpoint from before declared sets (batch rule)
        if key in state_dict and state_dict[key].shape != self.decision_tasks.shape:
            self.decision_tasks = torch.empty_like(state_dict[key], device=self.decision_tasks.device)
        if prefix + "sharing_on" not in state_dict:  # a checkpoint from before the warm-up existed
            state_dict[prefix + "sharing_on"] = self.sharing_on
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    @torch.no_grad()
    def reset_agnostic_scales(self, task: torch.Tensor | None = None) -> None:
        """Set each shared block's scale to ``local_scale(task)`` (default t = 0.5 everywhere)."""
        if task is None:
            task = torch.full((1, self.cond_dim), 0.5)
        task = task.reshape(1, self.cond_dim).to(self.agnostic_scale.device)
        for index, block in enumerate(self.supernet.recon_trunk):
            self.agnostic_scale[index] = block.local_scale(task)[0]

    # ------------------------------------------------------------------------ decisions
    def importance(self, task: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """z^s per map (M, C) and z^a per map (C,) as used in the forward pass. Training with
        ``declared``: the mean of z^s over the declared task set (value and gradient). Otherwise
        (eval mode, or training with ``batch``): the stored ``z_agnostic`` (the EMA), with the
        gradient of the batch mean."""
        specific, agnostic, _, _ = self._importance(task)
        return specific, agnostic

    def _importance(self, task: torch.Tensor):
        """``importance`` plus, when training, z^s over the declared set (``declared``, else None)
        and the (N, C) means of z^s the decision uses (over all ranks with ``rank_sync``; None in
        eval mode)."""
        specific = [controller(task) for controller in self.controllers]
        if self.decision == "declared" and self.training:
            declared = self.declared_importance()
            agnostic, means = self._rank_means([z.mean(dim=0) for z in declared], declared[0].shape[0])
            return specific, agnostic, declared, means
        batch_means, means = [z.mean(dim=0) for z in specific], None
        if self.training:
            batch_means, means = self._rank_means(batch_means, task.shape[0])
        agnostic = []  # eval mode (either rule): the stored z^a; training with "batch": its EMA
        for index, batch_mean in enumerate(batch_means):
            ema = self.z_agnostic[index] if bool(self.ema_started) else batch_mean.detach()
            agnostic.append(ema + (batch_mean - batch_mean.detach()))
        return specific, agnostic, None, means

    def _rank_means(self, means: list[torch.Tensor], rows: int) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Per-map means of z^s over ``rows`` rows -> (means whose value is the mean over every
        rank's rows and whose gradient is this rank's, their detached (N, C) stack). Without
        ``rank_sync``: the means unchanged."""
        local = torch.stack([m.detach().float() for m in means])
        if not self.rank_sync:
            return means, local
        packed = torch.cat([local.flatten() * rows, local.new_tensor([rows])])
        packed = sum_over_ranks(packed)
        total = (packed[:-1] / packed[-1]).view_as(local)
        return [value + (m - m.detach()) for value, m in zip(total, means)], total

    def declared_importance(self) -> list[torch.Tensor]:
        """z^s of every map over the declared task set, (K, C) each."""
        if self.decision_tasks.shape[0] == 0:
            raise ValueError("model.net.decision='declared' needs a declared task set (decision_tasks is empty)")
        return [controller(self.decision_tasks) for controller in self.controllers]

    @torch.no_grad()
    def _store_decision(self, gates_specific: list[torch.Tensor], gates_agnostic: list[torch.Tensor],
                        sync: bool = False) -> None:
        """eta (eq. 6), the agreement ratio and phi (eq. 7) from 0/1 gates (M, C) per map and the
        task-agnostic gates (C,); ``sync``: the per-task overlaps and M are summed over the ranks
        first (the task-agnostic gates must already be the same on every rank)."""
        # in float32: a sum of thousands of 0/1 products is inexact in half precision
        overlap = torch.stack([(gs.float() * ga.float()).sum() for gs, ga in zip(gates_specific, gates_agnostic)])
        packed = torch.cat([overlap, overlap.new_tensor([gates_specific[0].shape[0]])])
        if sync and self.rank_sync:
            packed = sum_over_ranks(packed)
        mean_overlap = packed[:-1] / packed[-1]  # eq. 6's left side: exact, the gates are 0 or 1
        selected = torch.stack([ga.float().sum() for ga in gates_agnostic])
        eta = mean_overlap > self.gamma * selected  # as agreement()
        self.agreement.copy_(mean_overlap / selected.clamp(min=1))  # as agreement_ratio()
        self.eta.copy_(eta)
        self.phi.copy_(sharing_decision(eta) if self.sharing and bool(self.sharing_on) else torch.zeros_like(eta))

    @torch.no_grad()
    def decide(self) -> None:
        """Recompute and store z^a, eta and phi over the declared task set from the present weights
        (``decision="declared"``); what :func:`cirlab.derivation.derive` freezes."""
        if self.decision != "declared":
            raise ValueError("decide() recomputes a declared-set decision; this network has decision='batch' "
                             "(its stored decision is the last training batch's)")
        specific = self.declared_importance()
        agnostic = torch.stack([z.mean(dim=0) for z in specific])
        self.z_agnostic.copy_(agnostic)
        self.ema_started.fill_(True)
        self._store_decision([(z > 0).float() for z in specific], [(z > 0).float() for z in agnostic])

    @torch.no_grad()
    def _update_state(self, means: torch.Tensor, gates_specific, gates_agnostic,
                      declared: list[torch.Tensor] | None = None) -> None:
        """Store the training step's decision: over the declared set (``declared``: its z^s) or
        over the batch (``gates_specific``), against the task-agnostic gates; ``means`` (N, C) are
        the z^s means of those rows (over every rank with ``rank_sync``)."""
        if declared is not None:
            self.z_agnostic.copy_(means)
            self.ema_started.fill_(True)
            self._store_decision([(z > 0).float() for z in declared], [ga.detach() for ga in gates_agnostic], sync=True)
            return
        if bool(self.ema_started):
            self.z_agnostic.mul_(self.ema_momentum).add_(means, alpha=1 - self.ema_momentum)
        else:
            self.z_agnostic.copy_(means)
            self.ema_started.fill_(True)
        self._store_decision([gs.detach() for gs in gates_specific], [ga.detach() for ga in gates_agnostic], sync=True)

    def shared_maps(self) -> int:
        """Number of feature maps in the shared prefix (the current decision)."""
        return int(self.phi.sum())

    # ------------------------------------------------------------------------ forward
    def search_forward(self, x: torch.Tensor, task: torch.Tensor, keep_maps: bool = False) -> SearchOutput:
        """Masked forward for images x (B, 3, H, W) and their tasks (B, cond_dim); B = M tasks.

        ``keep_maps=True`` also returns every searchable feature map (for tests, pictures).
        """
        specific, agnostic, declared, means = self._importance(task)
        gates_specific = [gate(z) for z in specific]
        gates_agnostic = [gate(z) for z in agnostic]
        if self.training:
            self._update_state(means, gates_specific, gates_agnostic, declared)
        phi = self.phi.clone()
        batch = x.shape[0]
        masks = [ga.expand(batch, -1) if shared else gs
                 for gs, ga, shared in zip(gates_specific, gates_agnostic, phi.tolist())]

        net = self.supernet
        height, width = x.shape[-2:]
        padded = F.pad(x, (0, width % 2, 0, height % 2), mode="replicate") if (height % 2 or width % 2) else x
        shared = phi.tolist()

        def conv(module: nn.Conv2d, inputs: torch.Tensor, n: int, repeat: int = 1) -> torch.Tensor:
            """Conv producing map n with its mask applied. A shared map's mask is one vector for
            the whole batch, so it is folded into the (small) weights instead of multiplying the
            (large) output; the values are identical since the gates are exactly 0 or 1."""
            if not shared[n]:
                return module(inputs)
            mask = gates_agnostic[n].repeat_interleave(repeat) if repeat > 1 else gates_agnostic[n]
            return F.conv2d(inputs, module.weight * mask[:, None, None, None], module.bias * mask,
                            module.stride, module.padding)

        def apply(values: torch.Tensor, n: int) -> torch.Tensor:
            return values if shared[n] else values * masks[n][:, :, None, None]

        feature = apply(conv(net.conv_first, padded, 0), 0)
        maps = [feature]
        for index, block in enumerate(net.recon_trunk):
            inner_map, out_map = 1 + 2 * index, 2 + 2 * index
            inner = apply(F.relu(conv(block.conv1, feature, inner_map)), inner_map)
            if shared[out_map]:
                scale = self.agnostic_scale[index].expand(batch, -1)
                # (f + conv2(inner) * s) * m: the conv part is folded, the residual stream is masked
                feature = feature * gates_agnostic[out_map][None, :, None, None] \
                    + conv(block.conv2, inner, out_map) * scale[:, :, None, None]
            else:
                scale = block.local_scale(task)
                feature = (feature + block.conv2(inner) * scale[:, :, None, None]) * masks[out_map][:, :, None, None]
            maps += [inner, feature]
        up = apply(F.relu(net.pixel_shuffle(conv(net.upconv, feature, self.num_maps - 2, repeat=4))), self.num_maps - 2)
        hr = apply(F.relu(conv(net.HRconv, up, self.num_maps - 1)), self.num_maps - 1)
        out = padded + net.conv_last(hr) * net.global_scale(task)[:, :, None, None]
        kept = maps + [up, hr] if keep_maps else None
        return SearchOutput(out[..., :height, :width], masks, phi, gates_specific, gates_agnostic, kept)

    def forward(self, x: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        return self.search_forward(x, task).output


def disagreement(gates_specific: list[torch.Tensor], gates_agnostic: list[torch.Tensor], phi: torch.Tensor) -> torch.Tensor:
    """R2 of eq. 10, normalised by M * sum_n C_n: sum_n phi_{n-1} sum_{c,m} |g(z^s) - g(z^a)|.

    ``phi`` (N,) bool; phi_0 = 1 (the input image is the same for every task).
    """
    previous = torch.cat([torch.ones(1, dtype=torch.bool, device=phi.device), phi[:-1]])
    total = gates_specific[0].new_zeros(())
    norm = 0
    for gs, ga, active in zip(gates_specific, gates_agnostic, previous.tolist()):
        norm += gs.numel()
        if active:
            total = total + (gs - ga[None]).abs().sum()
    return total / max(norm, 1)
