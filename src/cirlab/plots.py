"""Figures people look at rather than read (matplotlib, Agg backend)."""

from __future__ import annotations


def architecture_figure(arch: dict, title: str = ""):
    """Channels per searchable feature map, in the spirit of TASNet's Figures 2 and 11.

    ``arch`` is ``TASNetSearch.architecture()``: shared maps are one bar (the channels kept
    for every task); task-specific maps show the mean over the workload's tasks with their
    min-max range; the dashed line marks the end of the shared prefix.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    maps = arch["maps"]
    positions = list(range(1, len(maps) + 1))
    shared = [m["shared"] for m in maps]
    means = [m["channels_mean"] for m in maps]
    low = [m["channels_mean"] - m["channels_min"] for m in maps]
    high = [m["channels_max"] - m["channels_mean"] for m in maps]
    figure, axis = plt.subplots(figsize=(max(8, len(maps) * 0.18), 3.6))
    axis.bar([p for p, s in zip(positions, shared) if s], [v for v, s in zip(means, shared) if s],
             color="#3b7dd8", label="shared (task-agnostic)")
    axis.bar([p for p, s in zip(positions, shared) if not s], [v for v, s in zip(means, shared) if not s],
             color="#e8833a", label="task-specific (mean over tasks)",
             yerr=[[v for v, s in zip(low, shared) if not s], [v for v, s in zip(high, shared) if not s]],
             error_kw={"elinewidth": 0.8, "capsize": 1.5})
    axis.plot(positions, [m["channels_full"] for m in maps], color="0.6", linewidth=0.8, label="supernetwork")
    prefix = arch["shared_maps"]
    if 0 < prefix < len(maps):
        axis.axvline(prefix + 0.5, color="k", linestyle="--", linewidth=0.8)
    ticks = [p for p in positions if p == 1 or p % 8 == 0 or p >= len(maps) - 1]
    axis.set_xticks(ticks)
    axis.set_xticklabels([maps[p - 1]["name"] for p in ticks], rotation=45, ha="right", fontsize=7)
    axis.set_ylabel("active channels")
    axis.set_xlim(0.3, len(maps) + 0.7)
    summary = (f"{prefix} shared maps, {arch['flops_per_inference'] / 1e9:.1f} GFLOPs per inference "
               f"({arch['tasks']} tasks at {arch['width']}x{arch['height']}), "
               f"{100 * arch['flops_ratio']:.1f}% of CResMD")
    axis.set_title(f"{title}: {summary}" if title else summary, fontsize=9)
    axis.legend(fontsize=7, loc="lower left", framealpha=0.9)
    figure.tight_layout()
    return figure
