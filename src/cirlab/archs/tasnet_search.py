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
* In training mode eta and phi are computed from the batch's task vectors (M = batch size) and
  stored; in eval mode the stored decision is used, so evaluation does not depend on which
  tasks happen to share a batch. ``sharing=False`` forces phi = 0 (TSNet).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
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
    """

    def __init__(self, nf: int = 64, nb: int = 32, cond_dim: int = 3, in_nc: int = 3, controller_hidden: int = 32,
                 gamma: float = 0.5, ema_momentum: float = 0.99, init_bias: float = 3.0, sharing: bool = True) -> None:
        super().__init__()
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"model.net.gamma={gamma} must be in [0, 1]")
        if not 0.0 <= ema_momentum < 1.0:
            raise ValueError(f"model.net.ema_momentum={ema_momentum} must be in [0, 1)")
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
        self.reset_agnostic_scales()

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
        """z^s per map (M, C) and z^a per map (C,) as used in the forward pass (EMA value,
        gradient of the batch mean)."""
        specific = [controller(task) for controller in self.controllers]
        agnostic = []
        for index, z in enumerate(specific):
            batch_mean = z.mean(dim=0)
            ema = self.z_agnostic[index] if bool(self.ema_started) else batch_mean.detach()
            agnostic.append(ema + (batch_mean - batch_mean.detach()))
        return specific, agnostic

    @torch.no_grad()
    def _update_state(self, specific: list[torch.Tensor], gates_specific, gates_agnostic) -> None:
        means = torch.stack([z.mean(dim=0) for z in specific])
        if bool(self.ema_started):
            self.z_agnostic.mul_(self.ema_momentum).add_(means, alpha=1 - self.ema_momentum)
        else:
            self.z_agnostic.copy_(means)
            self.ema_started.fill_(True)
        eta = torch.stack([agreement(gs.detach(), ga.detach(), self.gamma) for gs, ga in zip(gates_specific, gates_agnostic)])
        self.eta.copy_(eta)
        self.phi.copy_(sharing_decision(eta) if self.sharing else torch.zeros_like(eta))

    def shared_maps(self) -> int:
        """Number of feature maps in the shared prefix (the current decision)."""
        return int(self.phi.sum())

    # ------------------------------------------------------------------------ forward
    def search_forward(self, x: torch.Tensor, task: torch.Tensor, keep_maps: bool = False) -> SearchOutput:
        """Masked forward for images x (B, 3, H, W) and their tasks (B, cond_dim); B = M tasks.

        ``keep_maps=True`` also returns every searchable feature map (for tests, pictures).
        """
        specific, agnostic = self.importance(task)
        gates_specific = [gate(z) for z in specific]
        gates_agnostic = [gate(z) for z in agnostic]
        if self.training:
            self._update_state(specific, gates_specific, gates_agnostic)
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
