"""``cirlab-sweep``: Optuna studies over ``cirlab.training.train``, and summaries of any sweep.

Why not Hydra's Optuna sweeper: hydra-optuna-sweeper 1.3 pins ``optuna<3.0`` and its SQLite
storage fails with SQLAlchemy 2.x. Instead, **current Optuna drives the same ``train`` function
directly, with persistent storage (SQLite by default), so a long study survives an interruption
and is resumed by running the same command again.**

Run a study::

    cirlab-sweep hparams_search=cresmd_optuna                 # start, or resume, the study
    cirlab-sweep hparams_search=cresmd_optuna optuna.n_trials=40 trainer=gpu logger=csv
    cirlab-sweep summarize logs/sweeps/cresmd_optuna.db       # summary of a study
    cirlab-sweep summarize logs/train/multiruns/<date> --objectives val/psnr:max,model/params_total:min

Every argument but ``summarize`` is a Hydra override of ``conf/sweep.yaml`` (the training config
plus the defaults of the ``optuna:`` node). A study file ``conf/hparams_search/<name>.yaml``
(``# @package _global_``, so ``cirlab-train`` composes it too) declares::

    optuna:
      study_name: my_study              # storage: sqlite:///${paths.log_dir}/sweeps/<name>.db
      objectives:                       # ordered mapping metric -> maximize | minimize
        val/psnr: maximize              # (``directions:`` is accepted as another name)
        model/params_total: minimize
      n_trials: 20                      # COMPLETE (or PRUNED) trials the study must hold
      sampler: {name: nsga2, seed: 1}   # null name: tpe for one objective, nsga2 for several
      pruner: null                      # one objective only: {name: median, n_startup_trials: 5, ...}
      params:                           # training-config key -> distribution
        model.optimizer.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
        data.patch_size: {type: int, low: 32, high: 96, step: 16}
        model.net.nf: {type: categorical, choices: [16, 32, 64]}

A key that the training config lacks is added with a leading ``+`` (``+model.extra: {...}``).
Study files outside the repository: ``hydra.searchpath=[file:///path/to/conf]``.

Each trial samples its parameters, composes the training config with the user's overrides plus
``key=value`` for each parameter (``cirlab.config.compose_job``), runs ``train`` in
``<sweep_dir>/trial_<number>`` (``.hydra/config.yaml``, ``.hydra/overrides.yaml`` and
``train.log`` included), always ends the W&B run, and returns the objectives from the returned
metrics. The trial's user attributes hold its ``overrides`` (replaying them with ``cirlab-train``
reproduces it), ``run_dir`` and ``metrics``; a failed trial holds ``fail_reason`` (an objective
metric that the run did not produce is named there) and the study goes on.

Resuming: the study is loaded if it exists; trials left RUNNING by a process that died are marked
FAIL (``optuna.fail_running_on_start``) and new trials are run until the study holds ``n_trials``
COMPLETE (or PRUNED) trials. The sampler's seed is offset by the number of trials already in the
study, so a resumed study does not repeat the proposals it started with.

Pruning (one objective only; Optuna does not prune multi-objective studies): with
``optuna.pruner`` set, the :class:`OptunaPruning` callback reports the objective after each
validation and stops unpromising trials (state PRUNED). It needs the trial in this process:
single-process trainers or ``ddp_spawn``, not the subprocess-launching ``ddp`` strategy.

At the end (and whenever the driver stops) ``summary.md``, ``summary.csv`` and ``pareto.png``
are written into the sweep folder and their path printed. :func:`summarize` does the same for a
Hydra multirun folder of ``cirlab-train -m`` (each job's ``.hydra/overrides.yaml`` and
``metrics.json``).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import re
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback as HydraCallback

import lightning as L
import optuna
from omegaconf import DictConfig, OmegaConf, open_dict
from optuna.trial import TrialState

from cirlab.config import compose_job, validate_config
from cirlab.utils.files import atomic_path
from cirlab.utils.run import (
    attach_log_file,
    detach_log_file,
    write_job_files,
    write_json_atomically,
    write_text_atomically,
)
from cirlab.utils.wandb import finish_wandb

log = logging.getLogger(__name__)

# metrics shown in every summary when a run produced them (besides the objectives)
SUMMARY_METRICS = ("val/psnr", "search/gflops_27_hd", "search/shared_maps")
# objectives of a Hydra multirun summary when --objectives is not given
DEFAULT_MULTIRUN_OBJECTIVES = (("val/psnr", "maximize"), ("model/params_total", "minimize"))
SUMMARY_FILES = ("summary.md", "summary.csv", "pareto.png")
STUDY_POINTER = "study.json"
_DIRECTIONS = {"max": "maximize", "maximize": "maximize", "min": "minimize", "minimize": "minimize"}


# --------------------------------------------------------------------------- Pareto front
def normalize_direction(direction: str) -> str:
    """``max``/``maximize`` -> ``maximize``; ``min``/``minimize`` -> ``minimize``."""
    key = str(direction).strip().lower()
    if key not in _DIRECTIONS:
        raise ValueError(f"direction {direction!r} must be maximize (max) or minimize (min)")
    return _DIRECTIONS[key]


def pareto_front(points: Sequence[Sequence[float | None]], directions: Sequence[str]) -> list[int]:
    """Indices (ascending) of the points that no other point dominates.

    ``a`` dominates ``b`` when it is at least as good in every objective and strictly better in
    one, so equal points never dominate each other (ties are all on the front). Points with a
    missing or NaN coordinate take no part.
    """
    signs = [1.0 if normalize_direction(d) == "maximize" else -1.0 for d in directions]
    scored: dict[int, tuple[float, ...]] = {}
    for index, point in enumerate(points):
        if len(point) != len(signs):
            raise ValueError(f"point {index} has {len(point)} values for {len(signs)} directions")
        if all(v is not None and not math.isnan(float(v)) for v in point):
            scored[index] = tuple(s * float(v) for s, v in zip(signs, point))

    def dominates(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
        return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))

    return [i for i, p in scored.items() if not any(dominates(q, p) for j, q in scored.items() if j != i)]


# --------------------------------------------------------------------------- study file
@dataclass
class ParamSpec:
    """One swept training-config key and its distribution."""

    key: str  # as written in the override, possibly with a leading + (add a new key)
    type: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: list | None = None

    @property
    def name(self) -> str:
        return self.key.lstrip("+")

    @classmethod
    def from_config(cls, key: str, node: Any) -> ParamSpec:
        where = f"optuna.params.{key}"
        if not isinstance(node, dict):
            raise TypeError(f"{where} must be a mapping {{type, low, high, log, step, choices}}, got {node!r}")
        unknown = set(node) - {"type", "low", "high", "log", "step", "choices"}
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {sorted(unknown)}")
        kind = node.get("type")
        if kind == "categorical":
            choices = node.get("choices")
            if not isinstance(choices, list) or not choices:
                raise ValueError(f"{where}: a categorical parameter needs a non-empty list `choices`")
            if any(c is not None and not isinstance(c, (bool, int, float, str)) for c in choices):
                raise ValueError(f"{where}: choices must be numbers, strings, booleans or null")
            return cls(key, kind, choices=choices)
        if kind not in ("float", "int"):
            raise ValueError(f"{where}: type must be float, int or categorical, got {kind!r}")
        number = float if kind == "float" else int
        try:
            low, high = number(node["low"]), number(node["high"])
            step = None if node.get("step") is None else number(node["step"])
        except KeyError as missing:
            raise ValueError(f"{where}: a {kind} parameter needs {missing.args[0]!r}") from None
        except (TypeError, ValueError):
            raise ValueError(f"{where}: low/high/step must be {kind} numbers") from None
        log_scale = bool(node.get("log", False))
        if low > high:
            raise ValueError(f"{where}: low={low} > high={high}")
        if log_scale and (low <= 0 or not (step is None or (kind == "int" and step == 1))):
            raise ValueError(f"{where}: log=true needs low > 0 and no step")
        return cls(key, kind, low=low, high=high, log=log_scale, step=step)

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.type == "categorical":
            return trial.suggest_categorical(self.name, self.choices)
        if self.type == "int":
            return trial.suggest_int(self.name, self.low, self.high, step=self.step or 1, log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)

    def override(self, value: Any) -> str:
        return f"{self.key}={format_override_value(value)}"


def format_override_value(value: Any) -> str:
    """A value as Hydra's override grammar reads it back unchanged (strings quoted when needed)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    reserved = {"true", "false", "null", "nan", "inf", "-inf", "+inf"}
    if re.fullmatch(r"[A-Za-z_][\w\-./]*", text) and text.lower() not in reserved:
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


