"""``cirlab-pipeline`` (= ``make train``): the TASNet pipeline end to end (``conf/pipeline.yaml``).

Stages, in order, each a job of its own in a sub-folder of the pipeline's run directory:

  1. ``cresmd``   train the CResMD supernetwork (``cirlab-train``; its best checkpoint);
     ``baseline`` (optional) another CResMD to compare against, trained apart: at paper scale the
                  absolute-GT CResMD of TASNet Tables 2 and 4 (``cresmd_paper``);
  2. ``search``   the architecture search started from it (``model.init_ckpt``; its last checkpoint);
  3. ``derive``   ``cirlab-derive``: the standalone TASNet (``tasnet.ckpt``, ``architecture.json``);
  4. ``finetune`` fine-tune the derived network (``model.derived_ckpt``; its best checkpoint);
  5. ``evaluate`` ``cirlab-eval`` of CResMD (and the baseline, when there is one) and TASNet on
                  the same test grid, side by side in ``evaluate/comparison.md`` (PSNR, SSIM and
                  FLOPs per task), each labelled with the ground truth it was trained with, and
                  the blind-setting studies of ``pipeline.evaluate.blind`` on the same models
                  (``evaluate/<protocol>/``, summarised in the same file);
  6. ``bench``    ``cirlab-bench cost`` of CResMD, TASNet and naive sharing on the 27-point workload.

Before the first stage runs, every stage's config is composed and validated, and every given
input file is checked, so a typo fails in seconds, not after an hour of training.

Each finished stage leaves ``<stage>/stage.json`` (its products and the overrides it ran
with). Started again in the same run directory (``hydra.run.dir=<pipeline run dir>``), the
pipeline keeps finished stages, resumes an interrupted training stage from its
``checkpoints/last.ckpt`` and reruns the rest; a finished stage whose overrides changed is an
error (start a new run directory instead). ``pipeline.json`` lists every product; the last lines
of the log print where each one is.
"""

from __future__ import annotations

import json
import logging
import shlex
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from cirlab.checkpoints import best_checkpoint_recorded_in
from cirlab.config import compose_job, validate_config
from cirlab.utils.run import (
    attach_log_file,
    detach_log_file,
    write_job_files,
    write_json_atomically,
    write_text_atomically,
)
from cirlab.utils.wandb import finish_wandb

log = logging.getLogger(__name__)

STAGES = ("cresmd", "baseline", "search", "derive", "finetune", "evaluate", "bench")
TRAINING = ("cresmd", "baseline", "search", "finetune")
# the product of a stage that later stages consume, and the `pipeline.inputs` key replacing it
PRODUCT = {"cresmd": "cresmd_ckpt", "baseline": "baseline_ckpt", "search": "search_ckpt", "derive": "derived_ckpt",
           "finetune": "tasnet_ckpt"}
NEEDS = {"search": ["cresmd_ckpt"], "derive": ["search_ckpt"], "finetune": ["derived_ckpt"],
         "evaluate": ["cresmd_ckpt", "tasnet_ckpt"], "bench": ["cresmd_ckpt", "tasnet_ckpt"]}
PIPELINE_KEYS = {"task_name", "tags", "seed", "pipeline", "paths", "hydra"}
STAGE_FILE = "stage.json"


class PipelineError(ValueError):
    """A pipeline config or state that cannot run; the message names the key or file."""


@dataclass
class Stage:
    name: str
    folder: Path
    overrides: list[str]


