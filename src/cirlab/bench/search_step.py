"""Cost of one TASNet search training step against one plain CResMD training step.

Both steps are measured side by side in one process (interleaved, median of repeats), on the
same batch and patch size: forward, L1 (+ R1 and R2 for the search), backward, Adam step. The
ratio is what the issue's target (at most 1.25x) is about: the controllers, gates and the FLOPs
regulariser must not dominate the step.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from cirlab.archs.cresmd import CResMDNet
from cirlab.archs.flops import MaskState, cresmd_flops, masked_flops
from cirlab.archs.tasnet_search import TASNetSearchNet, disagreement


def _plain_step(net, optimizer, x, t, y):
    loss = F.l1_loss(net(x, t), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def _search_step(net, optimizer, x, t, y, lambda1=0.1, lambda2=0.1):
    result = net.search_forward(x, t)
    height, width = x.shape[-2:]
    r1 = masked_flops(MaskState(phi=result.phi, masks=result.masks), net.nf, net.nb, height, width)
    r1 = r1 / cresmd_flops(net.nf, net.nb, height, width, tasks=x.shape[0])
    r2 = disagreement(result.gates_specific, result.gates_agnostic, result.phi)
    loss = F.l1_loss(result.output, y) + lambda1 * r1 + lambda2 * r2
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def bench_search_step(nf: int = 64, nb: int = 32, batch: int = 16, patch: int = 64, repeats: int = 5,
                      warmup: int = 2, device: str = "cpu", seed: int = 0) -> dict:
    """Median seconds per step: plain CResMD, the search with every map shared (its start state:
    masks folded into the weights) and with no shared map (TSNet: per-task masks multiply the
    feature maps), and the two ratios to the plain step."""
    torch.manual_seed(seed)
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    plain = CResMDNet(nf=nf, nb=nb).to(dev)
    shared = TASNetSearchNet(nf=nf, nb=nb).to(dev).train()  # the search's start: every map shared
    unshared = TASNetSearchNet(nf=nf, nb=nb, sharing=False).to(dev).train()  # no shared map (TSNet)
    optimizers = {name: torch.optim.Adam(net.parameters(), lr=1e-4)
                  for name, net in (("plain", plain), ("search_shared", shared), ("search_unshared", unshared))}
    x = torch.rand(batch, 3, patch, patch, device=dev)
    y = torch.rand(batch, 3, patch, patch, device=dev)
    t = torch.rand(batch, 3, device=dev)
    steps = {
        "plain": lambda: _plain_step(plain, optimizers["plain"], x, t, y),
        "search_shared": lambda: _search_step(shared, optimizers["search_shared"], x, t, y),
        "search_unshared": lambda: _search_step(unshared, optimizers["search_unshared"], x, t, y),
    }
    for _ in range(warmup):
        for step in steps.values():
            step()
    times = {name: [] for name in steps}
    for _ in range(repeats):  # interleaved, so drifts in machine load hit all alike
        for name, step in steps.items():
            sync()
            start = time.perf_counter()
            step()
            sync()
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {"nf": nf, "nb": nb, "batch": batch, "patch": patch, "device": str(dev), "repeats": repeats,
            "torch_threads": torch.get_num_threads(),
            **{f"{name}_s": value for name, value in medians.items()},
            "ratio_shared": medians["search_shared"] / medians["plain"],
            "ratio_unshared": medians["search_unshared"] / medians["plain"],
            "spread_s": {name: [min(values), max(values)] for name, values in times.items()}}
