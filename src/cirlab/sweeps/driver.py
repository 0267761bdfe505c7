"""The Optuna driver: create or resume the study of ``hparams_search=...`` and run it to ``n_trials``.

:func:`run_sweep` composes ``conf/sweep.yaml`` with the user's overrides, checks the study
(:class:`~cirlab.sweeps.spec.StudySpec`), the overrides and the objective names (against the metrics the
module declares, :func:`~cirlab.sweeps.spec.check_objectives`) before any trial, then loads or creates
the study in its persistent storage. Each trial samples its parameters, composes the training
config with the user's overrides (not ``optuna.*``) plus ``key=value`` per parameter, runs
:func:`train_job` in ``<sweep_dir>/trial_<number>`` (``.hydra/config.yaml``,
``.hydra/overrides.yaml``, ``train.log``), always ends the W&B run, and tells the study the
objectives from the returned metrics. User attributes of a trial: ``overrides`` (replaying them
with ``cirlab-train`` reproduces it), ``run_dir``, ``metrics``; ``fail_reason`` or
``pruned_reason``. A failed trial does not stop the study; ``max_consecutive_failures`` in a row do.

Several drivers may work on one study at once (e.g. a SLURM array of ``cirlab-sweep`` on one
SQL database or journal file): each records a heartbeat of its running trial, and before each
trial a driver marks FAIL only the RUNNING trials whose heartbeat stopped (their driver died) and
queues them again with the same parameters (:mod:`cirlab.sweeps.storage`); the live trials of
the other drivers are left alone. Drivers stop once the study holds ``n_trials`` finished
trials, so a study may end with up to one extra trial per further driver. Resuming: the
sampler's seed is offset by the number of trials already stored (plus the SLURM array index or
rank of the driver, :func:`_driver_salt`), so a resumed study or a second driver does not repeat
the first proposals. Whenever the driver stops, ``summary.md``, ``summary.csv`` and
``pareto.png`` are written into the sweep folder and their path printed.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import optuna
from omegaconf import DictConfig, OmegaConf, open_dict
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

from cirlab.config import compose_job, validate_config
from cirlab.sweeps.pruning import trial_in_progress
from cirlab.sweeps.spec import StudySpec, check_objectives
from cirlab.sweeps.storage import STUDY_POINTER, ask_live, heartbeat_running, masked_url, open_storage, retry_of
from cirlab.sweeps.summary import summarize_study
from cirlab.utils.run import attach_log_file, detach_log_file, write_job_files, write_json_atomically
from cirlab.utils.wandb import finish_wandb, publish_sweep_summary

log = logging.getLogger(__name__)

PRUNING_CALLBACK = "cirlab.sweeps.pruning.OptunaPruning"  # _target_ added to callbacks when pruning


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


def _driver_salt() -> int:
    """Seed offset of this driver among several started at once: its SLURM array index or rank."""
    for name in ("SLURM_ARRAY_TASK_ID", "SLURM_PROCID"):
        value = os.environ.get(name, "")
        if value.isdigit():
            return 10_007 * int(value)
    return 0


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


def _note(trial: optuna.Trial, key: str, value: object) -> None:
    """Set a user attribute, unless another driver already ended the trial (it looked stale)."""
    try:
        trial.set_user_attr(key, value)
    except UpdateFinishedTrialError:
        pass


def _run_trial(study: optuna.Study, spec: StudySpec, overrides: list[str]) -> optuna.trial.FrozenTrial:
    trial = ask_live(study)
    run_dir = spec.sweep_dir / f"trial_{trial.number}"
    handler = None
    try:
        with heartbeat_running(study, trial):
            params = {p.name: p.suggest(trial) for p in spec.params}
            job_overrides = [*_train_overrides(overrides), *(p.override(params[p.name]) for p in spec.params)]
            trial.set_user_attr("overrides", job_overrides)
            trial.set_user_attr("run_dir", str(run_dir))
            run_dir.mkdir(parents=True, exist_ok=True)
            handler = attach_log_file(run_dir / "train.log")
            retried = retry_of(study, trial)
            log.info("trial %d%s: %s", trial.number, "" if retried is None else f" (a retry of trial {retried})",
                     " ".join(f"{k}={v}" for k, v in params.items()))
            cfg = compose_job("train", job_overrides, run_dir)
            with open_dict(cfg):
                cfg.pop("optuna", None)  # the study's own node: this driver's settings, not the job's
                if spec.pruner is not None:
                    if cfg.get("callbacks") is None:
                        cfg.callbacks = {}
                    cfg.callbacks.optuna_pruning = {"_target_": PRUNING_CALLBACK, "monitor": spec.objectives[0][0]}
            _label_wandb_runs(cfg, spec, trial.number, job_overrides)
            write_job_files(cfg, job_overrides, run_dir)
            try:
                with trial_in_progress(trial):
                    metrics = train_job(cfg)
            finally:
                finish_wandb()
        metrics = {key: float(value) for key, value in metrics.items()}
        _note(trial, "metrics", metrics)
        values = _objective_values(metrics, spec.objectives, trial.number)
        frozen = study.tell(trial, values, skip_if_finished=True)
        if frozen.state != TrialState.COMPLETE:
            log.error("trial %d finished but another driver had marked it %s (no heartbeat within "
                      "optuna.grace_period): its metrics are kept as a user attribute only", trial.number,
                      frozen.state.name)
        else:
            log.info("trial %d complete: %s", trial.number,
                     ", ".join(f"{m}={v:.6g}" for (m, _), v in zip(spec.objectives, values)))
        return frozen
    except optuna.TrialPruned as pruned:
        _note(trial, "pruned_reason", str(pruned))
        log.info("trial %d %s", trial.number, pruned)
        return study.tell(trial, state=TrialState.PRUNED, skip_if_finished=True)
    except Exception as error:
        reason = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
        reason = f"{type(error).__name__}: {reason}"
        log.error("trial %d failed: %s", trial.number, reason, exc_info=not isinstance(error, (KeyError, ValueError)))
        _note(trial, "fail_reason", reason)
        return study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
    except BaseException as interrupt:  # Ctrl+C (Lightning turns it into SystemExit): fail the trial, stop
        _note(trial, "fail_reason", f"interrupted ({type(interrupt).__name__})")
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
    train_cfg = compose_job("train", _train_overrides(overrides), run_dir=spec.sweep_dir)
    validate_config(train_cfg)
    check_objectives(spec, train_cfg)  # a misspelt objective fails now, not after the first full trials

    storage = open_storage(spec.storage, spec.liveness)
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
                          {"study_name": spec.study_name, "storage": masked_url(spec.storage)})

    study.sampler = spec.make_sampler(seed_offset=len(study.get_trials(deepcopy=False)) + _driver_salt())

    done = _finished(study)
    log.info("study %s (%s): %d of %d trials finished", spec.study_name, spec.storage, done, spec.n_trials)
    failures = 0
    try:
        while done < spec.n_trials and failures < spec.max_consecutive_failures:
            frozen = _run_trial(study, spec, overrides)
            failures = failures + 1 if frozen.state == TrialState.FAIL else 0
            done = _finished(study)
    finally:
        summary = summarize_study(study, spec.sweep_dir, source=spec.storage)
        print(f"sweep summary: {summary}")
        try:  # the table and pareto.png into the trials' W&B group (the study name), when they log to W&B
            publish_sweep_summary(train_cfg.get("logger"), spec.sweep_dir, group=spec.study_name)
        except Exception as error:  # noqa: BLE001  (W&B trouble must not hide the summary written above)
            log.error("could not send the sweep summary to W&B: %s", error)
    if done < spec.n_trials:
        log.error("stopped after %d failed trials in a row (optuna.max_consecutive_failures); "
                  "see fail_reason in %s", failures, summary)
    return SweepResult(study=study, summary_path=summary, complete=done >= spec.n_trials)
