"""Cost of restoring one image under the 27-point workload (TASNet Table 1 and Figure 11).

Per network and image size: analytic convolution FLOPs (the networks' ``flops`` / ``cost``,
convention of :mod:`cirlab.archs.flops`) and measured latency in seconds, split into the *first
pass* (shared prefix + first task) and the *later passes* (one further task each, prefix reused);
one task vector per pass, the workload latency is their sum. CResMD shares nothing: each pass is
a whole inference.

Timing: ``warmup`` untimed workloads per model, then ``repeats`` rounds, each running every
model's workload once (interleaved); speed-ups are per round (reference time / model time),
reported as median, min and max, so load from other processes hits both sides of a ratio alike.
``efficiency_vs_reference`` = speed-up / FLOPs ratio (1: all FLOPs saved become time saved). CPU
runs use ``channels_last`` and ``torch.set_flush_denormal(True)``.

``--synthetic``: :func:`synthetic_tasnet`, a paper-size TASNet (nf 64, nb 32) with paper-like
widths and *random weights*, labelled ``TASNet-synthetic``: its latency is meaningful, its
outputs are not.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from cirlab.archs.common import pad_to_even
from cirlab.archs.cresmd import CResMDNet
from cirlab.archs.flops import cresmd_flops
from cirlab.archs.tasnet import TASNet, table4_shared_maps
from cirlab.archs.tasnet_spec import make_architecture
from cirlab.tasks import RESOLUTIONS

CPU_RESOLUTIONS = [(180, 320), (360, 640)]
PAPER_RESOLUTIONS = [RESOLUTIONS["hd"], RESOLUTIONS["2k"], RESOLUTIONS["4k"]]  # Table 1's HD, 2K (2048x1080), 4K
NAIVE_FRACTIONS = (0.31, 0.62, 0.99)


def naive_shared_maps(nb: int, fraction: float) -> int:
    """Shared maps of CResMD with its first ``fraction`` of its ``2 nb + 4`` convolutions shared
    (``naive_shared(shared_fraction=...)``; the synthetic TASNet's prefix). The naive rows are
    Table 4's variants instead, whose maps match the paper's FLOPs
    (:func:`cirlab.archs.tasnet.table4_shared_maps`)."""
    maps = 2 * nb + 3
    return min(maps, math.floor(fraction * (maps + 1) + 0.5))


SYNTHETIC_NAME = "TASNet-synthetic"
SYNTHETIC_WIDTHS = {"prefix_out": 48, "prefix_inner": 32, "out": (16, 32), "inner": (8, 24), "upconv": (8, 24),
                    "HRconv": (8, 24)}


def synthetic_tasnet(nf: int = 64, nb: int = 32, shared_fraction: float = 0.62,
                     widths: Mapping | None = None, cond_dim: int = 3, controller_hidden: int = 32,
                     seed: int = 0) -> TASNet:
    """A derived TASNet of paper-like widths with random weights (latency benchmarks only).

    The first ``naive_shared_maps(nb, shared_fraction)`` maps are shared: the residual stream
    (``conv_first`` and block outputs) keeps ``widths["prefix_out"]`` channels, the inner maps
    ``widths["prefix_inner"]``. Every later map has a controller whose output is
    ``mean(t) - threshold_c`` for a ranked list of channels: with ``(lo, hi) = widths[kind]``
    the first ``lo`` channels are always on and the next ``hi - lo`` switch on one by one as
    the mean restoration level goes from 0 to 1 (``kind``: "out" for block outputs, "inner",
    "upconv", "HRconv"), so harder tasks get wider layers (TASNet Figure 11) and tasks with
    equal mean levels share their channels. Channels are picked at random (``seed``); the
    residual stream uses one ranking throughout, so consecutive block outputs hold nested
    channel sets. Weights: :class:`TASNet`'s random initialisation. ``widths`` default:
    :data:`SYNTHETIC_WIDTHS` (for nf = 64; scaled by nf / 64 otherwise).
    """
    if widths is None:  # the defaults are for nf = 64: scale them
        def scaled(value: int) -> int:
            return max(1, min(nf, round(value * nf / 64)))

        widths = {kind: tuple(scaled(v) for v in value) if isinstance(value, tuple) else scaled(value)
                  for kind, value in SYNTHETIC_WIDTHS.items()}
    widths = {**SYNTHETIC_WIDTHS, **widths}
    generator = torch.Generator().manual_seed(seed)
    num_maps, shared = 2 * nb + 3, naive_shared_maps(nb, shared_fraction)
    stream = torch.randperm(nf, generator=generator).tolist()
    channels, plans = [], {}
    for k in range(num_maps):
        kind = ("out" if k == 0 or (k <= 2 * nb and k % 2 == 0) else "inner" if k <= 2 * nb
                else "upconv" if k == 2 * nb + 1 else "HRconv")
        ranking = stream if kind == "out" else torch.randperm(nf, generator=generator).tolist()
        if k < shared:
            channels.append(ranking[: widths["prefix_out" if kind == "out" else "prefix_inner"]])
        else:
            channels.append(None)
            plans[k] = (ranking, *widths[kind])
    net = TASNet(make_architecture(nf, nb, cond_dim, controller_hidden=controller_hidden, shared_maps=shared,
                                   channels=channels))
    with torch.no_grad():
        for k, (ranking, lo, hi) in plans.items():
            controller = net.controllers[str(k)]
            controller.fc1.weight.zero_()
            controller.fc1.bias.zero_()
            controller.fc1.weight[0].fill_(1.0 / cond_dim)  # hidden unit 0 = mean level (>= 0)
            controller.fc2.weight.zero_()
            controller.fc2.bias.fill_(-1.0)  # off
            for rank, channel in enumerate(ranking[:hi]):
                if rank < lo:
                    controller.fc2.bias[channel] = 1.0  # always on
                else:
                    controller.fc2.weight[channel, 0] = 1.0
                    controller.fc2.bias[channel] = -(rank - lo + 0.5) / (hi - lo)
    return net.eval()


def flops_split(net: nn.Module, tasks: Tensor, height: int, width: int) -> dict:
    """``{"shared", "per_task": [M], "total", "first_pass": [M], "later_pass": [M]}``: FLOPs of
    one ``height x width`` image under ``tasks``; ``first_pass[m]`` is task m run first (prefix
    included), ``later_pass[m]`` task m run after another one (prefix reused)."""
    if isinstance(net, TASNet):
        cost = net.cost(tasks, height, width)
        shared, per_task = cost["shared"], cost["per_task"]
    elif isinstance(net, CResMDNet):
        one = int(cresmd_flops(net.nf, net.nb, height, width, tasks=1, in_channels=net.in_nc, out_channels=net.out_nc))
        shared, per_task = 0, [one] * tasks.shape[0]
    else:
        raise TypeError(f"cost benchmark needs a TASNet or a CResMDNet, got {type(net).__name__}")
    return {"shared": shared, "per_task": per_task, "total": shared + sum(per_task),
            "first_pass": [shared + p for p in per_task], "later_pass": list(per_task)}


def _passes(net: nn.Module, image: Tensor, tasks: Tensor) -> tuple[float, list[float]]:
    """One run of the workload, one task per pass: (first pass s, [later pass s])."""
    sync = torch.cuda.synchronize if image.device.type == "cuda" else (lambda: None)
    times = []
    with torch.no_grad():
        if isinstance(net, TASNet):
            sync()
            start = time.perf_counter()
            runtime = net.runtime
            padded = pad_to_even(image)
            prefix = runtime.run_prefix(padded)
            for m in range(tasks.shape[0]):
                task = tasks[m : m + 1]
                sels = runtime.groups(task)[0][1]
                runtime.run_specific(prefix, padded, task, sels)
                sync()
                now = time.perf_counter()
                times.append(now - start)
                start = now
        else:
            for m in range(tasks.shape[0]):
                sync()
                start = time.perf_counter()
                net(image, tasks[m : m + 1])
                sync()
                times.append(time.perf_counter() - start)
    return times[0], times[1:]


def _spread(values: Sequence[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _layout(dev: torch.device) -> torch.memory_format:
    return torch.channels_last if dev.type == "cpu" else torch.contiguous_format


def time_workloads(nets: Mapping[str, nn.Module], height: int, width: int, tasks: Tensor, device: str,
                   repeats: int = 3, warmup: int = 1) -> dict[str, dict]:
    """Latency (seconds) of the workload for every model, interleaved: ``warmup`` untimed runs
    per model, then ``repeats`` rounds that run each model once. Per model: first pass, mean
    later pass and total as ``{"median", "min", "max"}`` over the rounds, ``"rounds_s"``
    (the total of each round, for per-round ratios) and, with a warm-up, ``"cold_total_s"``
    (the first warm-up run: oneDNN primitives and TASNet's sliced-weight cache still empty)."""
    dev = torch.device(device)
    nets = {name: net.to(dev).eval() for name, net in nets.items()}
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, height, width, generator=generator).to(dev).contiguous(memory_format=_layout(dev))
    tasks = tasks.to(dev)
    flush = torch.set_flush_denormal(True)
    runs: dict[str, list[tuple[float, list[float]]]] = {name: [] for name in nets}
    cold: dict[str, float] = {}
    try:
        for name, net in nets.items():
            for _ in range(warmup):
                first, later = _passes(net, image, tasks)
                cold.setdefault(name, first + sum(later))
        for _ in range(repeats):
            for name, net in nets.items():
                runs[name].append(_passes(net, image, tasks))
    finally:
        if flush:
            torch.set_flush_denormal(False)
    out = {}
    for name, rounds in runs.items():
        firsts = [first for first, _ in rounds]
        laters = [sum(later) / len(later) if later else 0.0 for _, later in rounds]
        totals = [first + sum(later) for first, later in rounds]
        out[name] = {"first_pass_s": _spread(firsts), "later_pass_s": _spread(laters), "total_s": _spread(totals),
                     "rounds_s": totals, "repeats": repeats, "warmup": warmup}
        if name in cold:
            out[name]["cold_total_s"] = cold[name]
    return out


def time_workload(net: nn.Module, height: int, width: int, tasks: Tensor, device: str,
                  repeats: int = 3, warmup: int = 1) -> dict:
    """Latency (seconds) of the workload: first pass, mean later pass and total, each as
    ``{"median", "min", "max"}`` over ``repeats`` after ``warmup`` untimed runs."""
    return time_workloads({"net": net}, height, width, tasks, device, repeats, warmup)["net"]


def _device_labels(threads: Sequence[int | None], device: str) -> list[tuple[str, str, int | None]]:
    """(label, torch device, threads) of every timing setting."""
    settings = []
    if device in ("cpu", "auto"):
        for count in threads:
            count = count or os.cpu_count() or 1
            label = f"cpu-{count}t"
            if label not in [s[0] for s in settings]:
                settings.append((label, "cpu", count))
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        settings.append(("cuda", "cuda", None))
    return settings


def bench_cost(models: Mapping[str, nn.Module], resolutions: Sequence[tuple[int, int]] = tuple(CPU_RESOLUTIONS),
               grid: str | list = "cresmd27", repeats: int = 3, warmup: int = 1,
               threads: Sequence[int | None] = (1, None), device: str = "cpu", reference: str | None = None,
               progress: bool = False) -> dict:
    """FLOPs and latency of every model at every resolution on the ``grid`` workload.

    ``device``: "cpu" (one timing per ``threads`` entry; None = all cores), "cuda", or "auto"
    (CPU settings plus CUDA when present). ``reference``: the model ratios are taken against
    (default "CResMD" if present, else the first). The models are timed interleaved
    (:func:`time_workloads`); per model and resolution: ``flops``, ``latency`` per setting,
    ``flops_ratio_vs_reference``, ``speedup_vs_reference`` (median per-round ratio),
    ``speedup_spread_vs_reference`` (its median, min, max) and ``efficiency_vs_reference``
    (speed-up / FLOPs ratio). Returns ``{"grid", "tasks", "labels", "devices", "reference",
    "results": {model: {"HxW": {...}}}}``.
    """
    from cirlab.tasks import grid_labels, level_grid

    tasks = level_grid(grid)
    settings = _device_labels(threads, device)
    reference = reference or ("CResMD" if "CResMD" in models else next(iter(models)))
    saved_threads = torch.get_num_threads()
    results: dict[str, dict] = {name: {} for name in models}
    try:
        for height, width in resolutions:
            key = f"{height}x{width}"
            for name, net in models.items():
                results[name][key] = {"height": height, "width": width,
                                      "flops": flops_split(net, tasks, height, width), "latency": {}}
            for label, dev, count in settings:
                if count is not None:
                    torch.set_num_threads(count)
                timed = time_workloads(models, height, width, tasks, dev, repeats, warmup)
                for name, latency in timed.items():
                    results[name][key]["latency"][label] = latency
                    if progress:
                        print(f"  {name} {key} {label}: {latency['total_s']['median'] * 1e3:.1f} ms", flush=True)
            for net in models.values():
                net.to("cpu")
    finally:
        torch.set_num_threads(saved_threads)
    for per_res in results.values():
        for key, entry in per_res.items():
            base = results[reference][key]
            flops_ratio = base["flops"]["total"] / max(entry["flops"]["total"], 1)
            entry["flops_ratio_vs_reference"] = flops_ratio
            entry["flops_saved_vs_reference"] = 1.0 - entry["flops"]["total"] / max(base["flops"]["total"], 1)
            spreads = {
                label: _spread([b / max(m, 1e-12) for b, m in zip(base["latency"][label]["rounds_s"], lat["rounds_s"])])
                for label, lat in entry["latency"].items()}
            entry["speedup_vs_reference"] = {label: spread["median"] for label, spread in spreads.items()}
            entry["speedup_spread_vs_reference"] = spreads
            entry["efficiency_vs_reference"] = {label: spread["median"] / flops_ratio for label, spread in spreads.items()}
    return {"grid": grid if isinstance(grid, str) else "custom", "tasks": tasks.tolist(),
            "labels": grid_labels(tasks), "devices": [s[0] for s in settings], "reference": reference,
            "results": results}


# --------------------------------------------------------------------------- outputs
def _g(flops: float) -> str:
    return f"{flops / 1e9:,.2f}" if flops >= 1e8 else f"{flops / 1e9:.4f}"


def markdown_table(record: dict, notes: Sequence[str] = ()) -> str:
    """Table 1 of the paper, one block per resolution: rows = models."""
    lines = [f"# Cost on the {len(record['tasks'])}-point workload ({record['grid']})", ""]
    for key in ("command", "date", "revision"):
        if key in record:
            lines.append(f"- {key}: `{record[key]}`")
    if "machine" in record:
        machine = record["machine"]
        lines.append(f"- machine: {machine.get('cpu')} ({machine.get('cpu_count')} cores)"
                     + (f", {machine['gpu']}" if "gpu" in machine else "") + f", torch {machine.get('torch')}")
    lines += [f"- {note}" for note in notes]
    lines += [("- FLOPs: analytic convolution FLOPs (2 per MAC), G = 1e9; first pass = shared prefix + first "
               "task, later = each further task (mean over tasks). Latency: median over repeats after warm-up, "
               "[min-max]; one task per pass. Speed-up: reference / model per interleaved round, median "
               "[min-max]; efficiency = speed-up / FLOPs ratio."), ""]
    models = list(record["results"])
    resolutions = list(record["results"][models[0]])
    devices = record["devices"]
    for res in resolutions:
        header = ["model", "GFLOPs first pass", "GFLOPs later pass", "GFLOPs total", f"FLOPs vs {record['reference']}"]
        for dev in devices:
            header += [f"{dev} first (ms)", f"{dev} later (ms)", f"{dev} total (ms)", f"{dev} speed-up",
                       f"{dev} efficiency"]
        lines += [f"## {res}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for name in models:
            entry = record["results"][name][res]
            flops = entry["flops"]
            later = flops["later_pass"][1:] or flops["later_pass"]
            row = [name, _g(flops["first_pass"][0]), _g(sum(later) / len(later)), _g(flops["total"]),
                   f"{entry['flops_ratio_vs_reference']:.2f}x ({100 * entry['flops_saved_vs_reference']:.1f}% fewer)"]
            for dev in devices:
                lat = entry["latency"][dev]
                for part in ("first_pass_s", "later_pass_s"):
                    row.append(f"{lat[part]['median'] * 1e3:.1f}")
                total = lat["total_s"]
                row.append(f"{total['median'] * 1e3:.1f} [{total['min'] * 1e3:.1f}-{total['max'] * 1e3:.1f}]")
                spread = entry.get("speedup_spread_vs_reference", {}).get(dev)
                speedup = f"{entry['speedup_vs_reference'][dev]:.2f}x"
                if spread:
                    speedup += f" [{spread['min']:.2f}-{spread['max']:.2f}]"
                row.append(speedup)
                efficiency = entry.get("efficiency_vs_reference", {}).get(dev)
                row.append("" if efficiency is None else f"{efficiency:.2f}")
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines)


def plot_flops_per_task(record: dict, path: str | Path, resolution: str | None = None) -> Path:
    """Figure 11: FLOPs of each task of the workload, first pass (solid) and later pass (dashed),
    one colour per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(record["results"])
    resolution = resolution or list(record["results"][models[0]])[-1]
    labels = record["labels"]
    fig, ax = plt.subplots(figsize=(max(8.0, 0.4 * len(labels)), 4.5))
    x = list(range(len(labels)))
    for i, name in enumerate(models):
        flops = record["results"][name][resolution]["flops"]
        colour = f"C{i % 10}"
        ax.plot(x, [f / 1e9 for f in flops["first_pass"]], "-o", color=colour, ms=3, label=f"{name} first pass")
        ax.plot(x, [f / 1e9 for f in flops["later_pass"]], "--", color=colour, label=f"{name} later pass")
    ax.set_xticks(x)
    ax.set_xticklabels(labels, rotation=90, fontsize=7)
    ax.set_ylabel(f"GFLOPs per task ({resolution})")
    ax.set_title("FLOPs per task across restoration levels")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path = Path(path)
    from cirlab.figures import save_figure_atomically

    save_figure_atomically(fig, path)
    plt.close(fig)
    return path


def build_models(cresmd: str | None = None, tasnet: str | None = None, tsnet: str | None = None,
                 nf: int = 64, nb: int = 32, fractions: Sequence[float] = NAIVE_FRACTIONS,
                 seed: int = 0, synthetic: bool = False) -> tuple[dict[str, nn.Module], list[str]]:
    """The benchmark's models and notes on how they were made: CResMD (checkpoint or random
    init), TSNet / TASNet (derived checkpoints, when given), the synthetic paper-scale TASNet
    (``synthetic``: :func:`synthetic_tasnet` at ``nf``, ``nb``) and CResMD naively shared at each
    fraction (from the CResMD weights when given, else random init)."""
    from cirlab.checkpoints import load_network

    notes, models = [], {}
    derived = {name: load_network(path) for name, path in (("TSNet", tsnet), ("TASNet", tasnet)) if path}
    if synthetic:
        derived[SYNTHETIC_NAME] = synthetic_tasnet(nf, nb, seed=seed)
        notes.append(f"{SYNTHETIC_NAME} is SYNTHETIC: a derived TASNet (nf {nf}, nb {nb}) with random weights and "
                     f"paper-shaped widths ({derived[SYNTHETIC_NAME].shared_maps} shared maps, task-specific widths "
                     f"{SYNTHETIC_WIDTHS}, widening with the mean restoration level): a latency measurement of "
                     "those widths, not of a trained network.")
    if cresmd:
        base = load_network(cresmd)
        if isinstance(base, TASNet):
            raise ValueError(f"--cresmd {cresmd}: expected a CResMD checkpoint, got a TASNet")
    else:
        first = next(iter(derived.values()), None)
        nf, nb = (first.nf, first.nb) if first is not None else (nf, nb)
        torch.manual_seed(seed)
        base = CResMDNet(nf=nf, nb=nb).eval()
        notes.append(f"CResMD (nf {nf}, nb {nb}) and its naive-sharing variants are randomly initialised "
                     "(no --cresmd): their FLOPs are what matter, their outputs are meaningless.")
    models["CResMD"] = base
    models.update(derived)
    for fraction in fractions:
        # [choice] the rows are Table 4's variants, as model=cresmd_shared builds them: the first
        # maps whose FLOPs fraction matches the paper's for that label (nb 32: 24, 48, 67 maps)
        shared = table4_shared_maps(base.nf, base.nb, fraction)
        models[f"CResMD-{round(100 * fraction)}%shared"] = TASNet.from_cresmd(base, shared_maps=shared).eval()
    if fractions:
        notes.append("CResMD-N%shared: Table 4's naive variants, their first " + ", ".join(
            f"{table4_shared_maps(base.nf, base.nb, f)}" for f in fractions) + f" of {2 * base.nb + 3} maps shared, "
            "the counts whose FLOPs fraction is closest to the paper's (132.0, 69.5, 7.0 of 189.1 G).")
    for name, net in derived.items():
        if (net.nf, net.nb) != (base.nf, base.nb):
            notes.append(f"{name} has nf {net.nf}, nb {net.nb} but CResMD nf {base.nf}, nb {base.nb}.")
    return models, notes


__all__ = ["CPU_RESOLUTIONS", "PAPER_RESOLUTIONS", "SYNTHETIC_NAME", "bench_cost", "build_models", "flops_split",
           "markdown_table", "naive_shared_maps", "plot_flops_per_task", "synthetic_tasnet", "time_workload",
           "time_workloads"]