# --------------------------------------------------------------------------- config
def check_pipeline_config(cfg: DictConfig) -> dict:
    """The ``pipeline`` node as plain data, after checking what can be checked without running:
    stage names and order, checkpoint choices, and inputs (files that exist)."""
    stray = sorted(key for key in cfg.keys() if key not in PIPELINE_KEYS and key != "experiment")
    if stray:
        raise PipelineError(f"{', '.join(stray)}: not pipeline settings. An experiment that configures one training "
                            "job (model, data, trainer, ...) runs with cirlab-train (`make fit experiment=...`); "
                            "pipeline experiments set pipeline.* keys")
    spec = OmegaConf.to_container(cfg.pipeline, resolve=True)
    stages = list(spec.get("stages") or [])
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise PipelineError(f"pipeline.stages: unknown stage(s) {unknown}; choose from {list(STAGES)}")
    if stages != [s for s in STAGES if s in stages]:
        raise PipelineError(f"pipeline.stages={stages}: stages run in the order {list(STAGES)}")
    inputs = spec.get("inputs") or {}
    for key, value in inputs.items():
        if key not in PRODUCT.values():
            raise PipelineError(f"pipeline.inputs.{key}: unknown input; known: {sorted(PRODUCT.values())}")
        if value and not Path(value).is_file():
            raise PipelineError(f"pipeline.inputs.{key}={value!r}: no such file")
    for stage in stages:
        if stage in PRODUCT and inputs.get(PRODUCT[stage]):
            raise PipelineError(f"pipeline.inputs.{PRODUCT[stage]} is set but stage {stage!r} would make it: "
                                f"drop {stage!r} from pipeline.stages or unset the input")
    made = {PRODUCT[s] for s in stages if s in PRODUCT} | {k for k, v in inputs.items() if v}
    for stage in stages:
        for need in NEEDS.get(stage, []):
            producer = next(s for s, p in PRODUCT.items() if p == need)
            if need not in made or (producer not in stages and not inputs.get(need)):
                raise PipelineError(f"pipeline stage {stage!r} needs {need}: add stage {producer!r} to "
                                    f"pipeline.stages or set pipeline.inputs.{need}")
            if producer in stages and STAGES.index(producer) > STAGES.index(stage):
                raise PipelineError(f"pipeline stage {stage!r} needs {need} from the later stage {producer!r}")
    threads = spec.get("threads")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise PipelineError(f"pipeline.threads={threads!r}: a positive number of torch threads, or null (torch's default)")
    for stage in TRAINING:
        node = spec.get(stage) or {}
        if node.get("checkpoint", "best") not in ("best", "last"):
            raise PipelineError(f"pipeline.{stage}.checkpoint={node.get('checkpoint')!r}: best or last")
        for key in ("overrides", "extra"):
            _override_list(node.get(key), f"pipeline.{stage}.{key}")
    return spec


def _override_list(value: Any, key: str) -> list[str]:
    """A list of Hydra overrides, or one string of them separated by spaces (easier to type:
    ``'pipeline.search.extra="model.lambda1=0.1 trainer.max_steps=900"'``)."""
    if value is None:
        return []
    if isinstance(value, str):
        return shlex.split(value)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise PipelineError(f"{key} must be a list of Hydra overrides or one string of them, got {value!r}")


def _train_overrides(spec: dict, stage: str, seed: int, links: list[str]) -> list[str]:
    node = spec[stage]
    return [f"seed={seed}", *_override_list(spec.get("train_common"), "pipeline.train_common"),
            *_override_list(node.get("overrides"), f"pipeline.{stage}.overrides"),
            *_override_list(node.get("extra"), f"pipeline.{stage}.extra"), *links]


def _eval_overrides(spec: dict, seed: int, ckpt: str | None = None) -> list[str]:
    node = spec.get("evaluate") or {}
    return [f"seed={seed}", *_override_list(node.get("overrides"), "pipeline.evaluate.overrides"),
            *_override_list(node.get("extra"), "pipeline.evaluate.extra"),
            *([f"ckpt_path={ckpt}"] if ckpt else [])]


def _blind_protocols(spec: dict) -> list[str]:
    """``pipeline.evaluate.blind``: names of ``conf/protocol/`` blind studies (may be empty)."""
    value = (spec.get("evaluate") or {}).get("blind") or []
    if isinstance(value, str) or not all(isinstance(v, str) and v for v in value):
        raise PipelineError(f"pipeline.evaluate.blind={value!r}: give a list of protocol names, "
                            "e.g. [blind_artifacts, blind_modulation, blind_oversmoothing], or []")
    return list(value)


def _blind_overrides(spec: dict, seed: int, protocol: str, checkpoints: dict[str, str]) -> list[str]:
    """The ``cirlab-eval`` overrides of one blind study over ``checkpoints`` ({label: path})."""
    for name, path in checkpoints.items():
        if "'" in str(path) or "\\" in str(path):
            raise PipelineError(f"{name} checkpoint {path}: a quote or backslash in the path cannot be passed to "
                                "cirlab-eval as a Hydra override; move the file")
    models = ",".join(f"{name}:'{path}'" for name, path in checkpoints.items())
    extra = _override_list((spec.get("evaluate") or {}).get("blind_extra"), "pipeline.evaluate.blind_extra")
    return [*_eval_overrides(spec, seed), f"protocol={protocol}", f"models={{{models}}}", *extra]


