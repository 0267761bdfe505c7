"""Training steps per second of each module at paper size, and the wall time of the paper recipes.

:func:`bench_experiment` runs the real training job of a paper experiment (``experiment=<name>``:
its network, optimiser, batch and patch size, its DataModule with on-device pair synthesis, the
Lightning trainer with ``trainer.precision`` and the speed callback) for ``warmup + steps``
optimiser steps on the embedded photos instead of DIV2K (crops are cut from decoded images held
in memory either way, so the step does not depend on which photos). Validation, checkpoints,
pictures and loggers are off. A step's time is the period between the ends of consecutive
training batches (device synchronised there): data loading, pair synthesis (JPEG through the CPU
codec included), forward, backward, optimiser step and Lightning's overhead. The first
``warmup`` periods (cuDNN autotuning, ``torch.compile``, allocator growth) are not counted;
``steps_per_s`` is ``1 / median period``.

``tasnet_finetune_paper`` needs a derived TASNet: a paper-shaped one with random weights is
written first (:func:`cirlab.bench.cost.synthetic_tasnet`; fine-tuning runs the task-specific
part at full width with masks, so its step cost does not depend on the derived widths).

:func:`recipes` lists every ``conf/experiment/*_paper.yaml`` with its steps per run and runs
(a dedicated-network experiment is a multirun over ``dedicated_levels``); :func:`projections`
multiplies them by a measured seconds per step, the experiment's own or, marked ``proxy``, that
of the measured experiment with the same module, network and batch (:data:`PROXIES`; the data
of a proxy may differ, e.g. DeJPEG's JPEG step); without either the projection is "not
measured". :data:`PIPELINES` sums whole pipelines.
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_EXPERIMENTS", "PIPELINES", "PROXIES", "StepTimer", "bench_experiment", "fastest", "markdown",
           "parse_variant", "projections", "recipes"]

#: One paper experiment per training module (CResMD, search, fine-tune, HyperRes, HyperRes3D).
DEFAULT_EXPERIMENTS = ("cresmd_paper", "tasnet_search_paper", "tasnet_finetune_paper", "hyperres_denoise_paper",
                       "hyperres_3d_paper")

#: experiment -> measured experiment with the same module, network and batch size.
PROXIES = {
    "cresmd_relative": "cresmd_paper",
    "tsnet_search_paper": "tasnet_search_paper",
    "tsnet_finetune_paper": "tasnet_finetune_paper",
    "tasnet_a_paper": "tasnet_finetune_paper",
    "cresmd_shared31_paper": "tasnet_finetune_paper",
    "cresmd_shared62_paper": "tasnet_finetune_paper",
    "cresmd_shared99_paper": "tasnet_finetune_paper",
    "hyperres_dejpeg_paper": "hyperres_denoise_paper",
    "hyperres_sr_paper": "hyperres_denoise_paper",
}

#: Whole pipelines: name -> the experiments run one after another.
PIPELINES = {
    "issue 13 target (<= 4 h): CResMD 1M + search 200k + fine-tune 200k":
        ("cresmd_relative", "tasnet_search_paper", "tasnet_finetune_paper"),
    "experiment=tasnet_paper (cresmd, baseline, search, finetune stages)":
        ("cresmd_relative", "cresmd_paper", "tasnet_search_paper", "tasnet_finetune_paper"),
}

#: The embedded photos replace DIV2K / CBSD68 / LIVE1 / Set5 (offline, small, same crops).
EMBEDDED = ["data.embedded_root=${paths.cache_dir}/embedded", "data.train_dir=${paths.cache_dir}/embedded/train",
            "data.val_dir=${paths.cache_dir}/embedded/heldout", "data.test_dir=${paths.cache_dir}/embedded/heldout",
            "data.val_max_images=1", "data.test_max_images=1", "model.test_iqa=false"]


class StepTimer(Callback):
    """Wall time at the end of every training batch, the device synchronised first."""

    def __init__(self) -> None:
        self.ends: list[float] = []
        self.start: float | None = None

    @staticmethod
    def _sync(pl_module) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_start(self, trainer, pl_module) -> None:
        self._sync(pl_module)
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._sync(pl_module)
        self.ends.append(time.perf_counter())

    def periods(self) -> list[float]:
        """Seconds of each step: from the previous step's end (the first: from ``on_train_start``)."""
        if self.start is None:
            return []
        marks = [self.start, *self.ends]
        return [b - a for a, b in zip(marks, marks[1:])]


def _derived_checkpoint(folder: Path) -> Path:
    from cirlab.bench.cost import synthetic_tasnet

    path = folder / "tasnet_synthetic.ckpt"
    if not path.is_file():
        synthetic_tasnet(64, 32).save(path)
    return path


