"""Score checkpoints on a task-vector grid (``conf/protocol/grid.yaml``; ``cirlab-eval``).

:func:`run_grid` is the ``grid`` protocol over restorers of any kind (:mod:`cirlab.evaluation.
restorers`); :func:`evaluate` scores one module checkpoint through ``trainer.test``.

The data config's test set (default: CBSD68 at CResMD's 27 points; any config with a
``test_dir``) runs through ``trainer.test``; :func:`evaluate` writes ``test_per_task.md/.csv``,
``test_average.md`` and ``metrics.json`` to ``paths.output_dir`` (rank 0) and returns the
averages and the structured per-task result.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import hydra
import lightning as L
from omegaconf import DictConfig

from cirlab.checkpoints import load_module
from cirlab.config import validate_config
from cirlab.reports import PerTaskResult
from cirlab.utils.run import instantiate_loggers, metrics_to_floats, write_json_atomically

log = logging.getLogger(__name__)


@dataclass
class GridEvaluation:
    """``metrics``: every logged value (``test/psnr``, ``test_grid/...``); ``per_task``: the grid's
    table (on global rank 0; None on the other ranks)."""

    metrics: dict[str, float]
    per_task: PerTaskResult | None


def evaluate(cfg: DictConfig) -> GridEvaluation:
    """Test ``cfg.ckpt_path`` on ``cfg.data``'s test set; see the module docstring."""
    validate_config(cfg)
    L.seed_everything(cfg.seed, workers=True)
    model = load_module(cfg.ckpt_path, test_iqa=bool(cfg.get("iqa", False)))
    datamodule = hydra.utils.instantiate(cfg.data)
    loggers = instantiate_loggers(cfg.get("logger"))
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, logger=loggers or False, callbacks=[],
                                                 enable_checkpointing=False)
    trainer.test(model=model, datamodule=datamodule, verbose=False)
    metrics = metrics_to_floats(trainer.callback_metrics)
    out_dir = Path(trainer.default_root_dir)
    per_task = None
    if trainer.is_global_zero:  # the module's rank 0 wrote the tables where it tested
        per_task = PerTaskResult.read_json(out_dir / "test_per_task.json")
        write_json_atomically(out_dir / "metrics.json", {"ckpt_path": str(cfg.ckpt_path), **metrics})
        log.info("tables: %s", ", ".join(str(p) for p in sorted(out_dir.glob("test_*.*"))))
        log.info("test averages:\n%s", (out_dir / "test_average.md").read_text())
    return GridEvaluation(metrics, per_task)


# --------------------------------------------------------------------------- the grid protocol
def grid_averages(result: PerTaskResult, stage: str = "test") -> dict[str, float]:
    """``<stage>/psnr`` and ``<stage>/ssim`` over the restoration tasks (grid points with some
    degradation; every point if none has), ``<stage>/psnr_all_points`` over all: the averages
    ``RestorationModule.on_test_epoch_end`` logs, from a structured result."""
    import torch

    psnr, ssim = torch.tensor(result.values["psnr"]), torch.tensor(result.values["ssim"])
    levels = result.levels
    tasks = torch.ones(len(psnr), dtype=torch.bool) if levels is None else levels.sum(dim=1) > 0
    if not bool(tasks.any()):
        tasks = torch.ones(len(psnr), dtype=torch.bool)
    return {f"{stage}/psnr": float(psnr[tasks].nanmean()), f"{stage}/ssim": float(ssim[tasks].nanmean()),
            f"{stage}/psnr_all_points": float(psnr.nanmean())}


def score_grid(restorers, data: dict, progress: bool = True) -> dict[str, PerTaskResult]:
    """Per-grid-point means of each restorer on an evaluation set (:func:`cirlab.data.evalsets.
    build_eval_set`: clean images, their degraded inputs at every grid point, the grid).

    The protocol of ``RestorationModule.test_step``: input i at point p restored with task vector
    p (one pass each), outputs clamped, paper-convention PSNR (capped at ``PSNR_CAP_DB``) and SSIM
    on RGB against the clean image, the degraded input's own PSNR as ``psnr_input``."""
    import torch
    from tqdm.auto import tqdm

    from cirlab.metrics import paper_psnr, paper_ssim
    from cirlab.models.restoration import PSNR_CAP_DB
    from cirlab.tasks import grid_labels

    levels = data["levels"].float()
    points = len(levels)
    sums = {r.name: {k: torch.zeros(points, dtype=torch.float64) for k in ("psnr", "ssim")} for r in restorers}
    input_sum = torch.zeros(points, dtype=torch.float64)
    count = 0
    for clean, inputs in tqdm(list(zip(data["clean"], data["inputs"])), desc="grid", disable=not progress):
        target = clean.float().div(255)[None]
        degraded = inputs.float().div(255)
        input_sum += paper_psnr(degraded, target.expand_as(degraded)).clamp(max=PSNR_CAP_DB).double()
        for restorer in restorers:
            device = restorer.device
            outputs = torch.cat([restorer.restore(degraded[p : p + 1].to(device), levels[p : p + 1].to(device)).cpu()
                                 for p in range(points)])
            targets = target.expand_as(outputs)
            sums[restorer.name]["psnr"] += paper_psnr(outputs, targets).clamp(max=PSNR_CAP_DB).double()
            sums[restorer.name]["ssim"] += paper_ssim(outputs, targets).double()
        count += 1
    if count == 0:
        raise ValueError("the evaluation set holds no images")
    labels = grid_labels(levels)
    return {name: PerTaskResult(labels=list(labels), levels=levels,
                                values={"psnr": (s["psnr"] / count).tolist(), "ssim": (s["ssim"] / count).tolist(),
                                        "psnr_input": (input_sum / count).tolist()})
            for name, s in sums.items()}