@dataclass
class StudySpec:
    """The ``optuna:`` node of a composed sweep config, checked."""

    study_name: str
    storage: str
    sweep_dir: Path
    objectives: list[tuple[str, str]]
    n_trials: int
    params: list[ParamSpec]
    sampler: dict = field(default_factory=dict)
    pruner: dict | None = None
    max_consecutive_failures: int = 3
    fail_running_on_start: bool = True

    @classmethod
    def from_config(cls, cfg: DictConfig) -> StudySpec:
        node = cfg.get("optuna")
        if node is None or OmegaConf.is_missing(node, "study_name"):
            raise ValueError("no study: pass hparams_search=<study> naming a file of conf/hparams_search/ "
                             "with an `optuna:` node (study_name, objectives, n_trials, params)")
        spec = OmegaConf.to_container(node, resolve=True)
        name = str(spec["study_name"])
        if not re.fullmatch(r"[\w.\-]+", name):
            raise ValueError(f"optuna.study_name={name!r}: use letters, digits, '_', '-' or '.' (it names files)")
        if ("objectives" in spec) == ("directions" in spec):
            raise ValueError("optuna: give exactly one of `objectives` or `directions` "
                             "(an ordered mapping metric -> maximize|minimize)")
        raw_objectives = spec.get("objectives", spec.get("directions"))
        if not isinstance(raw_objectives, dict) or not raw_objectives:
            raise ValueError("optuna.objectives must be a non-empty mapping metric -> maximize|minimize")
        objectives = [(str(metric), normalize_direction(d)) for metric, d in raw_objectives.items()]
        if not isinstance(spec.get("params"), dict) or not spec["params"]:
            raise ValueError("optuna.params must be a non-empty mapping training-config key -> distribution")
        params = [ParamSpec.from_config(str(key), value) for key, value in spec["params"].items()]
        pruner = spec.get("pruner")
        if pruner is not None:
            if len(objectives) > 1:
                raise ValueError("optuna.pruner: Optuna does not support pruning for multi-objective studies; "
                                 "set optuna.pruner=null or keep one objective")
            if not isinstance(pruner, dict) or pruner.get("name") != "median":
                raise ValueError(f"optuna.pruner must be null or {{name: median, ...}}, got {pruner!r}")
        n_trials = int(spec.get("n_trials", 0))
        if n_trials < 1:
            raise ValueError(f"optuna.n_trials must be >= 1, got {spec.get('n_trials')!r}")
        return cls(
            study_name=name,
            storage=str(spec["storage"]),
            sweep_dir=Path(spec.get("sweep_dir") or Path(cfg.paths.log_dir) / "sweeps" / name),
            objectives=objectives,
            n_trials=n_trials,
            params=params,
            sampler=dict(spec.get("sampler") or {}),
            pruner=pruner,
            max_consecutive_failures=int(spec.get("max_consecutive_failures", 3)),
            fail_running_on_start=bool(spec.get("fail_running_on_start", True)),
        )

    def make_sampler(self, seed_offset: int = 0) -> optuna.samplers.BaseSampler:
        options = dict(self.sampler)
        name = options.pop("name", None) or ("tpe" if len(self.objectives) == 1 else "nsga2")
        classes = {"tpe": optuna.samplers.TPESampler, "nsga2": optuna.samplers.NSGAIISampler,
                   "random": optuna.samplers.RandomSampler}
        if name not in classes:
            raise ValueError(f"optuna.sampler.name={name!r} must be one of {sorted(classes)} (or null)")
        seed = options.pop("seed", None)
        return classes[name](seed=None if seed is None else int(seed) + seed_offset, **options)

    def make_pruner(self) -> optuna.pruners.BasePruner:
        if self.pruner is None:
            return optuna.pruners.NopPruner()
        options = {k: v for k, v in self.pruner.items() if k != "name"}
        return optuna.pruners.MedianPruner(**options)


