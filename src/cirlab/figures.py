"""Figures: atomic PNG writing, publishing to the run's loggers, and the suite's plots (matplotlib, Agg).

Every figure file is written through a temporary file and renamed, so a reader never sees a
half-written PNG.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

from cirlab.utils.files import atomic_path


def save_figure_atomically(figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100, bbox_inches="tight")


def publish_figure(trainer, figure, dirpath: Path, name: str, key: str, latest: str = "latest",
                   caption: str | None = None) -> Path:
    """Save ``figure`` as ``dirpath/<name>.png`` and ``dirpath/<latest>.png``, close it, and send
    it to every logger that takes images (W&B: a ``wandb.Image`` with ``caption``) under ``key``."""
    import matplotlib.pyplot as plt

    path = Path(dirpath) / f"{name}.png"
    save_figure_atomically(figure, path)
    save_figure_atomically(figure, Path(dirpath) / f"{latest}.png")
    plt.close(figure)
    for logger in trainer.loggers:
        if hasattr(logger, "log_image"):
            extra = {"caption": [caption]} if caption else {}
            logger.log_image(key=key, images=[str(path)], step=trainer.global_step, **extra)
    return path


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


def to_pil(image: Tensor):
    """(3, H, W) in [0, 1] -> an 8-bit RGB PIL image (clamped, rounded)."""
    from PIL import Image

    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


def contact_sheet(images: list[Tensor], labels: list[str], thumb: int = 256, columns: int | None = None):
    """A PIL image: thumbnails (longest side ``thumb``) in a grid, each with its label below."""
    from PIL import Image, ImageDraw, ImageFont

    columns = columns or min(len(images), max(1, math.ceil(math.sqrt(len(images)))))
    rows = math.ceil(len(images) / columns)
    height, width = images[0].shape[-2:]
    scale = min(1.0, thumb / max(height, width))
    tw, th = max(1, round(width * scale)), max(1, round(height * scale))
    try:
        font = ImageFont.load_default(size=12)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    label_h, pad = 18, 4
    sheet = Image.new("RGB", (columns * (tw + pad) + pad, rows * (th + label_h + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (image, label) in enumerate(zip(images, labels)):
        row, col = divmod(i, columns)
        x, y = pad + col * (tw + pad), pad + row * (th + label_h + pad)
        sheet.paste(to_pil(image).resize((tw, th)), (x, y))
        draw.text((x, y + th + 2), label, fill="black", font=font)
    return sheet


def plot_levels(result: dict, path: Path, show_each_dedicated: bool = False) -> Path:
    """PSNR against level, one curve per model (the paper's comparison figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cirlab.data.hyperres import ENVELOPE, get_task

    task = get_task(result["task"])
    levels = result["levels"]
    figure, axis = plt.subplots(figsize=(7, 4.5))
    dedicated = {name for name, tl in result["train_levels"].items() if len(tl) == 1}
    for name, values in result["psnr"].items():
        if name == "input":
            axis.plot(levels, values, ":", color="grey", label="degraded input")
        elif name == ENVELOPE:
            axis.plot(levels, values, "s--", color="black", markersize=4, label=name)
        elif name in dedicated:
            if show_each_dedicated:
                axis.plot(levels, values, "-", alpha=0.35, linewidth=1, label=name)
        else:
            line = axis.plot(levels, values, "o-", markersize=3, label=name)[0]
            for level in result["train_levels"].get(name, []):
                if level in levels:
                    axis.plot([level], [values[levels.index(level)]], "D", color=line.get_color(), markersize=7,
                              markerfacecolor="none")
    axis.set_xlabel(task.unit)
    axis.set_ylabel(f"PSNR (dB, {result['channel'].upper()})")
    axis.set_title(f"{result['task']}: {Path(result['folder']).name}, {result['images']} images "
                   "(diamonds: HyperRes training levels)", fontsize=9)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    save_figure_atomically(figure, Path(path))
    plt.close(figure)
    return Path(path)


def plot_curves(x: list[float], panels: list[tuple[str, dict[str, list[float]]]], path: Path, xlabel: str,
                title: str = "", reference: dict[int, float] | None = None) -> Path:
    """Side-by-side panels of curves against one swept level (TASNet Figure 10's shape): each
    panel is ``(y label, {curve name: values at x})``; ``reference`` draws a dashed horizontal
    line at ``{panel index: y}``. Saved atomically as a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), squeeze=False)
    for i, (axis, (ylabel, curves)) in enumerate(zip(axes[0], panels)):
        for name, values in curves.items():
            axis.plot(x, values, "o-", markersize=3, label=name)
        if reference and i in reference:
            axis.axhline(reference[i], color="grey", linestyle="--", linewidth=0.8)
        axis.set_xlabel(xlabel)
        axis.set_ylabel(ylabel)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    save_figure_atomically(figure, Path(path))
    plt.close(figure)
    return Path(path)


def plot_quality_flops(points: dict[str, tuple[float, float]], path: Path, *, ylabel: str = "PSNR (dB)",
                       xlabel: str = "GFLOPs per inference", title: str = "") -> Path:
    """One labelled point per model: ``points[name] = (FLOPs, quality)``, FLOPs on a log axis
    (shown in GFLOPs). Saved atomically as a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 4.4))
    for index, (name, (flops, quality)) in enumerate(points.items()):
        axis.scatter([flops / 1e9], [quality], s=48, color=f"C{index % 10}", zorder=3)
        axis.annotate(name, (flops / 1e9, quality), textcoords="offset points", xytext=(6, 4), fontsize=8)
    if points and min(f for f, _ in points.values()) > 0:
        axis.set_xscale("log")
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.grid(True, which="both", alpha=0.3)
    if title:
        axis.set_title(title, fontsize=10)
    save_figure_atomically(figure, Path(path))
    plt.close(figure)
    return Path(path)