def _compose(config_name: str, overrides: list[str], folder: Path, what: str) -> DictConfig:
    try:
        cfg = compose_job(config_name, overrides, folder)
        validate_config(cfg)
    except Exception as error:  # Hydra's own errors name the override; say which stage it was
        raise PipelineError(f"pipeline stage {what}: {type(error).__name__}: {error}") from error
    return cfg


PLACEHOLDER = "<from an earlier stage>"


def precheck(spec: dict, seed: int, run_dir: Path) -> None:
    """Compose and validate every stage's config before any work (products not yet made are
    placeholders: only their presence matters to composition)."""
    links = {"search": ["model.init_ckpt=placeholder.ckpt"], "finetune": ["model.derived_ckpt=placeholder.ckpt"]}
    for stage in spec["stages"]:
        if stage in TRAINING:
            cfg = _compose("train", _train_overrides(spec, stage, seed, []), run_dir / stage, stage)
            target = str(cfg.model.get("_target_", ""))
            expected = {"cresmd": "CResMD", "baseline": "CResMD", "search": "TASNetSearch",
                        "finetune": "TASNetFinetune"}[stage]
            if not target.endswith("." + expected):
                raise PipelineError(f"pipeline.{stage}: its overrides build {target or 'no model'}, "
                                    f"the {stage} stage needs a {expected} (model._target_)")
            if links.get(stage):  # the keys the pipeline sets to link the stages exist
                _compose("train", _train_overrides(spec, stage, seed, links[stage]), run_dir / stage, stage)
        elif stage == "evaluate":
            _compose("eval", _eval_overrides(spec, seed, "placeholder.ckpt"), run_dir / stage, stage)
            for protocol in _blind_protocols(spec):
                _compose("eval", _blind_overrides(spec, seed, protocol, {"CResMD": "placeholder.ckpt"}),
                         run_dir / stage / protocol, f"{stage} ({protocol})")


# --------------------------------------------------------------------------- stages
def _stage_record(folder: Path) -> dict | None:
    path = folder / STAGE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _finish_stage(stage: Stage, products: dict[str, Any], started: float) -> dict:
    record = {"stage": stage.name, "overrides": stage.overrides, "products": products,
              "seconds": round(time.perf_counter() - started, 1)}
    write_json_atomically(stage.folder / STAGE_FILE, record)
    return record


def _run_training(stage: Stage, spec: dict, wandb_group: str) -> dict[str, Any]:
    from cirlab.training import run_training

    overrides = list(stage.overrides)
    last = stage.folder / "checkpoints" / "last.ckpt"
    if last.is_file():
        log.info("stage %s: resuming from %s", stage.name, last)
        overrides.append(f"ckpt_path={last}")
    cfg = compose_job("train", overrides, stage.folder)
    if cfg.get("logger") and cfg.logger.get("wandb") is not None:
        with open_dict(cfg):  # the stages of one pipeline: one W&B group, a run per stage
            cfg.logger.wandb.group = wandb_group
            cfg.logger.wandb.name = stage.name
            cfg.logger.wandb.job_type = stage.name
    write_job_files(cfg, overrides, stage.folder)
    try:
        run = run_training(cfg)
    finally:
        finish_wandb()
    if last.is_file():  # a resumed job that had already reached its last step runs no loop and saves nothing
        run.last_ckpt = run.last_ckpt or str(last)
        run.best_ckpt = run.best_ckpt or best_checkpoint_recorded_in(last)
    choice = spec[stage.name].get("checkpoint", "best")
    ckpt = (run.best_ckpt if choice == "best" else run.last_ckpt) or run.last_ckpt or run.best_ckpt
    if not ckpt:
        raise PipelineError(f"pipeline stage {stage.name}: the training job saved no checkpoint "
                            f"(callbacks.model_checkpoint disabled?) in {stage.folder}")
    return {PRODUCT[stage.name]: ckpt, "run_dir": str(stage.folder),
            "metrics": {k: v for k, v in run.metrics.items() if "_grid/" not in k}}