def bench_config(experiment: str, device: str, steps: int, warmup: int, precision: str, root: Path,
                 cache_dir: Path, num_workers: int, extra: list[str] | None = None):
    """The composed training config of ``experiment`` as the benchmark runs it (see the module docstring)."""
    from cirlab.config import compose_job

    accelerator = {"cpu": "cpu", "cuda": "gpu"}.get(device)
    if accelerator is None:
        raise ValueError(f"device={device!r} must be 'cpu' or 'cuda'")
    overrides = [f"experiment={experiment}", f"paths.root_dir={root}", f"paths.cache_dir={cache_dir}",
                 f"hydra.run.dir={root / experiment}", *EMBEDDED, "logger=none",
                 f"trainer.accelerator={accelerator}", "trainer.devices=1", f"trainer.precision={precision}",
                 f"trainer.max_steps={warmup + steps}", f"data.num_workers={num_workers}", "test=false",
                 f"data.batches_per_epoch={warmup + steps + 1}"]
    if experiment.startswith(("tasnet_finetune", "tsnet_finetune", "tasnet_a")):
        overrides.append(f"model.derived_ckpt={_derived_checkpoint(cache_dir)}")
    return compose_job("train", [*overrides, *(extra or [])], root / experiment)


def bench_experiment(experiment: str, device: str = "cpu", steps: int = 3, warmup: int = 1,
                     precision: str = "32-true", channels_last: str | bool = "auto", compile: bool = False,
                     num_workers: int = 0, cache_dir: str | Path | None = None,
                     extra: list[str] | None = None) -> dict:
    """Seconds per training step of ``experiment`` (module docstring) on ``device``.

    Returns a JSON-able dict: the settings, the module and network, batch and patch size, k
    (HyperRes), ``step_s`` (per timed step), ``median_s``, ``mean_s``, ``steps_per_s`` and the
    ``warmup_s`` periods; ``channels_last``/``compiled`` as the speed callback applied them.
    """
    import hydra
    import lightning as L

    from cirlab.callbacks.speed import TrainingSpeed
    from cirlab.config import validate_config

    if steps < 1 or warmup < 0:
        raise ValueError(f"steps={steps} must be >= 1 and warmup={warmup} >= 0")
    with tempfile.TemporaryDirectory(prefix="cirlab-bench-train-") as tmp:
        root = Path(tmp)
        cache = Path(cache_dir) if cache_dir else root / "cache"
        cache.mkdir(parents=True, exist_ok=True)
        cfg = bench_config(experiment, device, steps, warmup, precision, root, cache, num_workers, extra)
        validate_config(cfg)
        L.seed_everything(cfg.seed, workers=True)
        datamodule = hydra.utils.instantiate(cfg.data)
        model = hydra.utils.instantiate(cfg.model)
        speed = TrainingSpeed(channels_last=channels_last, compile=compile)
        timer = StepTimer()
        trainer: L.Trainer = hydra.utils.instantiate(
            cfg.trainer, callbacks=[speed, timer], logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0)
        started = time.perf_counter()
        trainer.fit(model=model, datamodule=datamodule)
        total = time.perf_counter() - started
        periods = timer.periods()
        if len(periods) != warmup + steps:
            raise RuntimeError(f"{experiment}: expected {warmup + steps} training steps, timed {len(periods)}")
        timed = periods[warmup:]
        net = model.net
        levels = getattr(cfg.data, "levels", None)
        return {
            "experiment": experiment, "module": type(model).__name__, "network": type(net).__name__,
            "nf": getattr(net, "nf", None), "nb": getattr(net, "nb", None),
            "params": sum(p.numel() for p in net.parameters()),
            "batch": int(cfg.data.batch_size), "patch": int(cfg.data.patch_size),
            "k": len(levels) if levels is not None and type(model).__name__ == "HyperRes" else None,
            "device": device, "precision": precision, "channels_last": speed.channels_last,
            "compiled": speed.compiled, "num_workers": num_workers, "torch_threads": torch.get_num_threads(),
            "warmup": warmup, "steps": steps, "warmup_s": periods[:warmup], "step_s": timed,
            "median_s": statistics.median(timed), "mean_s": statistics.fmean(timed),
            "steps_per_s": 1.0 / statistics.median(timed), "fit_wall_s": total, "overrides": list(extra or []),
        }


#: variant flags: the base precision, then ``+cl`` (channels_last) and ``+compile``.
PRECISIONS = {"fp32": "32-true", "bf16": "bf16-mixed"}


def parse_variant(text: str) -> dict:
    """``"bf16+cl+compile"`` -> ``{"variant", "precision", "channels_last", "compile"}``; base
    ``fp32`` or ``bf16``, flags ``cl`` and ``compile`` (each at most once)."""
    base, *flags = text.strip().split("+")
    if base not in PRECISIONS or len(set(flags)) != len(flags) or not set(flags) <= {"cl", "compile"}:
        raise ValueError(f"variant {text!r}: write fp32 or bf16, optionally followed by +cl (channels_last) "
                         "and +compile, e.g. bf16+cl+compile")
    return {"variant": text.strip(), "precision": PRECISIONS[base], "channels_last": "cl" in flags,
            "compile": "compile" in flags}


def fastest(results: list[dict]) -> dict[str, dict]:
    """experiment -> its fastest measured result (lowest median seconds per step)."""
    best: dict[str, dict] = {}
    for row in results:
        name = row["experiment"]
        if name not in best or row["median_s"] < best[name]["median_s"]:
            best[name] = row
    return best


