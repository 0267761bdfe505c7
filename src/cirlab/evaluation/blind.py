"""The blind-setting studies of TASNet section 4.3 (Figures 6-8 and 10) as numbers.

In the blind setting the task vector a person picks differs from the true degradation of the
input. TASNet shows three failures of CResMD there as pictures; cirlab measures each with a
number (definitions: docs/method.md section 7, repeated at each study below):

* :func:`run_artifacts` (Figure 6, 10a): blur + noise + JPEG inputs, deblur-only task vectors;
  PSNR to the relative ground truth that removes only that much blur, and the high-frequency
  energy excess of the output over that target.
* :func:`run_modulation` (Figure 8, 10b): blurred inputs, evenly spaced deblur levels; the
  coefficient of variation of the per-step changes of the output.
* :func:`run_oversmoothing` (Figure 7, 10c): noisy inputs, denoise levels at and above the true
  one; PSNR to the clean image and a detail loss, against the output at the true level.

Every study takes restorers (anything with ``name``, ``kind``, ``restore(image [1, 3, H, W],
tasks [T, 3]) -> [T, 3, H, W]`` in [0, 1] and ``flops(tasks, H, W)``), clean images (a folder,
a list of files or a list of ``(name, tensor)``), and its config; it degrades each image with a
generator seeded from ``(seed, image index)``, so every model and every run sees the same
inputs, and returns a :class:`StudyResult`. With ``out_dir`` it also writes the files of
:mod:`cirlab.evaluation.blind_report` (CSV, Markdown/JSON, a Figure-10-shaped plot, strips) and
logs them to the active W&B run, if any.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from torch import Tensor

from cirlab.data.degradations import degrade
from cirlab.evaluation.blind_config import (
    ArtifactsConfig,
    ModulationConfig,
    OversmoothingConfig,
    protocol_config,
    study_config,
)
from cirlab.evaluation.blind_measures import (
    ImageSource,
    detail_loss,
    hf_excess,
    load_clean_images,
    noise_field,
    psnr,
    relative_targets,
    step_changes,
)
from cirlab.evaluation.restorers import Restorer
from cirlab.tasks import BLUR_RADIUS_MAX

__all__ = ["COMPARISON", "STUDIES", "StudyResult", "run_artifacts", "run_blind", "run_modulation", "run_oversmoothing",
           "run_protocol", "run_study", "study_tasks"]


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclass
class StudyResult:
    """What a study measured; :mod:`cirlab.evaluation.blind_report` writes it.

    ``rows``: one dict per (image, model, level) (modulation: per step) with ``image``,
    ``model``, ``level`` and the study's measures; ``image_rows``: one per (image, model) with
    the per-image summary numbers; ``per_level[model][measure]``: means over images per level
    (``x`` gives the level of each entry); ``summary[model]``: the study's numbers (a NaN in
    any image, e.g. a flat image's HF ratio, makes its mean NaN: see the per-image CSV);
    ``strips``: image name -> (column labels, {row label: images}) for the first images.
    """

    study: str
    title: str
    level_name: str
    config: dict
    models: list[str]
    kinds: dict[str, str]
    images: list[str]
    rows: list[dict] = field(default_factory=list)
    image_rows: list[dict] = field(default_factory=list)
    x: list[float] = field(default_factory=list)
    per_level: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    summary: dict[str, dict[str, float]] = field(default_factory=dict)
    plots: list[tuple[str, str]] = field(default_factory=list)  # (measure, axis label)
    strips: dict[str, tuple[list[str], dict[str, list[Tensor]]]] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)


def _mean(values: Sequence[float]) -> float:
    """Plain mean; an undefined (NaN) value makes the mean NaN rather than being dropped."""
    values = list(values)
    return sum(values) / len(values) if values else math.nan


def _restore(restorer: Restorer, image: Tensor, tasks: Tensor) -> Tensor:
    out = restorer.restore(image, tasks)
    if out.shape != (tasks.shape[0], *image.shape[1:]):
        raise ValueError(f"restorer {restorer.name!r} returned {tuple(out.shape)} for {tasks.shape[0]} tasks "
                         f"on a {tuple(image.shape)} image")
    return out.detach().float().cpu().clamp(0, 1)


def _start(study: str, title: str, level_name: str, cfg, restorers: Sequence[Restorer],
           images: ImageSource, tasks: Tensor) -> tuple[StudyResult, list[tuple[str, Tensor]]]:
    """Check models and task vectors before any work (a model that cannot take the study's task
    vectors, e.g. a scalar-level HyperRes asked to deblur, fails here naming itself), load images."""
    if not restorers:
        raise ValueError(f"{study}: no models given")
    names = [r.name for r in restorers]
    if len(set(names)) != len(names):
        raise ValueError(f"{study}: model names must differ, got {names} (give NAME=PATH)")
    for r in restorers:
        if hasattr(r, "check_tasks"):
            r.check_tasks(tasks)
    clean = load_clean_images(images, cfg.crop)[: cfg.max_images]
    config = {f.name: getattr(cfg, f.name) for f in fields(cfg)}
    config["levels"] = list(config["levels"])
    result = StudyResult(study, title, level_name, config, names, {r.name: r.kind for r in restorers},
                         [n for n, _ in clean], x=list(cfg.levels))
    return result, clean


def _flops(result: StudyResult, restorers: Sequence[Restorer], tasks: Tensor, clean: list[tuple[str, Tensor]]) -> None:
    for r in restorers:
        per_image = [r.flops(tasks, *image.shape[-2:]) / tasks.shape[0] for _, image in clean]
        result.summary[r.name]["gflops_per_inference"] = sum(per_image) / len(per_image) / 1e9


def _aggregate(result: StudyResult, measures: Sequence[str]) -> None:
    for model in result.models:
        table = result.per_level.setdefault(model, {})
        for m in measures:
            table[m] = [_mean([row[m] for row in result.rows if row["model"] == model and row["level"] == x])
                        for x in result.x]


def _finish(result: StudyResult, out_dir: str | Path | None) -> StudyResult:
    if out_dir is not None:
        from cirlab.evaluation.blind_report import write_study

        paths = write_study(result, Path(out_dir))
        result.files = [p for value in paths.values() for p in (value if isinstance(value, list) else [value])]
    return result


def _level_label(level: float) -> str:
    return f"t={level:.3g}"


# --------------------------------------------------------------------------------------------
# (a) artifacts
# --------------------------------------------------------------------------------------------


def run_artifacts(restorers: Sequence[Restorer], images: ImageSource, cfg: ArtifactsConfig | None = None,
                  out_dir: str | Path | None = None) -> StudyResult:
    """Study (a), TASNet Figures 6 and 10a: artifacts when deblurring a mixed degradation.

    Input at task levels ``l_in = (b, n, j)`` (``cfg.blur``, ``cfg.sigma``, ``cfg.quality``);
    task vector ``t_k = (k, 0, 0)`` for each ``k`` in ``cfg.levels``; reference: the relative
    ground truth ``l_gt = (b - k, n, j)`` made as a training target (:func:`relative_targets`:
    same clean image, same noise field, same JPEG quality), i.e. the input with exactly ``k``
    of its blur removed and its noise and JPEG kept. Measures per image and level: ``psnr``
    (paper convention) and ``hf_excess`` (:func:`hf_excess`). Summary: their means over the
    levels ``k > 0`` (``k = 0`` asks for nothing) and ``hf_excess`` at the largest level.
    """
    cfg = cfg or ArtifactsConfig()
    b, n, j = cfg.input_levels
    levels = torch.tensor(cfg.levels, dtype=torch.float32)
    tasks = torch.stack((levels, torch.zeros_like(levels), torch.zeros_like(levels)), dim=1)
    result, clean = _start("artifacts", "Blind setting (a): deblurring blur + noise + JPEG", "t_blur", cfg,
                           restorers, images, tasks)
    levels_gt = torch.stack(((b - levels).clamp_min(0), torch.full_like(levels, n), torch.full_like(levels, j)), dim=1)
    for index, (name, image) in enumerate(clean):
        degraded, targets = relative_targets(image, (b, n, j), levels_gt, noise_field(image, cfg.seed, index))
        strip: dict[str, list[Tensor]] = {}
        for r in restorers:
            outputs = _restore(r, degraded, tasks)
            psnr_k, excess = psnr(outputs, targets), hf_excess(outputs, targets)
            for k, level in enumerate(cfg.levels):
                result.rows.append({"image": name, "model": r.name, "level": level,
                                    "psnr": float(psnr_k[k]), "hf_excess": float(excess[k])})
            strip[r.name] = [degraded[0], *outputs, image[0]]
        strip["relative GT"] = [degraded[0], *targets, image[0]]
        if index < cfg.strips:
            labels = ["input"] + [_level_label(v) for v in cfg.levels] + ["clean"]
            result.strips[name] = (labels, strip)
    _aggregate(result, ("psnr", "hf_excess"))
    active = [i for i, v in enumerate(cfg.levels) if v > 0]
    for model in result.models:
        table = result.per_level[model]
        result.summary[model] = {
            "psnr_mean": _mean([table["psnr"][i] for i in active]),
            "hf_excess_mean": _mean([table["hf_excess"][i] for i in active]),
            "hf_excess_top": table["hf_excess"][-1],
        }
    result.plots = [("psnr", "PSNR to the relative GT (dB)"), ("hf_excess", "HF energy excess over the relative GT")]
    _flops(result, restorers, tasks, clean)
    return _finish(result, out_dir)


# --------------------------------------------------------------------------------------------
# (b) uneven modulation
# --------------------------------------------------------------------------------------------


def run_modulation(restorers: Sequence[Restorer], images: ImageSource, cfg: ModulationConfig | None = None,
                   out_dir: str | Path | None = None) -> StudyResult:
    """Study (b), TASNet Figures 8 and 10b: how evenly the output moves across deblur levels.

    Input: the clean image blurred at ``cfg.blur`` px (8-bit, no noise, no JPEG); task vectors
    ``(k, 0, 0)`` for the evenly spaced ``k`` in ``cfg.levels``, from the input (``k = 0``) to the
    fully deblurred result (the last level). Reference: the model's own outputs, no external
    image. Measures per image and step ``k -> k+1``: ``step_rms = RMS(y_{k+1} - y_k)`` (0..255)
    and ``step_share = step_rms / sum of steps``; per image: ``cv = std / mean`` of the steps
    (:func:`step_changes`) and ``total_change`` (their sum). Summary: mean ``cv`` over images
    (0 = perfectly even), mean ``total_change``, and the largest mean step share.
    """
    cfg = cfg or ModulationConfig()
    tasks = study_tasks(cfg)
    result, clean = _start("modulation", "Blind setting (b): modulation across deblur levels", "t_blur", cfg,
                           restorers, images, tasks)
    level_in = torch.tensor([[cfg.blur / BLUR_RADIUS_MAX, 0.0, 0.0]])
    result.x = list(cfg.levels[1:])  # a step is plotted at the level it arrives at
    for index, (name, image) in enumerate(clean):
        degraded = degrade(image, level_in)
        strip: dict[str, list[Tensor]] = {}
        for r in restorers:
            outputs = _restore(r, degraded, tasks)
            d, cv = step_changes(outputs)
            total = float(d.sum())
            for k, level in enumerate(cfg.levels[1:]):
                result.rows.append({"image": name, "model": r.name, "level": level, "level_from": cfg.levels[k],
                                    "step_rms": float(d[k]), "step_share": float(d[k]) / total if total > 0 else math.nan})
            result.image_rows.append({"image": name, "model": r.name, "cv": cv, "total_change": total})
            strip[r.name] = [degraded[0], *outputs, image[0]]
        if index < cfg.strips:
            labels = ["input"] + [_level_label(v) for v in cfg.levels] + ["clean"]
            result.strips[name] = (labels, strip)
    _aggregate(result, ("step_rms", "step_share"))
    for model in result.models:
        mine = [row for row in result.image_rows if row["model"] == model]
        result.summary[model] = {
            "cv": _mean([row["cv"] for row in mine]),
            "total_change": _mean([row["total_change"] for row in mine]),
            "max_step_share": max(result.per_level[model]["step_share"]),
        }
    result.plots = [("step_share", "share of the total change per step"), ("step_rms", "per-step change (RMS, 0..255)")]
    _flops(result, restorers, tasks, clean)
    return _finish(result, out_dir)


# --------------------------------------------------------------------------------------------
# (c) over-smoothing
# --------------------------------------------------------------------------------------------


def run_oversmoothing(restorers: Sequence[Restorer], images: ImageSource, cfg: OversmoothingConfig | None = None,
                      out_dir: str | Path | None = None) -> StudyResult:
    """Study (c), TASNet Figures 7 and 10c: over-smoothing when denoising more than needed.

    Input: the clean image with noise ``cfg.sigma`` (8-bit, no blur, no JPEG); task vectors
    ``(0, k, 0)`` for ``k`` in ``cfg.levels``, the first being the true level ``sigma / 50``.
    Reference: the clean image (what no level above the true one can improve on). Measures per
    image and level: ``psnr`` (paper convention), ``hf_ratio``, ``detail_kept`` and
    ``detail_loss`` (:func:`detail_loss`), and ``psnr_delta`` / ``detail_loss_delta``, the same minus their
    value at the true level. Summary: PSNR at the true level and mean over all levels, the PSNR
    drop from the true to the largest level, and the detail loss at both ends.
    """
    cfg = cfg or OversmoothingConfig()
    tasks = study_tasks(cfg)
    result, clean = _start("oversmoothing", "Blind setting (c): denoising above the true noise level", "t_noise", cfg,
                           restorers, images, tasks)
    level_in = torch.tensor([[0.0, cfg.sigma / 50.0, 0.0]])
    for index, (name, image) in enumerate(clean):
        degraded = degrade(image, level_in, noise_field=noise_field(image, cfg.seed, index))
        strip: dict[str, list[Tensor]] = {}
        for r in restorers:
            outputs = _restore(r, degraded, tasks)
            psnr_k = psnr(outputs, image.expand_as(outputs))
            ratio, kept, loss = detail_loss(outputs, image.expand_as(outputs))
            for k, level in enumerate(cfg.levels):
                result.rows.append({"image": name, "model": r.name, "level": level, "psnr": float(psnr_k[k]),
                                    "psnr_delta": float(psnr_k[k] - psnr_k[0]), "hf_ratio": float(ratio[k]),
                                    "detail_kept": float(kept[k]),
                                    "detail_loss": float(loss[k]), "detail_loss_delta": float(loss[k] - loss[0])})
            strip[r.name] = [degraded[0], *outputs, image[0]]
        if index < cfg.strips:
            labels = ["input"] + [_level_label(v) for v in cfg.levels] + ["clean"]
            result.strips[name] = (labels, strip)
    _aggregate(result, ("psnr", "psnr_delta", "hf_ratio", "detail_kept", "detail_loss", "detail_loss_delta"))
    for model in result.models:
        table = result.per_level[model]
        result.summary[model] = {
            "psnr_true": table["psnr"][0],
            "psnr_mean": _mean(table["psnr"]),
            "psnr_drop": table["psnr"][0] - table["psnr"][-1],
            "detail_loss_true": table["detail_loss"][0],
            "detail_loss_top": table["detail_loss"][-1],
        }
    result.plots = [("psnr", "PSNR to the clean image (dB)"), ("detail_loss", "detail loss (1 - clean detail kept)")]
    _flops(result, restorers, tasks, clean)
    return _finish(result, out_dir)


# --------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------

#: study name -> its function
STUDIES = {"artifacts": run_artifacts, "modulation": run_modulation, "oversmoothing": run_oversmoothing}


def run_study(study: str, restorers: Sequence[Restorer], images: ImageSource, settings: Mapping | None = None,
              out_dir: str | Path | None = None) -> StudyResult:
    """Run one study by name with its settings (see :func:`study_config`)."""
    cfg = study_config(study, settings)
    return STUDIES[study](restorers, images, cfg, out_dir)


def run_protocol(protocol: Mapping, restorers: Sequence[Restorer], images: ImageSource,
                 out_dir: str | Path | None = None) -> StudyResult:
    """Run the study a whole ``conf/protocol/blind_*.yaml`` (mapping or DictConfig) describes."""
    study, cfg = protocol_config(protocol)
    return STUDIES[study](restorers, images, cfg, out_dir)


def study_tasks(cfg) -> Tensor:
    """The ``(T, 3)`` task vectors a study restores each image with."""
    levels = torch.tensor(cfg.levels, dtype=torch.float32)
    zeros = torch.zeros_like(levels)
    if isinstance(cfg, OversmoothingConfig):
        return torch.stack((zeros, levels, zeros), dim=1)
    return torch.stack((levels, zeros, zeros), dim=1)


#: the comparison columns of each study (first: the plot's y axis) and whether higher is better
COMPARISON = {
    "artifacts": {"hf_excess_mean": False, "psnr_mean": True, "hf_excess_top": False},
    "modulation": {"cv": False, "max_step_share": False, "total_change": True},
    "oversmoothing": {"psnr_mean": True, "psnr_true": True, "psnr_drop": False, "detail_loss_true": False,
                      "detail_loss_top": False},
}


def run_blind(cfg, restorers: Sequence[Restorer], out_dir: Path):
    """``cirlab-eval`` runner of ``conf/protocol/blind_*.yaml`` (:mod:`cirlab.evaluation.protocols`).

    Checks every model against the study's task vectors before reading any image, runs the study
    on ``images`` (default: ``data.test_dir``), writes its files into ``out_dir`` and returns a
    ``ProtocolResult`` whose quality columns are the study's summary numbers (:data:`COMPARISON`)
    and whose FLOPs are the study's T task vectors on one image of ``protocol.flops_resolution``
    (default 1280x720), as the other protocols' are.
    """
    from cirlab.evaluation.protocols import ProtocolResult, resolve_images, workload_size

    study, study_cfg = protocol_config(cfg.protocol)
    tasks = study_tasks(study_cfg)
    for restorer in restorers:
        if hasattr(restorer, "check_tasks"):
            restorer.check_tasks(tasks)
    data = cfg.get("data") or {}
    folder = resolve_images(cfg, data.get("test_dir"))
    result = STUDIES[study](restorers, folder, study_cfg, out_dir)
    height, width = workload_size(cfg)
    columns = COMPARISON[study]
    name = str(cfg.protocol.get("name") or f"blind_{study}")
    settings = ", ".join(f"{k}={v}" for k, v in result.config.items() if k not in ("strips",))
    return ProtocolResult(
        protocol=name, metrics=list(columns),
        quality={m: {k: result.summary[m][k] for k in columns} for m in result.models},
        flops={r.name: int(r.flops(tasks, height, width)) for r in restorers},
        workload={"tasks": len(tasks), "height": height, "width": width,
                  "text": f"the {study} study's {len(tasks)} task vectors on one {width}x{height} image"},
        kinds=dict(result.kinds), higher_is_better=dict(columns),
        notes=[f"{result.title}. Images: {folder} ({len(result.images)}); {settings}. "
               "Definitions: docs/method.md section 7."],
        files=list(result.files),
        details={"x": result.x, "level_name": result.level_name, "per_level": result.per_level})