def _run_derive(stage: Stage, spec: dict, search_ckpt: str) -> dict[str, Any]:
    from cirlab.derivation import derive_checkpoint

    node = spec.get("derive") or {}
    derived = derive_checkpoint(search_ckpt, stage.folder, node.get("grid", "cresmd27"),
                                int(node.get("height", 720)), int(node.get("width", 1280)))
    s = derived.summary
    log.info("derived TASNet: %d/%d maps shared, %.2f GFLOPs per inference on %d tasks at %dx%d (%.1f%% of CResMD)",
             s["shared_maps"], s["num_maps"], s["flops_per_inference"] / 1e9, s["tasks"], s["width"], s["height"],
             100 * s["flops_ratio"])
    return {"derived_ckpt": str(derived.ckpt_path), "architecture_json": str(derived.json_path),
            "architecture_png": str(derived.figure_path) if derived.figure_path else None,
            "summary": {k: s[k] for k in ("shared_maps", "num_maps", "flops_per_inference", "flops_ratio",
                                          "tasks", "height", "width") if k in s}}


def ground_truth_of(ckpt: str) -> str | None:
    """``relative`` or ``absolute``: the ``sampling.ground_truth`` of the training run that wrote
    ``ckpt`` (its ``<run>/.hydra/config.yaml``, with the checkpoint in ``<run>/checkpoints/``);
    None when that record is not there."""
    config = Path(ckpt).resolve().parent.parent / ".hydra" / "config.yaml"
    if not config.is_file():
        return None
    value = OmegaConf.select(OmegaConf.load(config), "sampling.ground_truth")
    return str(value) if value is not None else None


def model_labels(checkpoints: dict[str, str]) -> dict[str, str]:
    """What each compared model is, for the comparison table."""
    def gt(name: str) -> str:
        value = ground_truth_of(checkpoints[name])
        return f"{value} GT" if value else "ground truth not recorded"

    roles = {"CResMD": "the CResMD TASNet was searched from", "CResMD-baseline": "baseline",
             "TASNet": "searched, derived and fine-tuned"}
    return {name: f"{name.split('-')[0]} trained with {gt(name)} ({roles.get(name, name)})" for name in checkpoints}


def _run_evaluate(stage: Stage, spec: dict, seed: int, checkpoints: dict[str, str]) -> dict[str, Any]:
    from cirlab.evaluation.grid import evaluate
    from cirlab.reports import comparison_table

    scored = {}
    for name, ckpt in checkpoints.items():
        folder = stage.folder / name.lower()
        overrides = _eval_overrides(spec, seed, ckpt)
        cfg = compose_job("eval", overrides, folder)
        write_job_files(cfg, overrides, folder)
        try:
            scored[name] = evaluate(cfg)
        finally:
            finish_wandb()
    labels = model_labels(checkpoints)
    table = comparison_table({name: result.metrics for name, result in scored.items()},
                             {name: result.per_task for name, result in scored.items()}, _flops_per_task(checkpoints),
                             labels)
    blind = _run_blind_studies(stage, spec, seed, checkpoints)
    if blind:
        table += "\n## Blind-setting studies (docs/method.md section 7)\n\n" + "\n\n".join(
            f"### {protocol}\n\n{text}" for protocol, (text, _) in blind.items())
    path = stage.folder / "comparison.md"
    write_text_atomically(path, table)
    log.info("CResMD and TASNet side by side:\n%s", table)
    return {"comparison_md": str(path), "labels": labels,
            "metrics": {name: {k: v for k, v in r.metrics.items() if "_grid/" not in k} for name, r in scored.items()},
            "blind": {protocol: quality for protocol, (_, quality) in blind.items()},
            "run_dirs": {name: str(stage.folder / name.lower()) for name in checkpoints}}


def _run_blind_studies(stage: Stage, spec: dict, seed: int,
                       checkpoints: dict[str, str]) -> dict[str, tuple[str, dict]]:
    """Each protocol of ``pipeline.evaluate.blind`` as one ``cirlab-eval`` comparison of
    ``checkpoints`` in ``<stage>/<protocol>/``; returns {protocol: (its comparison.md text,
    {model: {number: value}})}."""
    from cirlab.evaluation.compare import run_eval

    out = {}
    for protocol in _blind_protocols(spec):
        folder = stage.folder / protocol
        overrides = _blind_overrides(spec, seed, protocol, checkpoints)
        cfg = compose_job("eval", overrides, folder)
        write_job_files(cfg, overrides, folder)
        try:
            result = run_eval(cfg)
        finally:
            finish_wandb()
        # the JSON form: an undefined number (NaN) is null there, as in the study's own files
        written = result.comparison.to_json()
        quality = {model["name"]: {m: model[m] for m in written["metrics"]} for model in written["models"]}
        out[protocol] = (result.paths[0].read_text(), quality)
    return out


