"""``python -m cirlab.hyperres_eval``: PSNR against degradation level, one curve per model.

Scores HyperRes checkpoints and dedicated per-level networks (``experiment=hyperres_dedicated*``)
over a range of levels, inside and outside the training range, as the paper's comparison
figure (METHOD.md section 5)::

    python -m cirlab.hyperres_eval --task denoise --model hyperres=logs/.../last.ckpt \\
        --model logs/hyperres_dedicated/multiruns/.../*/checkpoints/last.ckpt

Defaults per task (``cirlab.data.levels.TASKS``): denoise on ``<data-root>/CBSD68`` (RGB) at
sigma 5, 10, ..., 90; DeJPEG on ``<data-root>/LIVE1`` (Y) at q 10, 20, ..., 80; SR on
``<data-root>/Set5`` (Y) at x2 .. x6. Inputs are generated deterministically image by image
(``cirlab.data.levels.iter_level_images``: image i at level L always gets the same noise), so
every model sees the same inputs. Each image's levels go through a model in chunks of
``--chunk`` levels per forward pass (a mixed-level batch for HyperRes). PSNR/SSIM: paper
convention (outputs clamped and rounded to uint8, whole image, no border crop), per image, then
averaged over the set.

Output folder (``--out``): ``levels.md`` / ``levels.csv`` (PSNR per level and model, the
degraded input's PSNR, and for dedicated networks the envelope "dedicated (own level)": each
level scored by the network trained at it), ``levels_ssim.csv``, ``levels.json`` and
``levels_psnr.png`` (PSNR against level, one curve per model; training levels of HyperRes
marked). A model given as ``NAME=PATH`` is labelled NAME; otherwise its task name and training
levels label it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cirlab.data.levels import LevelSetSpec, get_task, iter_level_images
from cirlab.utils.run import write_json_atomically, write_text_atomically

log = logging.getLogger(__name__)

ENVELOPE = "dedicated (own level)"


@dataclass
class LevelModel:
    """A network scored by the sweep: ``net(x, c)`` with c = level / ``level_scale``."""

    name: str
    net: torch.nn.Module
    level_scale: float = 255.0
    train_levels: list[float] = field(default_factory=list)
    dedicated: bool = False
    task: str | None = None


def load_level_model(spec: str, device: str | torch.device = "cpu") -> LevelModel:
    """``PATH`` or ``NAME=PATH`` of a cirlab HyperRes checkpoint (HyperResNet or a dedicated MainNet)."""
    from cirlab.eval import load_module
    from cirlab.models.hyperres import MainNet

    name, sep, path = spec.partition("=")
    if not sep:
        name, path = "", spec
    module = load_module(path)
    hp = module.hparams
    if "level_scale" not in hp:
        raise ValueError(f"{path}: not a HyperRes checkpoint (model=hyperres or hyperres_dedicated)")
    levels = [float(v) for v in (hp.get("train_levels") or [])]
    dedicated = isinstance(module.net, MainNet)
    if not name:
        text = ",".join(f"{v:g}" for v in levels)
        name = f"dedicated {text}" if dedicated else f"HyperRes [{text}]"
    net = module.net.to(device).eval()
    return LevelModel(name=name, net=net, level_scale=float(hp["level_scale"]), train_levels=levels,
                      dedicated=dedicated, task=hp.get("task"))


@torch.no_grad()
def evaluate_levels(models: Sequence[LevelModel], task: str, folder: str | Path, levels: Sequence[float] | None = None,
                    *, channel: str | None = None, seed: int = 0, max_images: int | None = None, crop: int | None = None,
                    device: str | torch.device = "cpu", chunk: int = 6, progress: bool = True) -> dict:
    """Mean PSNR/SSIM of each model at each level over the images of ``folder``.

    Returns ``{"task", "channel", "folder", "images", "levels", "psnr": {name: [..]}, "ssim": {..}}``;
    ``psnr`` also holds ``"input"`` (the degraded images) and, when dedicated networks are given,
    the envelope ``"dedicated (own level)"`` (NaN at levels no dedicated network was trained at).
    """
    from tqdm.auto import tqdm

    from cirlab.metrics import paper_psnr, paper_ssim

    spec_task = get_task(task)
    levels = spec_task.check(levels if levels is not None else spec_task.sweep_levels, "levels")
    channel = channel or spec_task.channel
    for model in models:
        if model.task and model.task != task:
            log.warning("model %r was trained for task %r, scored on %r", model.name, model.task, task)
    spec = LevelSetSpec(folder=str(folder), task=task, levels=levels, max_images=max_images, crop=crop, seed=seed,
                        config_key="--data")
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise ValueError(f"model names must be unique, got {names}")
    sums = {key: torch.zeros(len(levels), dtype=torch.float64) for key in ["input", *names]}
    ssim_sums = {key: torch.zeros(len(levels), dtype=torch.float64) for key in ["input", *names]}
    count = 0
    level_tensor = torch.tensor(levels, dtype=torch.float32)
    for _, clean, degraded in tqdm(iter_level_images(spec), desc=f"{task} sweep", disable=not progress):
        target = clean.float().div(255)[None].to(device)
        inputs = degraded.float().div(255).to(device)
        targets = target.expand_as(inputs)
        sums["input"] += paper_psnr(inputs, targets, channel).cpu()
        ssim_sums["input"] += paper_ssim(inputs, targets, channel).cpu()
        for model in models:
            outputs = []
            for start in range(0, len(levels), chunk):
                part = inputs[start : start + chunk]
                c = (level_tensor[start : start + chunk] / model.level_scale).to(device)
                outputs.append(model.net(part, c).clamp(0, 1))
            output = torch.cat(outputs)
            sums[model.name] += paper_psnr(output, targets, channel).cpu()
            ssim_sums[model.name] += paper_ssim(output, targets, channel).cpu()
        count += 1
    if count == 0:
        raise ValueError(f"no images in {folder}")
    psnr = {key: (value / count).tolist() for key, value in sums.items()}
    ssim = {key: (value / count).tolist() for key, value in ssim_sums.items()}
    dedicated = [m for m in models if m.dedicated and len(m.train_levels) == 1]
    if dedicated:
        envelope = [float("nan")] * len(levels)
        for model in dedicated:
            for i, level in enumerate(levels):
                if abs(level - model.train_levels[0]) < 1e-9:
                    envelope[i] = psnr[model.name][i]
        psnr[ENVELOPE] = envelope
    train_levels = {m.name: m.train_levels for m in models}
    return {"task": task, "channel": channel, "folder": str(folder), "images": count, "levels": levels,
            "psnr": psnr, "ssim": ssim, "train_levels": train_levels}


def write_level_tables(out_dir: Path, stem: str, levels: Sequence[float], columns: dict[str, Sequence[float]],
                       title: str = "") -> list[Path]:
    """``<stem>.md`` and ``<stem>.csv``: one row per level, one column per entry of ``columns``."""
    out_dir = Path(out_dir)
    names = list(columns)
    lines = ([f"{title}", ""] if title else []) + ["| level | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    csv = ["level," + ",".join(f'"{n}"' if "," in n else n for n in names)]
    for i, level in enumerate(levels):
        values = [f"{float(columns[n][i]):.4f}" for n in names]
        lines.append(f"| {float(level):g} | " + " | ".join(v if v != "nan" else "" for v in values) + " |")
        csv.append(f"{float(level):g}," + ",".join(values))
    md, csv_path = out_dir / f"{stem}.md", out_dir / f"{stem}.csv"
    write_text_atomically(md, "\n".join(lines) + "\n")
    write_text_atomically(csv_path, "\n".join(csv) + "\n")
    return [md, csv_path]


def plot_levels(result: dict, path: Path, show_each_dedicated: bool = False) -> Path:
    """PSNR against level, one curve per model (the paper's comparison figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cirlab.callbacks import save_figure_atomically

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


def write_outputs(result: dict, out_dir: Path, show_each_dedicated: bool = False) -> list[Path]:
    out_dir = Path(out_dir)
    title = (f"PSNR (dB, {result['channel'].upper()}) against {get_task(result['task']).unit}: "
             f"{result['task']} on {result['folder']} ({result['images']} images)")
    paths = write_level_tables(out_dir, "levels", result["levels"], result["psnr"], title)
    paths.append(write_level_tables(out_dir, "levels_ssim", result["levels"], result["ssim"])[1])
    write_json_atomically(out_dir / "levels.json", result)
    paths.append(out_dir / "levels.json")
    paths.append(plot_levels(result, out_dir / "levels_psnr.png", show_each_dedicated))
    return paths


def parse_levels(text: str | None) -> list[float] | None:
    """``"5:90:5"`` (inclusive range) or ``"5,10,20"``; None keeps the task's sweep."""
    if not text:
        return None
    if ":" in text:
        start, stop, step = (float(v) for v in text.split(":"))
        count = int(round((stop - start) / step)) + 1
        return [start + i * step for i in range(count)]
    return [float(v) for v in text.split(",")]


def run(argv: Sequence[str] | None = None) -> dict:
    """Parse the command line, score the models, write the outputs; returns the result dict."""
    parser = argparse.ArgumentParser(prog="python -m cirlab.hyperres_eval", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True, choices=sorted(("denoise", "dejpeg", "sr")))
    parser.add_argument("--model", action="append", default=[], metavar="[NAME=]CKPT",
                        help="a HyperRes or dedicated checkpoint (repeat; shell globs work)")
    parser.add_argument("models", nargs="*", metavar="CKPT", help="more checkpoints")
    parser.add_argument("--data", help="folder of clean test images (default: <data-root>/<task's test set>)")
    parser.add_argument("--data-root", default="data", help="default: data")
    parser.add_argument("--levels", help="'5:90:5' (inclusive) or '5,10,20'; default: the task's sweep")
    parser.add_argument("--channel", choices=("rgb", "y"), help="default: rgb for denoise, y for dejpeg and sr")
    parser.add_argument("--max-images", type=int)
    parser.add_argument("--crop", type=int, help="centre crop (pixels) of each image; default: whole images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chunk", type=int, default=6, help="levels per forward pass (default 6)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", help="output folder (default: logs/hyperres_eval/<task>_<date>_<time>)")
    parser.add_argument("--show-each-dedicated", action="store_true", help="also draw one curve per dedicated network")
    args = parser.parse_args(argv)
    specs = [*args.model, *args.models]
    if not specs:
        parser.error("give at least one checkpoint (--model [NAME=]CKPT)")
    task = get_task(args.task)
    folder = Path(args.data) if args.data else Path(args.data_root) / task.test_set
    if not folder.is_dir():
        parser.error(f"--data {folder}: no such folder (put the {task.test_set} images there or pass --data)")
    out = Path(args.out) if args.out else Path("logs") / "hyperres_eval" / f"{args.task}_{dt.datetime.now():%Y-%m-%d_%H-%M-%S}"
    models = [load_level_model(spec, args.device) for spec in specs]
    result = evaluate_levels(models, args.task, folder, parse_levels(args.levels), channel=args.channel, seed=args.seed,
                             max_images=args.max_images, crop=args.crop, device=args.device, chunk=args.chunk)
    paths = write_outputs(result, out, args.show_each_dedicated)
    print((out / "levels.md").read_text())
    print("written:", ", ".join(str(p) for p in paths))
    return result


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point (returns nothing, so a console script exits 0)."""
    logging.basicConfig(level=logging.INFO)
    run(argv)


if __name__ == "__main__":
    main()
