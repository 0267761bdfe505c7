"""``cirlab-eval``: score one or several checkpoints of any kind under one protocol, side by side.

    cirlab-eval ckpt_path=logs/.../last.ckpt                        # one checkpoint, the 27-point grid
    cirlab-eval 'models={CResMD:a.ckpt,TASNet:derive/tasnet.ckpt}'  # a comparison, NAME: PATH
    cirlab-eval "models=['CResMD=a.ckpt',b.ckpt]"                  # a list: PATH or 'NAME=PATH' (quoted)
    cirlab-eval protocol=levels 'models={HyperRes:h.ckpt}' images=cbsd68

:func:`run_eval` reads the checkpoints (:func:`cirlab.evaluation.restorers.load_restorer`),
checks every model against the protocol before any image is scored, runs the protocol
(:mod:`cirlab.evaluation.protocols`: ``cfg.protocol.runner``) and writes, in
``paths.output_dir``:

* ``comparison.md`` / ``.csv`` / ``.json``: per model its quality averages and its FLOPs on the
  protocol's workload, in total and per inference;
* ``comparison.png``: quality against FLOPs per inference, one point per model;
* the protocol's own files (grid: ``test_per_task.*`` and ``test_average.md``, in a folder per
  model when there are several; levels: ``levels.*``);
* for one checkpoint on the grid, ``metrics.json`` as before;
* with a logger (``logger=csv``, ``logger=wandb``: offline without credentials), every model's
  numbers as ``eval/<protocol>/<model>/<metric>``; W&B also gets the table and the plot, and the
  protocol's own records (the blind studies log theirs to the same run).

One module checkpoint given as ``ckpt_path`` on the grid runs through ``trainer.test``
(:func:`cirlab.evaluation.grid.evaluate`: loggers, DDP, ``iqa=true``), with the protocol's grid,
images, image count and crop; everything else runs through the restorers in this process. Both
score with the same convention and give the same numbers (tests/test_eval.py checks it).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from cirlab.evaluation.protocols import ProtocolResult, get_runner, protocol_name, resolve_images, workload_size

log = logging.getLogger(__name__)

#: Kinds whose module checkpoints ``trainer.test`` scores on a task-vector grid.
TRAINER_KINDS = ("cresmd", "tsnet_search", "tasnet_search", "tasnet_finetune", "hyperres_3d")


@dataclass
class EvalResult:
    """``comparison``: the protocol's result; ``paths``: the comparison files; ``grid``: the
    ``GridEvaluation`` of the ``trainer.test`` path (None otherwise)."""

    comparison: ProtocolResult
    paths: list[Path]
    grid: object | None = None


def model_specs(cfg: DictConfig) -> list[str]:
    """The checkpoints to score: ``ckpt_path`` (one) or ``models``: a list of ``PATH`` or ``NAME=PATH``
    (Hydra needs the latter quoted: ``"models=['A=a.ckpt']"``) or a mapping ``{NAME: PATH}``."""
    ckpt = cfg.get("ckpt_path")
    models = cfg.get("models") or []
    if isinstance(models, str):
        models = [models]
    elif OmegaConf.is_dict(models) or isinstance(models, dict):  # {NAME: PATH}, in the order given
        models = [f"{name}={path}" for name, path in models.items()]
    models = [str(m) for m in models]
    if ckpt and models:
        raise ValueError("give ckpt_path=PATH (one checkpoint) or models=[NAME=PATH,...], not both")
    if not ckpt and not models:
        raise ValueError("ckpt_path is not set: give ckpt_path=PATH (one checkpoint) or 'models=[NAME=PATH,...]'")
    return [str(ckpt)] if ckpt else models


def _device(cfg: DictConfig) -> str:
    import torch

    device = str(cfg.get("device") or "auto")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device}: CUDA is not available on this machine")
    return device


def load_restorers(cfg: DictConfig, specs: list[str]) -> list:
    """Every model of the call, loaded (errors name the file); names and their folders unique."""
    from cirlab.evaluation.grid import model_folder
    from cirlab.evaluation.restorers import load_restorer

    key = "ckpt_path" if cfg.get("ckpt_path") else "models"
    device = _device(cfg)
    max_batch = cfg.get("max_batch")
    restorers = [load_restorer(spec, device, max_batch=None if max_batch is None else int(max_batch), key=key)
                 for spec in specs]
    names = [r.name for r in restorers]
    folders = [model_folder(n) for n in names]
    if len(set(names)) != len(names) or len(set(folders)) != len(folders):
        raise ValueError(f"models: names must be unique (also as folder names), got {names}; label them NAME=PATH")
    return restorers


def _use_trainer(cfg: DictConfig, specs: list[str], restorers: list) -> bool:
    return (protocol_name(cfg) == "grid" and bool(cfg.get("ckpt_path")) and len(restorers) == 1
            and restorers[0].kind in TRAINER_KINDS)


def _trainer_grid(cfg: DictConfig, restorer) -> tuple[ProtocolResult, object]:
    """The grid protocol of one module checkpoint through ``trainer.test`` (grid.evaluate)."""
    from cirlab.evaluation.grid import evaluate
    from cirlab.tasks import level_grid

    settings = OmegaConf.to_container(cfg.protocol, resolve=True)
    grid = settings.get("grid") or "cresmd27"
    tasks = level_grid(grid)
    restorer.check_tasks(tasks)
    folder = resolve_images(cfg, cfg.data.get("test_dir"))
    with open_dict(cfg):  # the protocol decides what the test set is
        cfg.data.test_dir = str(folder)
        cfg.data.test_grid = grid
        cfg.data.test_max_images = settings.get("max_images")
        cfg.data.test_crop = settings.get("crop")
    scored = evaluate(cfg)
    height, width = workload_size(cfg)
    metrics = scored.metrics
    quality = {restorer.name: {"psnr": metrics["test/psnr"], "ssim": metrics["test/ssim"],
                               "psnr_all_points": metrics.get("test/psnr_all_points", float("nan"))}}
    for extra in ("niqe", "brisque"):
        if f"test/{extra}" in metrics:
            quality[restorer.name][extra] = metrics[f"test/{extra}"]
    grid_name = grid if isinstance(grid, str) else f"custom grid of {len(tasks)}"
    result = ProtocolResult(
        protocol="grid", metrics=["psnr", "ssim"], quality=quality,
        flops={restorer.name: int(restorer.flops(tasks, height, width))},
        workload={"tasks": len(tasks), "height": height, "width": width,
                  "text": f"{grid_name} ({len(tasks)} task vectors) on one {width}x{height} image"},
        kinds={restorer.name: restorer.kind},
        notes=[f"Images: {folder}, grid {grid_name}, seed {cfg.seed}; paper convention (uint8, RGB, whole image); "
               "PSNR/SSIM average the points with some degradation (trainer.test)."],
        details={"per_task": scored.per_task.values if scored.per_task is not None else None})
    return result, scored


def write_comparison(result: ProtocolResult, out_dir: Path) -> list[Path]:
    """``comparison.md/.csv/.json`` and ``comparison.png`` (atomically) in ``out_dir``."""
    from cirlab.figures import plot_quality_flops
    from cirlab.reports import quality_flops_tables
    from cirlab.utils.run import write_json_atomically, write_text_atomically

    out_dir = Path(out_dir)
    markdown, csv = quality_flops_tables(result)
    paths = [out_dir / "comparison.md", out_dir / "comparison.csv", out_dir / "comparison.json", out_dir / "comparison.png"]
    write_text_atomically(paths[0], markdown)
    write_text_atomically(paths[1], csv)
    write_json_atomically(paths[2], result.to_json())
    metric = result.metrics[0]
    points = {name: (result.per_inference(name), float(result.quality[name][metric])) for name in result.models}
    label = {"psnr": "PSNR (dB)", "ssim": "SSIM"}.get(metric, metric)
    if not result.higher_is_better.get(metric, True):
        label += " (lower is better)"
    plot_quality_flops(points, paths[3], ylabel=label, title=f"{result.protocol}: {result.workload['text']}")
    return paths


def start_loggers(cfg: DictConfig) -> list:
    """The loggers of ``cfg.logger`` (none by default); a W&B run starts now (offline without
    credentials), so a protocol can log its own records to ``wandb.run`` while it runs."""
    from lightning.pytorch.loggers import WandbLogger

    from cirlab.utils.run import instantiate_loggers

    loggers = instantiate_loggers(cfg.get("logger"))
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            _ = logger.experiment
    return loggers


def log_comparison(loggers: list, result: ProtocolResult, paths: list[Path], key: str) -> None:
    """Every model's numbers as metrics ``eval/<key>/<model>/<metric>`` (and
    ``gflops_per_inference``) to every logger; W&B also gets the table and the plot."""
    import math

    from lightning.pytorch.loggers import WandbLogger

    if not loggers:
        return
    metrics = {}
    for name in result.models:
        for metric, value in result.quality[name].items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                metrics[f"eval/{key}/{name}/{metric}"] = float(value)
        metrics[f"eval/{key}/{name}/gflops_per_inference"] = result.per_inference(name) / 1e9
    columns = ["model", "kind", *result.metrics, "gflops_workload", "gflops_per_inference"]
    rows = [[name, result.kinds.get(name, ""), *[float(result.quality[name][m]) for m in result.metrics],
             result.flops[name] / 1e9, result.per_inference(name) / 1e9] for name in result.models]
    for logger in loggers:
        logger.log_metrics(metrics, step=0)
        if isinstance(logger, WandbLogger):
            logger.log_table(key=f"eval/{key}/comparison", columns=columns, data=rows)
            logger.log_image(key=f"eval/{key}/quality_vs_flops", images=[str(paths[3])])
        logger.finalize("success")


def run_eval(cfg: DictConfig) -> EvalResult:
    """Score ``cfg``'s checkpoints under ``cfg.protocol``; see the module docstring."""
    from cirlab.config import validate_config
    from cirlab.utils.run import write_json_atomically

    validate_config(cfg)
    specs = model_specs(cfg)
    runner = get_runner(cfg)  # an unknown runner fails before any checkpoint is read
    restorers = load_restorers(cfg, specs)
    out_dir = Path(cfg.paths.output_dir)
    grid, loggers = None, []
    if _use_trainer(cfg, specs, restorers):
        result, grid = _trainer_grid(cfg, restorers[0])
    else:
        if cfg.get("iqa"):
            raise ValueError("iqa=true runs through trainer.test: give one module checkpoint as ckpt_path with "
                             "protocol=grid")
        loggers = start_loggers(cfg)
        result = runner(cfg, restorers, out_dir)
        if protocol_name(cfg) == "grid" and len(restorers) == 1:  # one checkpoint: metrics.json as before
            averages = {f"test/{k}": v for k, v in result.quality[restorers[0].name].items()}
            write_json_atomically(out_dir / "metrics.json", {"ckpt_path": specs[0], **averages})
    paths = write_comparison(result, out_dir)
    if grid is None:  # trainer.test logged through the trainer's own loggers
        log_comparison(loggers, result, paths, protocol_name(cfg))
    log.info("comparison (%s):\n%s", result.protocol, paths[0].read_text())
    return EvalResult(result, paths, grid)


def read_comparison(path: str | Path) -> dict:
    """A ``comparison.json`` written by :func:`write_comparison`."""
    return json.loads(Path(path).read_text())