def _flops_per_task(checkpoints: dict[str, str], height: int = 720, width: int = 1280) -> dict[str, dict]:
    """GFLOPs of each model on each task vector of the 27-point grid at HD, run alone (prefix
    included) and as part of the whole workload (its share, prefix counted once)."""
    from cirlab.bench.cost import flops_split
    from cirlab.checkpoints import load_network
    from cirlab.tasks import grid_labels, level_grid

    tasks = level_grid("cresmd27")
    labels = grid_labels(tasks)
    out = {}
    for name, ckpt in checkpoints.items():
        split = flops_split(load_network(ckpt), tasks, height, width)
        out[name] = {"labels": labels, "first_pass": split["first_pass"], "total": split["total"]}
    return out


def _run_bench(stage: Stage, spec: dict, cresmd_ckpt: str, tasnet_ckpt: str) -> dict[str, Any]:
    from cirlab.bench.cost import bench_cost, build_models
    from cirlab.bench.records import write_cost_outputs
    from cirlab.tasks import parse_resolutions

    node = spec.get("bench") or {}
    resolutions = parse_resolutions(",".join(str(r) for r in node.get("resolutions", ["180x320"])))
    models, notes = build_models(cresmd=cresmd_ckpt, tasnet=tasnet_ckpt,
                                 fractions=tuple(node.get("naive_fractions", ())))
    notes.append("TASNet: the fine-tuned network of this pipeline; the naive-sharing rows reuse the CResMD weights "
                  "untrained (their FLOPs and latency are what they are for).")
    record = bench_cost(models, resolutions, grid=node.get("grid", "cresmd27"), repeats=int(node.get("repeats", 3)),
                        warmup=int(node.get("warmup", 1)), threads=list(node.get("threads", [1, None])),
                        device=node.get("device", "auto"), progress=True)
    table = write_cost_outputs(record, stage.folder, "cirlab-pipeline (stage bench)", notes,
                               checkpoints={"cresmd": cresmd_ckpt, "tasnet": tasnet_ckpt})
    log.info("cost benchmark:\n%s", table)
    ratios = {}
    for res, entry in record["results"].get("TASNet", {}).items():
        ratios[res] = {"flops_ratio": entry["flops_ratio_vs_reference"], "speedup": entry["speedup_vs_reference"]}
    return {"cost_json": str(stage.folder / "cost.json"), "cost_md": str(stage.folder / "cost.md"),
            "flops_per_task_png": str(stage.folder / "flops_per_task.png"), "tasnet_vs_cresmd": ratios}


@contextmanager
def _stage_log(folder: Path, name: str):
    """Copies the log of one stage into ``<stage>/<stage>.log`` while it runs."""
    handler = attach_log_file(folder / f"{name}.log")
    try:
        yield
    finally:
        detach_log_file(handler)


# --------------------------------------------------------------------------- the pipeline
def run_pipeline(cfg: DictConfig, run_dir: str | Path | None = None) -> dict[str, Any]:
    """Run the stages of ``cfg.pipeline`` in ``run_dir`` (default: the Hydra run directory);
    returns the manifest also written to ``pipeline.json``."""
    spec = check_pipeline_config(cfg)
    seed = int(cfg.seed)
    run_dir = Path(run_dir if run_dir is not None else cfg.paths.output_dir).resolve()
    stages = [s for s in STAGES if s in spec["stages"]]
    products: dict[str, Any] = {k: str(Path(v).resolve()) for k, v in (spec.get("inputs") or {}).items() if v}
    precheck(spec, seed, run_dir)
    import torch

    saved_threads = torch.get_num_threads()
    if spec.get("threads"):
        # [choice] one explicit intra-op thread count for every stage: float summation order, and
        # so a search's numerics, depend on it (the bench stage still times its own counts)
        torch.set_num_threads(int(spec["threads"]))
    try:
        log.info("pipeline: %s in %s (%d torch threads)", " -> ".join(stages), run_dir, torch.get_num_threads())
        return _run_stages(cfg, spec, seed, run_dir, stages, products)
    finally:
        torch.set_num_threads(saved_threads)