# --------------------------------------------------------------------------- pruning
_ACTIVE_TRIAL: optuna.Trial | None = None  # the trial this process is training, for OptunaPruning


class OptunaPruning(L.Callback):
    """Report ``monitor`` to the running Optuna trial after each validation; prune when told.

    The driver adds it to ``callbacks`` only for single-objective studies with a pruner. It finds
    its trial in this module (set by the driver around ``train``), so it does nothing elsewhere
    (e.g. in spawned DDP workers or a plain ``cirlab-train`` run).
    """

    def __init__(self, monitor: str) -> None:
        self.monitor = monitor

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trial = _ACTIVE_TRIAL
        if trial is None or trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            return
        step = int(trainer.global_step)
        trial.report(float(value), step=step)
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {step}: {self.monitor}={float(value):.6g}")


# --------------------------------------------------------------------------- driver
@dataclass
class SweepResult:
    study: optuna.Study
    summary_path: Path
    complete: bool  # the study holds n_trials finished trials


def train_job(cfg: DictConfig) -> dict[str, float]:
    """One training job (a seam for tests)."""
    from cirlab.training import train

    return train(cfg)


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _train_overrides(overrides: list[str]) -> list[str]:
    """The user's overrides for the training jobs: ``optuna.*`` only configures this driver."""
    return [o for o in overrides if _override_key(o).split(".", 1)[0] != "optuna"]


