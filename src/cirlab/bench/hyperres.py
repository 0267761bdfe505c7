"""HyperRes cost figures (issue 5): :func:`bench_hyperres` returns a dict; ``python -m cirlab.bench.hyperres``
prints it as JSON and a Markdown table.

Three measurements, each as medians over interleaved repeats (so a busy machine slows both sides
of a ratio alike):

1. **Training step, k main networks vs k plain passes.** HyperRes: generate the k networks,
   ``forward_levels`` on k batches of B crops, mean of the k L1 losses, one backward. Plain: a
   :class:`~cirlab.archs.hyperres.MainNet` of the same shape, k forward/backward passes (one
   per batch, gradients accumulated). No optimiser step on either side. Target ratio <= 1.15.
   Reported for ``k_mode="loop"`` (the default) and ``"grouped"``.
2. **Generating one network for a new level** (``trunk_weights(c)``, the 2 nb affine maps, and
   ``generate(c)``, a standalone MainNet with the shared weights copied) against one forward pass
   of the generated network on a ``gen_size`` x ``gen_size`` image (batch 1).
3. **Mixed-level batch vs per-level loop**: ``levels`` images, each at its own level, restored in
   one forward pass (``mixed_mode`` grouped and affine) against one call per level (each call
   generates its network), at ``mixed_size`` x ``mixed_size``.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time

import torch

from cirlab.archs.hyperres import HyperResNet, MainNet


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _interleaved(fns: dict, device: torch.device, repeats: int, warmup: int) -> dict[str, list[float]]:
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(_timed(fn, device))
    return times


def _ratio(times: dict[str, list[float]], num: str, den: str) -> float:
    """Median of the per-repeat ratios (each pair measured back to back)."""
    return statistics.median(a / b for a, b in zip(times[num], times[den]))


def bench_hyperres(device: str = "cpu", nf: int = 64, nb: int = 16, k: int = 4, batch: int = 4, patch: int = 64,
                   gen_size: int = 256, levels: int = 8, mixed_size: int = 128, repeats: int = 5, warmup: int = 1,
                   num_threads: int | None = None, seed: int = 0) -> dict:
    """Measure the three HyperRes costs of the module docstring; returns seconds (medians) and ratios."""
    if num_threads:
        torch.set_num_threads(num_threads)
    dev = torch.device(device)
    torch.manual_seed(seed)
    hyper = HyperResNet(nf=nf, nb=nb).to(dev)
    plain = MainNet(nf=nf, nb=nb).to(dev)
    with torch.no_grad():  # trained-like weights: non-zero constant terms in the meta blocks
        for meta in hyper.meta_convs():
            meta.fc.bias.normal_(0, 0.01)
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.rand(k, batch, 3, patch, patch, generator=generator).to(dev)
    target = torch.rand(batch, 3, patch, patch, generator=generator).to(dev)
    train_levels = (torch.linspace(15, 75, k) / 255).to(dev)

    def hyper_step(mode: str):
        def run():
            hyper.k_mode = mode
            hyper.zero_grad(set_to_none=True)
            out = hyper.forward_levels(inputs, train_levels)
            (out - target).abs().flatten(1).mean(dim=1).mean().backward()
        return run

    def plain_steps():
        plain.zero_grad(set_to_none=True)
        for i in range(k):
            ((plain(inputs[i]) - target).abs().mean() / k).backward()

    train = _interleaved({"hyper_loop": hyper_step("loop"), "plain_k_passes": plain_steps,
                          "hyper_grouped": hyper_step("grouped")}, dev, repeats, warmup)
    hyper.k_mode = "loop"

    # generation of one network for a new level vs one forward pass of it
    image = torch.rand(1, 3, gen_size, gen_size, generator=generator).to(dev)
    generated = hyper.generate(0.2)
    new_levels = iter(torch.rand(10 * (repeats + warmup) + 10, generator=generator).tolist())
    with torch.no_grad():
        generation = _interleaved({
            "trunk_weights": lambda: hyper.trunk_weights(next(new_levels)),
            "generate_module": lambda: hyper.generate(next(new_levels)),
            "forward_generated": lambda: generated(image),
        }, dev, repeats, warmup)

    # mixed-level batch vs per-level loop
    x = torch.rand(levels, 3, mixed_size, mixed_size, generator=generator).to(dev)
    c = (torch.linspace(5, 90, levels) / 255).to(dev)

    def mixed(mode: str):
        def run():
            hyper.mixed_mode = mode
            hyper(x, c)
        return run

    with torch.no_grad():
        mixing = _interleaved({"per_level_loop": lambda: [hyper(x[i : i + 1], c[i]) for i in range(levels)],
                               "mixed_grouped": mixed("grouped"), "mixed_affine": mixed("affine")}, dev, repeats, warmup)
    hyper.mixed_mode = "grouped"

    median = {name: statistics.median(v) for group in (train, generation, mixing) for name, v in group.items()}
    return {
        "device": str(dev),
        "machine": {"host": platform.node(), "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                    "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                    "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
                    "loadavg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None},
        "settings": {"nf": nf, "nb": nb, "k": k, "batch": batch, "patch": patch, "gen_size": gen_size,
                     "levels": levels, "mixed_size": mixed_size, "repeats": repeats},
        "parameters": {"hyperres": sum(p.numel() for p in hyper.parameters()),
                       "main_network": sum(p.numel() for p in plain.parameters())},
        "seconds": median,
        "train_step": {"ratio_hyper_loop_vs_plain": _ratio(train, "hyper_loop", "plain_k_passes"),
                       "ratio_hyper_grouped_vs_plain": _ratio(train, "hyper_grouped", "plain_k_passes"),
                       "target_max_ratio": 1.15},
        "generation": {"ratio_trunk_weights_vs_forward": _ratio(generation, "trunk_weights", "forward_generated"),
                       "ratio_generate_module_vs_forward": _ratio(generation, "generate_module", "forward_generated")},
        "mixed": {"speedup_grouped_vs_loop": _ratio(mixing, "per_level_loop", "mixed_grouped"),
                  "speedup_affine_vs_loop": _ratio(mixing, "per_level_loop", "mixed_affine")},
    }


def markdown(result: dict) -> str:
    s, st = result["seconds"], result["settings"]
    rows = [
        f"| training step, k={st['k']} networks, batch {st['batch']}, {st['patch']}x{st['patch']} | HyperRes (loop) "
        f"{s['hyper_loop']:.3f} s, (grouped) {s['hyper_grouped']:.3f} s | {st['k']} plain fwd/bwd {s['plain_k_passes']:.3f} s "
        f"| {result['train_step']['ratio_hyper_loop_vs_plain']:.3f}x (grouped {result['train_step']['ratio_hyper_grouped_vs_plain']:.3f}x) |",
        f"| generate one network (new level) | trunk weights {s['trunk_weights'] * 1e3:.2f} ms, standalone module "
        f"{s['generate_module'] * 1e3:.1f} ms | forward {st['gen_size']}x{st['gen_size']} {s['forward_generated'] * 1e3:.0f} ms "
        f"| {result['generation']['ratio_trunk_weights_vs_forward']:.4f}x ({result['generation']['ratio_generate_module_vs_forward']:.3f}x) |",
        f"| {st['levels']} levels, {st['mixed_size']}x{st['mixed_size']} | mixed batch: grouped {s['mixed_grouped']:.3f} s, "
        f"affine {s['mixed_affine']:.3f} s | per-level loop {s['per_level_loop']:.3f} s | speed-up "
        f"{result['mixed']['speedup_grouped_vs_loop']:.2f}x (affine {result['mixed']['speedup_affine_vs_loop']:.2f}x) |",
    ]
    return "\n".join(["| measurement | HyperRes | reference | ratio |", "|---|---|---|---|", *rows])


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m cirlab.bench.hyperres")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--patch", type=int, default=64)
    parser.add_argument("--mixed-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    out = bench_hyperres(device=args.device, repeats=args.repeats, batch=args.batch, patch=args.patch,
                         mixed_size=args.mixed_size, num_threads=args.threads)
    json.dump(out, sys.stdout, indent=2)
    print("\n" + markdown(out))