def run_grid(cfg: DictConfig, restorers, out_dir: Path):
    """The ``grid`` protocol (``conf/protocol/grid.yaml``): every model on the same task-vector
    grid of the same images; per model ``<out>/<model>/test_per_task.md/.csv/.json`` and
    ``test_average.md``. FLOPs: the grid's T task vectors on one image of
    ``protocol.flops_resolution`` (default 1280x720: the paper's "27-point workload at HD")."""
    from cirlab.data.evalsets import EvalSetSpec, build_eval_set
    from cirlab.evaluation.protocols import ProtocolResult, resolve_images, workload_size
    from cirlab.reports import write_grid_tables
    from cirlab.tasks import level_grid

    settings = cfg.protocol
    grid = settings.get("grid") or "cresmd27"
    grid = grid if isinstance(grid, str) else [list(map(float, p)) for p in grid]
    tasks = level_grid(grid)
    for restorer in restorers:  # before any image is read: a model that cannot run this grid says so
        restorer.check_tasks(tasks)
    folder = resolve_images(cfg, cfg.get("data", {}).get("test_dir"))
    spec = EvalSetSpec(folder=str(folder), grid=grid, max_images=settings.get("max_images"), crop=settings.get("crop"),
                       seed=int(cfg.seed), on_bad=str(cfg.get("data", {}).get("on_bad", "error")), config_key="images")
    cache_dir = Path(cfg.paths.cache_dir) / "evalsets" if cfg.paths.get("cache_dir") else None
    data = build_eval_set(spec, cache_dir)
    results = score_grid(restorers, data)
    height, width = workload_size(cfg)
    quality, flops, files = {}, {}, []
    for restorer in restorers:
        result = results[restorer.name]
        averages = grid_averages(result)
        # one model: its tables where a single-checkpoint evaluation always wrote them
        folder_out = Path(out_dir) if len(restorers) == 1 else Path(out_dir) / model_folder(restorer.name)
        result.write_json(folder_out / "test_per_task.json")
        files += write_grid_tables(result, averages, folder_out, stage="test")
        quality[restorer.name] = {"psnr": averages["test/psnr"], "ssim": averages["test/ssim"],
                                  "psnr_all_points": averages["test/psnr_all_points"]}
        flops[restorer.name] = int(restorer.flops(tasks, height, width))
    grid_name = grid if isinstance(grid, str) else f"custom grid of {len(tasks)}"
    if len(restorers) > 1:  # the per-task view: each model's PSNR, SSIM and FLOPs at every grid point
        files.append(write_per_task_comparison(restorers, results, tasks, grid_name, (height, width), Path(out_dir)))
    return ProtocolResult(
        protocol="grid", metrics=["psnr", "ssim"], quality=quality, flops=flops,
        workload={"tasks": len(tasks), "height": height, "width": width,
                  "text": f"{grid_name} ({len(tasks)} task vectors) on one {width}x{height} image"},
        kinds={r.name: r.kind for r in restorers},
        notes=[f"Images: {folder} ({len(data['names'])}), grid {grid_name}, seed {cfg.seed}; paper convention (uint8, "
               "RGB, whole image); PSNR/SSIM average the points with some degradation."],
        files=files, details={"per_task": {name: r.values for name, r in results.items()}, "labels": results[
            restorers[0].name].labels if restorers else []})


def model_folder(name: str) -> str:
    """A file-system-safe folder name for a model label."""
    import re

    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")
    return slug or "model"


def write_per_task_comparison(restorers, results: dict[str, PerTaskResult], tasks, grid_name: str,
                              resolution: tuple[int, int], out_dir: Path) -> Path:
    """``comparison_per_task.md``: :func:`cirlab.reports.comparison_table` of the models (the
    last one's PSNR against each other's per task; FLOPs per task alone and of the workload)."""
    from cirlab.reports import comparison_table
    from cirlab.utils.run import write_text_atomically

    height, width = resolution
    labels = results[restorers[0].name].labels
    flops = {r.name: {"labels": labels, "total": int(r.flops(tasks, height, width)),
                      "first_pass": [int(r.flops(tasks[i : i + 1], height, width)) for i in range(len(tasks))]}
             for r in restorers}
    averages = {r.name: grid_averages(results[r.name]) for r in restorers}
    kinds = {r.name: r.kind for r in restorers}
    table = comparison_table(averages, {r.name: results[r.name] for r in restorers}, flops, kinds,
                             title=f"{', '.join(kinds)} on the same test grid",
                             workload=f"{grid_name} ({len(tasks)} task vectors) on one {width}x{height} image "
                                      "(HyperRes: generating its kernels included)",
                             resolution=resolution)
    path = Path(out_dir) / "comparison_per_task.md"
    write_text_atomically(path, table)
    return path