def _run_stages(cfg: DictConfig, spec: dict, seed: int, run_dir: Path, stages: list[str],
                products: dict[str, Any]) -> dict[str, Any]:
    import torch

    manifest: dict[str, Any] = {"run_dir": str(run_dir), "stages": {}, "inputs": dict(products),
                                "torch_threads": torch.get_num_threads()}
    for name in stages:
        folder = run_dir / name
        links = {"search": [f"model.init_ckpt={products.get('cresmd_ckpt')}"],
                 "finetune": [f"model.derived_ckpt={products.get('derived_ckpt')}"]}.get(name, [])
        if name in TRAINING:
            overrides = _train_overrides(spec, name, seed, links)
        elif name == "evaluate":
            overrides = _eval_overrides(spec, seed)
        else:
            overrides = [f"{k}={v}" for k, v in sorted((spec.get(name) or {}).items())]
        stage = Stage(name, folder, overrides)
        done = _stage_record(folder)
        if done is not None:
            if done.get("overrides") != overrides:
                raise PipelineError(f"{folder / STAGE_FILE}: stage {name} finished with other overrides "
                                    f"({done.get('overrides')}) than now ({overrides}); use a new run directory")
            log.info("stage %s: already done (%s)", name, folder / STAGE_FILE)
            record = done
        else:
            log.info("stage %s: starting in %s", name, folder)
            started = time.perf_counter()
            with _stage_log(folder, name):
                if name in TRAINING:
                    result = _run_training(stage, spec, f"{cfg.task_name}-{run_dir.name}")
                elif name == "derive":
                    result = _run_derive(stage, spec, products["search_ckpt"])
                elif name == "evaluate":
                    # [choice] TASNet against the CResMD it was searched from and, when the run has
                    # one (stage `baseline` or pipeline.inputs.baseline_ckpt), a second CResMD:
                    # the paper's Tables 2 and 4 compare with an absolute-GT CResMD
                    compared = {"CResMD": products["cresmd_ckpt"]}
                    if products.get("baseline_ckpt"):
                        compared["CResMD-baseline"] = products["baseline_ckpt"]
                    result = _run_evaluate(stage, spec, seed, {**compared, "TASNet": products["tasnet_ckpt"]})
                else:
                    result = _run_bench(stage, spec, products["cresmd_ckpt"], products["tasnet_ckpt"])
            record = _finish_stage(stage, result, started)
            log.info("stage %s: done in %.0f s", name, record["seconds"])
        products.update({k: v for k, v in record["products"].items() if k in PRODUCT.values()})
        manifest["stages"][name] = record
    manifest["products"] = products
    write_json_atomically(run_dir / "pipeline.json", manifest)
    _print_artifacts(manifest)
    return manifest


ARTIFACTS: list[tuple[str, str, Callable[[dict], Any]]] = [
    ("cresmd", "CResMD checkpoint", lambda p: p.get("cresmd_ckpt")),
    ("baseline", "baseline CResMD", lambda p: p.get("baseline_ckpt")),
    ("search", "search checkpoint", lambda p: p.get("search_ckpt")),
    ("derive", "derived TASNet", lambda p: p.get("derived_ckpt")),
    ("derive", "its architecture", lambda p: p.get("architecture_json")),
    ("derive", "architecture picture", lambda p: p.get("architecture_png")),
    ("finetune", "fine-tuned TASNet", lambda p: p.get("tasnet_ckpt")),
    ("evaluate", "CResMD vs TASNet", lambda p: p.get("comparison_md")),
    ("bench", "cost table", lambda p: p.get("cost_md")),
    ("bench", "FLOPs per task plot", lambda p: p.get("flops_per_task_png")),
]


def _print_artifacts(manifest: dict) -> None:
    lines = [f"pipeline finished; run directory {manifest['run_dir']}"]
    for stage, label, pick in ARTIFACTS:
        record = manifest["stages"].get(stage)
        value = pick(record["products"]) if record else None
        if value:
            lines.append(f"  {label + ':':<22} {value}")
    lines.append(f"  {'manifest:':<22} {Path(manifest['run_dir']) / 'pipeline.json'}")
    evaluated = (manifest["stages"].get("evaluate") or {}).get("products", {}).get("metrics", {})
    if evaluated:
        lines.append("  test/psnr: " + ", ".join(f"{name} {m.get('test/psnr', float('nan')):.2f} dB"
                                                for name, m in evaluated.items()))
    ratios = (manifest["stages"].get("bench") or {}).get("products", {}).get("tasnet_vs_cresmd", {})
    for res, entry in ratios.items():
        flops = entry["flops_ratio"]
        speed = ", ".join(f"{label} {value:.2f}x (efficiency {value / flops:.2f})" for label, value in entry["speedup"].items())
        lines.append(f"  TASNet vs CResMD at {res}: {flops:.2f}x fewer FLOPs, faster by {speed}")
    log.info("\n".join(lines))