def _open_storage(url: str) -> optuna.storages.RDBStorage:
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        # several drivers may share one file: wait for its lock instead of failing at once
        return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})
    return optuna.storages.RDBStorage(url)


def _set_trial_attr(storage: optuna.storages.BaseStorage, study: optuna.Study, number: int, key: str, value: Any) -> None:
    study_id = storage.get_study_id_from_name(study.study_name)
    storage.set_trial_user_attr(storage.get_trial_id_from_study_id_trial_number(study_id, number), key, value)


def _finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


_MISSING = object()


def _check_overrides(spec: StudySpec, overrides: list[str], cfg: DictConfig) -> None:
    swept = {p.name for p in spec.params}
    clash = sorted(swept & {_override_key(o) for o in overrides if "=" in o})
    if clash:
        raise ValueError(f"{', '.join(clash)}: swept by optuna.params, so it cannot be overridden as well")
    for param in spec.params:
        if not param.key.startswith("+") and OmegaConf.select(cfg, param.name, default=_MISSING) is _MISSING:
            raise ValueError(f"optuna.params.{param.key}: the training config has no key {param.name!r} "
                             f"(write +{param.name} to add one)")


def _objective_values(metrics: dict[str, float], objectives: list[tuple[str, str]], number: int) -> list[float]:
    values = []
    for metric, _ in objectives:
        if metric not in metrics:
            produced = ", ".join(sorted(metrics)[:30]) or "nothing"
            raise KeyError(f"objective metric {metric!r} is missing from the metrics of trial {number} "
                           f"(the run produced: {produced})")
        value = float(metrics[metric])
        if math.isnan(value):
            raise ValueError(f"objective metric {metric!r} is NaN in trial {number}")
        values.append(value)
    return values


def _label_wandb_runs(cfg: DictConfig, spec: StudySpec, number: int, overrides: list[str]) -> None:
    """W&B runs of a study: grouped by the study, named by the trial (unless overridden)."""
    given = {_override_key(o) for o in overrides}
    for key, entry in (cfg.get("logger") or {}).items():
        if entry is None or "wandb" not in str(entry.get("_target_", "")).lower():
            continue
        with open_dict(entry):
            if f"logger.{key}.group" not in given:
                entry.group = spec.study_name
            if f"logger.{key}.name" not in given:
                entry.name = f"{spec.study_name}-trial_{number}"


def _run_trial(study: optuna.Study, spec: StudySpec, overrides: list[str]) -> optuna.trial.FrozenTrial:
    global _ACTIVE_TRIAL
    trial = study.ask()
    run_dir = spec.sweep_dir / f"trial_{trial.number}"
    handler = None
    try:
        params = {p.name: p.suggest(trial) for p in spec.params}
        job_overrides = [*_train_overrides(overrides), *(p.override(params[p.name]) for p in spec.params)]
        trial.set_user_attr("overrides", job_overrides)
        trial.set_user_attr("run_dir", str(run_dir))
        run_dir.mkdir(parents=True, exist_ok=True)
        handler = attach_log_file(run_dir / "train.log")
        log.info("trial %d: %s", trial.number, " ".join(f"{k}={v}" for k, v in params.items()))
        cfg = compose_job("train", job_overrides, run_dir)
        if spec.pruner is not None:
            with open_dict(cfg):
                if cfg.get("callbacks") is None:
                    cfg.callbacks = {}
                cfg.callbacks.optuna_pruning = {"_target_": "cirlab.sweep.OptunaPruning", "monitor": spec.objectives[0][0]}
        _label_wandb_runs(cfg, spec, trial.number, job_overrides)
        write_job_files(cfg, job_overrides, run_dir)
        _ACTIVE_TRIAL = trial
        try:
            metrics = train_job(cfg)
        finally:
            _ACTIVE_TRIAL = None
            finish_wandb()
        metrics = {key: float(value) for key, value in metrics.items()}
        trial.set_user_attr("metrics", metrics)
        values = _objective_values(metrics, spec.objectives, trial.number)
        frozen = study.tell(trial, values)
        log.info("trial %d complete: %s", trial.number,
                 ", ".join(f"{m}={v:.6g}" for (m, _), v in zip(spec.objectives, values)))
        return frozen
    except optuna.TrialPruned as pruned:
        trial.set_user_attr("pruned_reason", str(pruned))
        log.info("trial %d %s", trial.number, pruned)
        return study.tell(trial, state=TrialState.PRUNED)
    except Exception as error:
        reason = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
        reason = f"{type(error).__name__}: {reason}"
        log.error("trial %d failed: %s", trial.number, reason, exc_info=not isinstance(error, (KeyError, ValueError)))
        trial.set_user_attr("fail_reason", reason)
        return study.tell(trial, state=TrialState.FAIL)
    except BaseException as interrupt:  # Ctrl+C (Lightning turns it into SystemExit): fail the trial, stop
        trial.set_user_attr("fail_reason", f"interrupted ({type(interrupt).__name__})")
        study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
        raise
    finally:
        if handler is not None:
            detach_log_file(handler)


