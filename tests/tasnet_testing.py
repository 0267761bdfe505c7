"""Helpers of the TASNet derivation/restore/fine-tune tests: tiny search networks in chosen states."""

from __future__ import annotations

import torch

from cirlab.archs.tasnet_search import TASNetSearchNet

NF, NB = 8, 2
N_MAPS = 2 * NB + 3


def search_state(shared: int, seed: int = 0, empty_shared: int | None = None, empty_specific: int | None = None,
                 nf: int = NF, nb: int = NB) -> TASNetSearchNet:
    """A tiny search network (eval mode) with O(1) random weights (the reference init is too gentle
    to make comparisons sensitive), random controllers (about half the channels off, differing
    per task), random z^a, the first ``shared`` maps shared; ``empty_shared`` / ``empty_specific``
    switch a whole shared / task-specific map off. ``decision="batch"``: the hand-set phi and z^a
    are the state a derivation keeps (a declared-set network would recompute them)."""
    generator = torch.Generator().manual_seed(seed)
    net = TASNetSearchNet(nf=nf, nb=nb, controller_hidden=8, decision="batch")
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.startswith("controllers"):
                p.copy_(torch.randn(p.shape, generator=generator))
            else:
                p.copy_(torch.randn(p.shape, generator=generator) * (0.5 / p[0].numel() ** 0.5 if p.ndim > 1 else 0.2))
        net.z_agnostic.copy_(torch.randn(net.z_agnostic.shape, generator=generator))
        net.ema_started.fill_(True)
        net.phi.zero_()
        net.phi[:shared] = True
        if empty_shared is not None:
            assert empty_shared < shared
            net.z_agnostic[empty_shared] = -1.0
        if empty_specific is not None:
            assert empty_specific >= shared
            net.controllers[empty_specific].fc2.weight.zero_()
            net.controllers[empty_specific].fc2.bias.fill_(-1.0)
    return net.eval()


def fake_search_checkpoint(net: TASNetSearchNet, path) -> None:
    """What a TASNetSearch checkpoint holds for the derivation: ``net.*`` weights and buffers and
    the network's hyper-parameters."""
    config = {"_target_": "cirlab.archs.tasnet_search.TASNetSearchNet", "nf": net.nf, "nb": net.nb, "cond_dim": net.cond_dim,
              "controller_hidden": net.controllers[0].fc1.out_features, "gamma": net.gamma,
              "ema_momentum": net.ema_momentum, "sharing": net.sharing, "decision": net.decision}
    torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()},
                "hyper_parameters": {"net": config}, "cirlab_module": "cirlab.models.tasnet_search.TASNetSearch"}, path)


def task_dependent_net(nf: int = NF, nb: int = NB, **kwargs) -> TASNetSearchNet:
    """A tiny search network (train mode, gamma 0.75 unless given) whose controllers switch
    channels on and off with the task vector (strong random layers), so that which tasks are asked
    decides the agreement: one task repeated (``AGREEING_BATCH``) shares every map, the four of
    ``MIXED_BATCH`` two, the 27-point grid one."""
    torch.manual_seed(0)
    net = TASNetSearchNet(nf=nf, nb=nb, controller_hidden=8, **{"gamma": 0.75, **kwargs})
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for controller in net.controllers:
            for layer, scale in ((controller.fc1, 3.0), (controller.fc2, 1.0)):
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * scale)
                layer.bias.copy_(torch.randn(layer.bias.shape, generator=generator))
    return net.train()


AGREEING_BATCH = torch.full((4, 3), 0.25)  # one task four times: every map agrees
MIXED_BATCH = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