# ---------------------------------------------------------------------------------- projections
def _run_count(cfg) -> int:
    """How many training jobs an experiment is: the length of ``dedicated_levels`` for a
    dedicated-network multirun, else 1."""
    levels = cfg.get("dedicated_levels")
    if levels is None:
        return 1
    from hydra.core.override_parser.overrides_parser import OverridesParser

    (override,) = OverridesParser.create().parse_overrides([f"dedicated_level={levels}"])
    return len(list(override.sweep_iterator()))


def recipes(config_dir: str | Path | None = None) -> list[dict]:
    """Every paper training recipe (``conf/experiment/*_paper.yaml`` that trains one module, and
    ``cresmd_relative``, the pipeline's CResMD): ``experiment``, ``steps`` per run, ``runs``,
    ``batch``, ``patch``."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from cirlab.config import CONFIG_DIR, register_configs

    folder = Path(config_dir or CONFIG_DIR)
    names = sorted(p.stem for p in (folder / "experiment").glob("*_paper.yaml")) + ["cresmd_relative"]
    rows = []
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(folder.resolve()), version_base="1.3", job_name="recipes"):
        for name in names:  # only plain keys are read: no run directory needed
            cfg = compose(config_name="train", overrides=[f"experiment={name}"])
            if "pipeline" in cfg:  # a whole pipeline (experiment=tasnet_paper): see PIPELINES
                continue
            rows.append({"experiment": name, "steps": int(cfg.trainer.max_steps), "runs": _run_count(cfg),
                         "batch": int(cfg.data.batch_size), "patch": int(cfg.data.patch_size)})
    return rows


def projections(measured: dict[str, float], recipe_rows: list[dict],
                variants: dict[str, str] | None = None) -> tuple[list[dict], list[dict]]:
    """Wall-time projections from ``measured`` (experiment -> seconds per step; ``variants``:
    experiment -> the variant measured, recorded beside).

    Returns (recipe rows with ``seconds_per_step``, ``measured_as``, ``proxy``, ``hours`` (None:
    not measured)), (pipeline rows with ``hours`` (None if a part is not measured) and ``parts``).
    """
    rows = []
    for recipe in recipe_rows:
        name = recipe["experiment"]
        source = name if name in measured else PROXIES.get(name) if PROXIES.get(name) in measured else None
        seconds = measured.get(source) if source else None
        hours = None if seconds is None else seconds * recipe["steps"] * recipe["runs"] / 3600
        rows.append({**recipe, "measured_as": source, "proxy": source is not None and source != name,
                     "variant": (variants or {}).get(source) if source else None,
                     "seconds_per_step": seconds, "hours": hours})
    by_name = {row["experiment"]: row for row in rows}
    pipelines = []
    for title, parts in PIPELINES.items():
        hours = [by_name[p]["hours"] if p in by_name else None for p in parts]
        pipelines.append({"pipeline": title, "parts": list(parts),
                          "hours": None if any(h is None for h in hours) else sum(hours)})
    return rows, pipelines


def _hours(value: float | None) -> str:
    if value is None:
        return "not measured"
    if value >= 48:
        return f"{value:,.0f} h ({value / 24:,.1f} days)"
    return f"{value:,.2f} h"


def markdown(results: list[dict], recipe_rows: list[dict], pipelines: list[dict], reference: str = "") -> str:
    """The measured steps/s per variant, then the projected wall time of each recipe and pipeline."""
    lines = ["| experiment | module | batch x patch | device | precision | channels_last | compiled | s/step (median) "
             "| steps/s |" + (" steps/s at reference CPU |" if reference else ""),
             "|---|---|---|---|---|---|---|---|---|" + ("---|" if reference else "")]
    for r in results:
        k = f", k {r['k']}" if r.get("k") else ""
        scaled = f" {r['steps_per_s_at_reference']:.3g} |" if reference and "steps_per_s_at_reference" in r else (
            " |" if reference else "")
        lines.append(f"| {r['experiment']} | {r['module']} | {r['batch']} x {r['patch']}{k} | {r['device']} "
                     f"| {r['precision']} | {r['channels_last']} | {r['compiled'] or 'no'} | {r['median_s']:.4g} "
                     f"| {r['steps_per_s']:.3g} |{scaled}")
    lines += ["", f"Projected wall time of the paper recipes at these rates{reference}:", "",
              "| recipe | steps x runs | measured as | s/step | wall time |", "|---|---|---|---|---|"]
    for row in recipe_rows:
        source = row["measured_as"] or "-"
        if row.get("variant"):
            source += f", {row['variant']}"
        if row["proxy"]:
            source += " (proxy)"
        seconds = "-" if row["seconds_per_step"] is None else f"{row['seconds_per_step']:.4g}"
        runs = f" x {row['runs']}" if row["runs"] > 1 else ""
        lines.append(f"| {row['experiment']} | {row['steps']:,}{runs} | {source} | {seconds} | {_hours(row['hours'])} |")
    lines += ["", "| pipeline | wall time |", "|---|---|"]
    lines += [f"| {p['pipeline']} | {_hours(p['hours'])} |" for p in pipelines]
    return "\n".join(lines) + "\n"