def run_sweep(overrides: Sequence[str]) -> SweepResult:
    """Create or resume the study of ``hparams_search=...`` in ``overrides``; run it to ``n_trials``."""
    overrides = list(overrides)
    cfg = compose_job("sweep", overrides, run_dir=".")
    spec = StudySpec.from_config(cfg)
    _check_overrides(spec, overrides, cfg)
    # a typo in an override fails now, not in every trial
    validate_config(compose_job("train", _train_overrides(overrides), run_dir=spec.sweep_dir))

    storage = _open_storage(spec.storage)
    study = optuna.create_study(study_name=spec.study_name, storage=storage, load_if_exists=True,
                                directions=[d for _, d in spec.objectives], pruner=spec.make_pruner())
    names = [m for m, _ in spec.objectives]
    stored = study.metric_names
    if [d.name.lower() for d in study.directions] != [d for _, d in spec.objectives] or (stored and stored != names):
        raise ValueError(f"study {spec.study_name!r} in {spec.storage} was created with objectives "
                         f"{list(zip(stored or [], [d.name.lower() for d in study.directions]))}, not "
                         f"{spec.objectives}: choose another optuna.study_name")
    if not stored:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(names)
    study.set_user_attr("sweep_dir", str(spec.sweep_dir))
    spec.sweep_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomically(spec.sweep_dir / STUDY_POINTER,
                          {"study_name": spec.study_name, "storage": _masked_url(spec.storage)})

    if spec.fail_running_on_start:
        for stale in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            reason = "interrupted: still RUNNING when the sweep was restarted (the process running it ended)"
            _set_trial_attr(storage, study, stale.number, "fail_reason", reason)
            study.tell(stale.number, state=TrialState.FAIL)
            log.warning("trial %d was left RUNNING by an earlier process: marked FAIL", stale.number)
    study.sampler = spec.make_sampler(seed_offset=len(study.get_trials(deepcopy=False)))

    done = _finished(study)
    log.info("study %s (%s): %d of %d trials finished", spec.study_name, spec.storage, done, spec.n_trials)
    failures = 0
    try:
        while done < spec.n_trials and failures < spec.max_consecutive_failures:
            frozen = _run_trial(study, spec, overrides)
            failures = failures + 1 if frozen.state == TrialState.FAIL else 0
            done = _finished(study)
    finally:
        summary = _summarize_study(study, spec.sweep_dir, source=spec.storage)
        print(f"sweep summary: {summary}")
    if done < spec.n_trials:
        log.error("stopped after %d failed trials in a row (optuna.max_consecutive_failures); "
                  "see fail_reason in %s", failures, summary)
    return SweepResult(study=study, summary_path=summary, complete=done >= spec.n_trials)


def _masked_url(url: str) -> str:
    """The storage URL without its password (it is written into the log folder)."""
    if url.startswith("sqlite"):
        return url
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


# --------------------------------------------------------------------------- summaries
@dataclass
class _Table:
    title: str
    source: str
    id_column: str
    swept: list[str]
    objectives: list[tuple[str, str]]
    rows: list[dict]


def _study_table(study: optuna.Study, objectives: list[tuple[str, str]] | None, source: str) -> _Table:
    names = study.metric_names or [f"objective_{i}" for i in range(len(study.directions))]
    own = [(name, d.name.lower()) for name, d in zip(names, study.directions)]
    trials = study.get_trials(deepcopy=False)
    swept: list[str] = []
    for trial in trials:
        swept += [name for name in trial.params if name not in swept]
    rows = []
    for trial in trials:
        metrics = dict(trial.user_attrs.get("metrics") or {})
        if trial.values is not None:
            metrics.update({name: value for (name, _), value in zip(own, trial.values)})
        rows.append({"trial": trial.number, "state": trial.state.name,
                     **{name: trial.params.get(name) for name in swept}, "_metrics": metrics,
                     "run_dir": trial.user_attrs.get("run_dir", ""),
                     "note": trial.user_attrs.get("fail_reason") or trial.user_attrs.get("pruned_reason") or ""})
    return _Table(f"study {study.study_name}", source, "trial", swept, objectives or own, rows)


