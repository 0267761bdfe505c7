"""Score scalar-level models (HyperRes, dedicated per-level networks) over a sweep of levels.

:func:`evaluate_levels` runs every model on the same deterministic inputs
(:func:`cirlab.data.hyperres.iter_level_images`: image i at level L always gets the same noise),
``chunk`` levels per forward pass (a mixed-level batch for HyperRes), and scores them with the
paper convention (outputs clamped and rounded to uint8, whole image, the task's channel: RGB
for denoising, BT.601 Y for DeJPEG and SR), per image, then averaged over the set. For
dedicated networks it adds the envelope column ``ENVELOPE``: each level scored by the network
trained at it. :func:`write_outputs` writes ``levels.md/.csv``, ``levels_ssim.csv``,
``levels.json`` and ``levels_psnr.png`` (``cirlab-hyperres-eval`` is the command).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cirlab.data.hyperres import ENVELOPE, LevelSetSpec, get_task, iter_level_images
from cirlab.figures import plot_levels
from cirlab.reports import write_level_tables
from cirlab.utils.run import write_json_atomically

log = logging.getLogger(__name__)



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
    from cirlab.archs.hyperres import MainNet
    from cirlab.checkpoints import load_module

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


# --------------------------------------------------------------------------- the levels protocol
SCALAR_KINDS = ("hyperres", "hyperres_dedicated")


def level_model(restorer) -> LevelModel:
    """The :class:`LevelModel` of a scalar-level restorer (``cirlab.evaluation.restorers``)."""
    if getattr(restorer, "kind", None) not in SCALAR_KINDS:
        raise ValueError(f"protocol=levels scores scalar-level models ({', '.join(SCALAR_KINDS)}); model "
                         f"{restorer.name!r} is a {restorer.kind} checkpoint: use protocol=grid")
    return LevelModel(name=restorer.name, net=restorer.net, level_scale=restorer.level_scale,
                      train_levels=list(restorer.train_levels), dedicated=restorer.kind == "hyperres_dedicated",
                      task=restorer.task)


def run_levels(cfg, restorers, out_dir: Path):
    """The ``levels`` protocol (``conf/protocol/levels*.yaml``): HyperRes level sweeps as
    ``cirlab-hyperres-eval`` runs them (:func:`evaluate_levels`, :func:`write_outputs` under
    ``out_dir``). Quality: PSNR and SSIM averaged over the sweep's levels. FLOPs: one image of
    ``protocol.flops_resolution`` at every sweep level (one generated network per level)."""
    from cirlab.evaluation.protocols import ProtocolResult, resolve_images, workload_size
    from cirlab.evaluation.restorers import hyperres_flops

    settings = cfg.protocol
    task = get_task(str(settings.task))
    levels = task.check(settings.levels if settings.get("levels") is not None else task.sweep_levels, "protocol.levels")
    models = [level_model(r) for r in restorers]  # before any image is read
    folder = resolve_images(cfg, Path(cfg.paths.data_dir) / task.test_set)
    device = restorers[0].device if restorers else "cpu"
    result = evaluate_levels(models, task.name, folder, levels, channel=settings.get("channel"),
                             seed=int(settings.get("seed", 0)), max_images=settings.get("max_images"),
                             crop=settings.get("crop"), device=device, chunk=int(settings.get("chunk", 6)))
    files = write_outputs(result, Path(out_dir), bool(settings.get("show_each_dedicated", False)))
    height, width = workload_size(cfg)
    quality = {m.name: {"psnr": sum(result["psnr"][m.name]) / len(levels), "ssim": sum(result["ssim"][m.name]) / len(levels)}
               for m in models}
    flops = {r.name: hyperres_flops(r.net, len(levels), height, width) for r in restorers}
    text = ", ".join(f"{v:g}" for v in levels)
    return ProtocolResult(
        protocol=f"levels ({task.name})", metrics=["psnr", "ssim"], quality=quality, flops=flops,
        workload={"tasks": len(levels), "height": height, "width": width,
                  "text": f"{len(levels)} {task.unit} levels ({text}) on one {width}x{height} image"},
        kinds={r.name: r.kind for r in restorers},
        notes=[f"Images: {folder} ({result['images']}), {task.name} at {task.unit} {text}, channel "
               f"{result['channel']}; PSNR/SSIM average the levels (per level: levels.md)."],
        files=files, details={"levels": levels, "psnr": result["psnr"], "ssim": result["ssim"]})