def _parse_override(text: str) -> tuple[str, str]:
    key, _, value = str(text).partition("=")
    return key.lstrip("+~"), value


def _multirun_table(folder: Path, objectives: list[tuple[str, str]] | None) -> _Table:
    jobs = [p for p in folder.iterdir() if (p / ".hydra" / "overrides.yaml").is_file()]
    jobs.sort(key=lambda p: (0, int(p.name), "") if p.name.isdigit() else (1, 0, p.name))
    if not jobs:
        raise FileNotFoundError(f"{folder}: neither a study ({STUDY_POINTER}, .db) nor a multirun folder "
                                "(job folders with .hydra/overrides.yaml)")
    job_overrides = [dict(_parse_override(o) for o in OmegaConf.load(job / ".hydra" / "overrides.yaml")) for job in jobs]
    keys: list[str] = []
    for overrides in job_overrides:
        keys += [k for k in overrides if k not in keys]
    swept = {k for k in keys if len({o.get(k) for o in job_overrides}) > 1}
    multirun = folder / "multirun.yaml"
    if multirun.is_file():  # a sweep of one value per key still names its swept keys here
        hydra_node = OmegaConf.load(multirun).get("hydra") or {}
        swept |= set((hydra_node.get("sweeper") or {}).get("params") or {})
        sweep_syntax = re.compile(r",|^(range|choice|glob|interval)\(")
        swept |= {k for k, v in map(_parse_override, (hydra_node.get("overrides") or {}).get("task") or [])
                  if sweep_syntax.search(v)}
    swept_keys = [k for k in keys if k in swept]
    rows = []
    for job, overrides in zip(jobs, job_overrides):
        metrics_file = job / "metrics.json"
        metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
        rows.append({"job": job.name, "state": "COMPLETE" if metrics_file.is_file() else "NO_METRICS",
                     **{k: overrides.get(k) for k in swept_keys}, "_metrics": metrics, "run_dir": str(job), "note": ""})
    return _Table(f"multirun {folder.name}", str(folder), "job", swept_keys,
                  objectives or list(DEFAULT_MULTIRUN_OBJECTIVES), rows)


def _finalize_rows(table: _Table) -> list[dict]:
    """Plain rows: id, state, swept values, objectives, extra metrics, pareto, run_dir, note."""
    objective_names = [m for m, _ in table.objectives]
    extras = [m for m in SUMMARY_METRICS if m not in objective_names and any(m in r["_metrics"] for r in table.rows)]
    points = []
    for row in table.rows:
        usable = row["state"] == "COMPLETE"
        points.append([row["_metrics"].get(m) if usable else None for m in objective_names])
    front = set(pareto_front(points, [d for _, d in table.objectives]))
    rows = []
    for index, row in enumerate(table.rows):
        metrics = row["_metrics"]
        rows.append({
            table.id_column: row[table.id_column], "state": row["state"],
            **{k: row.get(k) for k in table.swept},
            **{m: metrics.get(m) for m in objective_names},
            **{m: metrics.get(m) for m in extras},
            "pareto": index in front, "run_dir": row["run_dir"], "note": row["note"],
        })
    return rows


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _markdown(table: _Table, rows: list[dict]) -> str:
    states: dict[str, int] = {}
    for row in rows:
        states[row["state"]] = states.get(row["state"], 0) + 1
    front = [str(r[table.id_column]) for r in rows if r["pareto"]]
    lines = [f"# Sweep summary: {table.title}", "",
             f"- source: `{table.source}`",
             "- objectives: " + ", ".join(f"`{m}` ({d})" for m, d in table.objectives),
             f"- {table.id_column}s: {len(rows)} (" + ", ".join(f"{s} {n}" for s, n in sorted(states.items())) + ")",
             f"- Pareto front ({table.id_column}s): {', '.join(front) or 'none'}", ""]
    columns = [c for c in (rows[0] if rows else {table.id_column: 0, "state": 0})
               if c != "run_dir" and not (c == "note" and not any(r["note"] for r in rows))]
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "---|" * len(columns))
    for row in rows:
        cells = [_cell(row[c]) for c in columns]
        cells = [c if len(c) <= 120 else c[:117] + "..." for c in cells]
        lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return buffer.getvalue()


def _axis_label(metric: str, direction: str) -> str:
    return f"{metric} ({direction}: {'higher' if direction == 'maximize' else 'lower'} is better)"


def _plot(table: _Table, rows: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator, ScalarFormatter

    names = [m for m, _ in table.objectives]
    complete = [r for r in rows if r["state"] == "COMPLETE" and all(r[m] is not None for m in names)]
    figure = Figure(figsize=(7, 5), layout="constrained")
    ax = figure.add_subplot()
    ident = table.id_column
    if len(names) == 1:  # one objective: value per trial/job, the best marked
        xs = [r[ident] if isinstance(r[ident], int) else i for i, r in enumerate(complete)]
        ax.scatter(xs, [r[names[0]] for r in complete], color="tab:blue", label=f"{ident}s")
        best = [(x, r) for x, r in zip(xs, complete) if r["pareto"]]
        ax.scatter([x for x, _ in best], [r[names[0]] for _, r in best], color="tab:red", s=80, label="best")
        for x, r in best:
            ax.annotate(f"#{r[ident]}", (x, r[names[0]]), textcoords="offset points", xytext=(5, 5))
        ax.set_xlabel(ident)
        ax.set_ylabel(_axis_label(*table.objectives[0]))
    else:
        (mx, dx), (my, dy) = table.objectives[:2]
        others = [r for r in complete if not r["pareto"]]
        front = sorted((r for r in complete if r["pareto"]), key=lambda r: r[mx])
        ax.scatter([r[mx] for r in others], [r[my] for r in others], color="tab:blue", alpha=0.7, label=f"{ident}s")
        ax.plot([r[mx] for r in front], [r[my] for r in front], "o--", color="tab:red", label="Pareto front")
        labels: dict[tuple[float, float], list[str]] = {}  # equal points share one label
        for r in front:
            labels.setdefault((r[mx], r[my]), []).append(f"#{r[ident]}")
        for xy, ids in labels.items():
            ax.annotate(", ".join(ids), xy, textcoords="offset points", xytext=(5, 5))
        ax.set_xlabel(_axis_label(mx, dx))
        ax.set_ylabel(_axis_label(my, dy))
        if len(names) > 2:
            ax.set_title("front over all objectives: " + ", ".join(names), fontsize=8)
    if not complete:
        ax.text(0.5, 0.5, f"no complete {ident} with every objective yet", ha="center", va="center",
                transform=ax.transAxes)
    else:
        ax.legend()
    ax.grid(alpha=0.3)
    for axis in (ax.xaxis, ax.yaxis):  # plain numbers (no "+2.34e1" offsets), whole trial numbers
        if isinstance(axis.get_major_formatter(), ScalarFormatter):
            axis.get_major_formatter().set_useOffset(False)
    if len(names) == 1:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    figure.suptitle(f"{table.title}: {len(complete)} complete {ident}s")
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120)


def _write_summary(table: _Table, out_dir: Path) -> list[dict]:
    rows = _finalize_rows(table)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomically(out_dir / "summary.md", _markdown(table, rows))
    write_text_atomically(out_dir / "summary.csv", _csv(rows))
    _plot(table, rows, out_dir / "pareto.png")
    return rows


def _summarize_study(study: optuna.Study, out_dir: Path, source: str,
                     objectives: list[tuple[str, str]] | None = None) -> Path:
    _write_summary(_study_table(study, objectives, _masked_url(source)), out_dir)
    return out_dir / "summary.md"


def _load_study(storage: str, study_name: str | None) -> optuna.Study:
    names = optuna.study.get_all_study_names(storage)
    if study_name is None:
        if len(names) != 1:
            raise ValueError(f"{storage} holds {len(names)} studies ({', '.join(names)}): name one with --study")
        study_name = names[0]
    elif study_name not in names:
        raise ValueError(f"{storage} has no study {study_name!r} (it has: {', '.join(names) or 'none'})")
    return optuna.load_study(study_name=study_name, storage=storage)


def summarize(path: str | Path, objectives: Sequence[tuple[str, str]] | None = None, *,
              study_name: str | None = None, out_dir: str | Path | None = None) -> list[dict]:
    """Summarize a sweep: an Optuna study or a Hydra multirun folder; return one row per trial/job.

    ``path``: a study database file (``*.db``), a storage URL, the driver's sweep folder (it holds
    ``study.json``) or a multirun folder (job folders with ``.hydra/overrides.yaml`` and
    ``metrics.json``). ``objectives``: ``[(metric, maximize|minimize), ...]``; by default the
    study's own, or val/psnr up and model/params_total down for a multirun. Writes
    ``summary.md``, ``summary.csv`` and ``pareto.png`` into the sweep folder (or ``out_dir``).
    Each row: the trial number (``trial``) or job folder name (``job``), ``state``, the swept
    values, each objective, any of ``SUMMARY_METRICS`` present, ``pareto``, ``run_dir``, ``note``
    (why a trial failed or was pruned).
    """
    return _summarize(path, objectives, study_name, out_dir)[0]


def _summarize(path, objectives, study_name, out_dir) -> tuple[list[dict], Path]:
    objectives = [(m, normalize_direction(d)) for m, d in objectives] if objectives else None
    text = str(path)
    folder = Path(text)
    if "://" in text or folder.is_file():
        storage = text if "://" in text else f"sqlite:///{folder.resolve()}"
        study = _load_study(storage, study_name)
        if out_dir is None:
            recorded = study.user_attrs.get("sweep_dir")
            if recorded and Path(recorded).is_dir():
                out_dir = recorded
            elif folder.is_file():
                out_dir = folder.parent / study.study_name
            else:
                raise ValueError(f"{text}: say where the summary goes (out_dir / --out)")
        table = _study_table(study, objectives, _masked_url(storage))
    elif (folder / STUDY_POINTER).is_file():
        pointer = json.loads((folder / STUDY_POINTER).read_text())
        study = _load_study(pointer["storage"], study_name or pointer["study_name"])
        table = _study_table(study, objectives, pointer["storage"])
        out_dir = out_dir or folder
    elif folder.is_dir():
        table = _multirun_table(folder, objectives)
        out_dir = out_dir or folder
    else:
        raise FileNotFoundError(f"{text}: no such study file, storage URL or sweep folder")
    return _write_summary(table, Path(out_dir)), Path(out_dir)


def parse_objectives(text: str) -> list[tuple[str, str]]:
    """``val/psnr:max,model/params_total:min`` -> ``[("val/psnr", "maximize"), ...]``."""
    objectives = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        metric, sep, direction = item.rpartition(":")
        if not sep or not metric:
            raise ValueError(f"--objectives: {item!r} must be metric:max or metric:min")
        objectives.append((metric, normalize_direction(direction)))
    return objectives


USAGE = """\
usage: cirlab-sweep hparams_search=<study> [hydra overrides of the training config...]
       cirlab-sweep summarize <study.db | storage URL | sweep folder | multirun folder>
                    [--objectives val/psnr:max,model/params_total:min] [--study NAME] [--out DIR]

Runs (or resumes: same command again) the Optuna study of conf/hparams_search/<study>.yaml,
one cirlab-train job per trial, then writes summary.md, summary.csv and pareto.png.
"""


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0
    if argv and argv[0] == "summarize":
        parser = argparse.ArgumentParser(prog="cirlab-sweep summarize", description="Summarize a sweep.")
        parser.add_argument("path", help="study .db file, storage URL, sweep folder or Hydra multirun folder")
        parser.add_argument("--objectives", type=parse_objectives, default=None,
                            help="metric:max|min,... (default: the study's; val/psnr:max,model/params_total:min "
                                 "for a multirun)")
        parser.add_argument("--study", default=None, help="study name, when the storage holds several")
        parser.add_argument("--out", default=None, help="folder for the summary (default: the sweep folder)")
        args = parser.parse_args(argv[1:])
        rows, out = _summarize(args.path, args.objectives, args.study, args.out)
        print(f"{len(rows)} rows; sweep summary: {out / 'summary.md'}")
        return 0
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    result = run_sweep(argv)
    return 0 if result.complete else 1


if __name__ == "__main__":  # run as cirlab.sweep, so OptunaPruning finds the trial set by the driver
    from cirlab.sweep import main as _main

    sys.exit(_main())


class MultirunSummary(HydraCallback):
    """Hydra callback: when a multirun ends, write its summary table and Pareto plot.

    Configured in ``conf/hparams_search/*grid.yaml`` under ``hydra.callbacks``, with the
    objectives as ``metric: maximize|minimize`` (ordered: x axis, then y axis of pareto.png).
    """

    def __init__(self, objectives: dict | None = None) -> None:
        self.objectives = [(metric, normalize_direction(direction)) for metric, direction in (objectives or {}).items()]

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        folder = Path(config.hydra.sweep.dir)
        try:
            rows, out_dir = _summarize(folder, self.objectives or None, None, None)
        except Exception as error:  # a failed summary must not hide the jobs' own results
            log.error("could not summarize the multirun in %s: %s", folder, error)
            return
        print(f"sweep summary ({len(rows)} jobs): {out_dir / 'summary.md'}")
