"""cirlab.sweeps: the Pareto front, the Optuna driver (persistent study, resume, failed and pruned
trials) and summaries of a study and of a Hydra multirun."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import torch
from omegaconf import OmegaConf
from optuna.trial import TrialState

from cirlab.cli.sweep import main
from cirlab.sweeps import driver
from cirlab.sweeps.driver import run_sweep
from cirlab.sweeps.spec import format_override_value
from cirlab.sweeps.storage import Liveness, ask_live, heartbeat_running, load_study, open_storage
from cirlab.sweeps.summary import pareto_front, parse_objectives, summarize, write_summary
from conftest import TINY

# TINY, trimmed to two steps of training and no test stage (what test_train's multirun uses)
TINY_SWEEP = [o for o in TINY if not o.startswith(("logger=", "callbacks.task_grid_picture", "trainer.max_steps",
                                                   "data.batches_per_epoch"))]
TINY_SWEEP += ["logger=csv", "test=false", "trainer.max_steps=2", "data.batches_per_epoch=2",
               "callbacks.task_grid_picture=null"]
TWO_OBJECTIVES = {"val/psnr": "maximize", "model/params_total": "minimize"}
NF = {"model.net.nf": {"type": "categorical", "choices": [4, 8]}}


@pytest.fixture
def study_args(tmp_path, shared_cache):
    """Factory: write a study file into a config folder on Hydra's search path; return the overrides."""

    def make(name: str, n_trials: int = 2, objectives=None, params=None, **extra) -> list[str]:
        node = {"study_name": name, "n_trials": n_trials, "objectives": objectives or TWO_OBJECTIVES,
                "params": params or NF, "sampler": {"seed": 0}, **extra}
        folder = tmp_path / "conf" / "hparams_search"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.yaml").write_text("# @package _global_\n" + OmegaConf.to_yaml({"optuna": node}))
        return [f"hparams_search={name}", f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
                f"paths.root_dir={tmp_path}", f"paths.cache_dir={shared_cache}"]

    return make


def load(tmp_path: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / 'logs' / 'sweeps' / f'{name}.db'}")


def table_rows(markdown: Path) -> list[list[str]]:
    lines = [line for line in markdown.read_text().splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]  # no header, no rule


class FakeTrain:
    """Stands in for cirlab.training.train: metrics from the config, scripted per call."""

    def __init__(self, script=()):
        self.script = list(script)
        self.configs = []
        self.run_dirs = []  # paths.output_dir resolves through the current HydraConfig: read it now

    def __call__(self, cfg):
        self.configs.append(cfg)
        self.run_dirs.append(cfg.paths.output_dir)
        nf = cfg.model.net.nf
        metrics = {"val/psnr": 20.0 + nf, "model/params_total": float(100 * nf), "search/shared_maps": 3.0}
        step = self.script[len(self.configs) - 1] if len(self.configs) <= len(self.script) else None
        if callable(step):
            metrics = step(cfg, metrics)
        return metrics


# heartbeat settings that make a stopped driver's trial stale within seconds
FAST_HEARTBEAT = ["optuna.heartbeat_interval=1", "optuna.grace_period=2"]


def _dead_driver_trial(storage_url: str, name: str, nf: int) -> int:
    """What a driver that died mid-trial leaves: a RUNNING trial (model.net.nf = nf) whose last
    heartbeat is 3 s old."""
    study = optuna.load_study(study_name=name, storage=open_storage(storage_url, Liveness(1, 2)))
    study.enqueue_trial({"model.net.nf": nf})
    trial = ask_live(study)
    assert trial.suggest_categorical("model.net.nf", [4, 8]) == nf
    with heartbeat_running(study, trial):
        pass  # one heartbeat, then the driver "dies"
    time.sleep(3)
    return trial.number


# --------------------------------------------------------------------------- Pareto front
def test_pareto_front_excludes_dominated_points_and_keeps_ties():
    # maximize x, minimize y
    points = [(30.0, 5.0), (29.0, 4.0), (28.0, 6.0), (30.0, 5.0), (31.0, 9.0), (29.0, 4.5)]
    # 2 is dominated by 0 and 1; 5 by 1 (same x, larger y); 0 and 3 tie and stay
    assert pareto_front(points, ["maximize", "minimize"]) == [0, 1, 3, 4]
    assert pareto_front(points, ["min", "max"]) == [2, 4]  # directions flipped
    assert pareto_front([(1, 1, 1), (1, 1, 0), (0, 2, 0)], ["max"] * 3) == [0, 2]


def test_pareto_front_one_objective_and_missing_values():
    assert pareto_front([(3.0,), (5.0,), (5.0,), (1.0,)], ["maximize"]) == [1, 2]
    # missing or NaN coordinates take no part (and dominate nothing)
    assert pareto_front([(1.0, 1.0), (None, 0.0), (math.nan, 0.0), (2.0, 2.0)], ["min", "min"]) == [0]
    assert pareto_front([], ["max", "min"]) == []
    with pytest.raises(ValueError, match="direction"):
        pareto_front([(1.0,)], ["up"])


def test_parse_objectives():
    assert parse_objectives("val/psnr:max, model/params_total:minimize") == [
        ("val/psnr", "maximize"), ("model/params_total", "minimize")]
    with pytest.raises(ValueError, match="val/psnr"):
        parse_objectives("val/psnr")


@pytest.mark.parametrize("value", [3, 0.00012345678901234, 1e-5, True, None, "cresmd_tiny", "a b", "1e-3", "it's",
                                   "null"])
def test_override_values_read_back_unchanged(value):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_override(f"key={format_override_value(value)}").value()
    assert parsed == value and type(parsed) is type(value)


# --------------------------------------------------------------------------- driver (fast: fake training)
def test_missing_objective_metric_fails_the_trial_and_the_study_goes_on(study_args, tmp_path, monkeypatch, caplog):
    def drop_psnr(cfg, metrics):
        return {k: v for k, v in metrics.items() if k != "val/psnr"}

    fake = FakeTrain([drop_psnr])
    monkeypatch.setattr(driver, "train_job", fake)
    args = study_args("missing", n_trials=2)
    result = run_sweep([*args, "optuna.n_trials=2"])
    assert result.complete
    trials = load(tmp_path, "missing").trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert "'val/psnr' is missing" in trials[0].user_attrs["fail_reason"]
    assert any("val/psnr" in r.getMessage() and r.levelno == logging.ERROR for r in caplog.records)
    # each trial: the user's overrides (not optuna.*) plus its parameters, in its own run directory
    first = trials[1]
    assert first.user_attrs["overrides"] == [*args, f"model.net.nf={first.params['model.net.nf']}"]
    assert fake.run_dirs[1] == str(tmp_path / "logs" / "sweeps" / "missing" / "trial_1")
    assert "optuna_pruning" not in fake.configs[1].callbacks  # no pruning with two objectives
    assert (fake.configs[1].logger.wandb.group, fake.configs[1].logger.wandb.name) == ("missing", "missing-trial_1")
    assert OmegaConf.load(Path(first.user_attrs["run_dir"]) / ".hydra" / "overrides.yaml")[-1].startswith("model.net.nf=")
    assert first.values == [20.0 + first.params["model.net.nf"], 100.0 * first.params["model.net.nf"]]
    # the summary names the failure; the failed trial is on no front
    rows = summarize(tmp_path / "logs" / "sweeps" / "missing")
    assert [r["state"] for r in rows] == ["FAIL", "COMPLETE", "COMPLETE"] and not rows[0]["pareto"]
    assert "val/psnr" in rows[0]["note"] and rows[1]["search/shared_maps"] == 3.0


def test_driver_gives_up_after_consecutive_failures(study_args, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(driver, "train_job", FakeTrain([lambda cfg, m: {}] * 5))
    assert main([*study_args("hopeless", n_trials=3), "optuna.max_consecutive_failures=2"]) == 1
    assert [t.state for t in load(tmp_path, "hopeless").trials] == [TrialState.FAIL] * 2
    summary = tmp_path / "logs" / "sweeps" / "hopeless" / "summary.md"
    assert f"sweep summary: {summary}" in capsys.readouterr().out
    assert len(table_rows(summary)) == 2


def test_training_error_fails_the_trial_with_its_message(study_args, tmp_path, monkeypatch):
    def boom(cfg, metrics):
        raise RuntimeError("CUDA out of memory (pretend)")

    monkeypatch.setattr(driver, "train_job", FakeTrain([boom]))
    assert run_sweep(study_args("boom", n_trials=1)).complete
    first = load(tmp_path, "boom").trials[0]
    assert first.state == TrialState.FAIL and "out of memory" in first.user_attrs["fail_reason"]


def test_single_objective_study_prunes_with_median_pruner(study_args, tmp_path, monkeypatch):
    import hydra

    values = iter([10.0, 5.0, 12.0])

    def validate_once(cfg, metrics):  # what Lightning does: the callback sees each validation's metrics
        callback = hydra.utils.instantiate(cfg.callbacks.optuna_pruning)
        value = next(values)
        trainer = SimpleNamespace(callback_metrics={"val/psnr": torch.tensor(value)}, global_step=4,
                                  sanity_checking=False)
        callback.on_validation_end(trainer, None)
        return {**metrics, "val/psnr": value}

    monkeypatch.setattr(driver, "train_job", FakeTrain([validate_once] * 3))
    args = study_args("pruned", n_trials=3, objectives={"val/psnr": "maximize"},
                      pruner={"name": "median", "n_startup_trials": 1, "n_warmup_steps": 0})
    assert run_sweep(args).complete
    trials = load(tmp_path, "pruned").trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.COMPLETE]
    assert "step 4" in trials[1].user_attrs["pruned_reason"]
    # the summary of a one-objective study: best marked, plot written
    rows, out = write_summary(tmp_path / "logs" / "sweeps" / "pruned.db")
    assert [r["pareto"] for r in rows] == [False, False, True]
    assert (out / "pareto.png").stat().st_size > 5_000


@pytest.mark.parametrize(("extra", "override", "message"), [
    ({"pruner": {"name": "median"}}, None, "multi-objective"),
    ({"params": {"model.net.nf": {"type": "uniform", "low": 1, "high": 2}}}, None, "model.net.nf: type"),
    ({"params": {"model.net.nope": {"type": "int", "low": 1, "high": 2}}}, None, "no key 'model.net.nope'"),
    ({"params": {"model.optimizer.lr": {"type": "float", "low": 0.0, "high": 1.0, "log": True}}}, None, "log=true"),
    ({}, "model.net.nf=8", "model.net.nf: swept"),
    ({"objectives": {"val/psnr": "up"}}, None, "direction 'up'"),
    ({"fail_running_on_start": False}, None, "heartbeat"),
    ({"grace_period": 1}, None, "grace_period=1 must be longer"),
])
def test_bad_study_fails_before_any_trial(study_args, tmp_path, monkeypatch, extra, override, message):
    fake = FakeTrain()
    monkeypatch.setattr(driver, "train_job", fake)
    args = study_args("bad", **extra)
    with pytest.raises(ValueError, match=message):
        run_sweep([*args, *([override] if override else [])])
    assert fake.configs == []


def test_no_study_named_says_how_to_name_one(tmp_path):
    with pytest.raises(ValueError, match="hparams_search="):
        run_sweep([f"paths.root_dir={tmp_path}"])


def test_changed_objectives_are_refused_on_resume(study_args, tmp_path, monkeypatch):
    monkeypatch.setattr(driver, "train_job", FakeTrain())
    run_sweep(study_args("fixed", n_trials=1))
    with pytest.raises(ValueError, match="another optuna.study_name"):
        run_sweep(study_args("fixed", n_trials=2, objectives={"model/params_total": "minimize", "val/psnr": "maximize"}))


# --------------------------------------------------------------------------- several drivers, heartbeats, journal
STORAGES = ["sqlite", "journal"]


def _storage_url(kind: str, tmp_path: Path, name: str) -> str:
    folder = tmp_path / "logs" / "sweeps"
    return f"journal:{folder / f'{name}.journal'}" if kind == "journal" else f"sqlite:///{folder / f'{name}.db'}"


def _storage_args(kind: str, tmp_path: Path, name: str) -> list[str]:
    return [f"optuna.storage={_storage_url(kind, tmp_path, name)}"] if kind == "journal" else []


@pytest.mark.parametrize("kind", STORAGES)
def test_stale_trial_of_a_dead_driver_fails_and_runs_again(kind, study_args, tmp_path, monkeypatch):
    monkeypatch.setattr(driver, "train_job", FakeTrain())
    args = [*study_args("stale", n_trials=1), *_storage_args(kind, tmp_path, "stale"), *FAST_HEARTBEAT]
    assert run_sweep(args).complete
    url = _storage_url(kind, tmp_path, "stale")
    stale = _dead_driver_trial(url, "stale", nf=8)
    assert run_sweep([*args, "optuna.n_trials=2"]).complete
    trials = load_study(url, "stale").trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    assert "no heartbeat for more than 2 s" in trials[stale].user_attrs["fail_reason"]
    retry = trials[2]  # the same parameters, run again; it does not inherit the failure
    assert retry.params == {"model.net.nf": 8} and retry.system_attrs["failed_trial"] == stale
    assert "fail_reason" not in retry.user_attrs
    rows = summarize(tmp_path / "logs" / "sweeps" / "stale")
    assert [r["state"] for r in rows] == ["COMPLETE", "FAIL", "COMPLETE"] and "heartbeat" in rows[1]["note"]
    if kind == "journal":  # the journal file itself can be summarized
        rows, out = write_summary(tmp_path / "logs" / "sweeps" / "stale.journal")
        assert len(rows) == 3 and out == tmp_path / "logs" / "sweeps" / "stale"


@pytest.mark.parametrize("kind", STORAGES)
def test_a_live_trial_of_another_driver_is_left_alone(kind, study_args, tmp_path, monkeypatch):
    """Another driver's trial runs for longer than grace_period while this driver starts two
    trials: its heartbeat keeps it RUNNING, and it completes when that driver says so."""

    def slow(cfg, metrics):
        time.sleep(2.5)  # > grace_period: without heartbeats the other trial would look stale
        return metrics

    monkeypatch.setattr(driver, "train_job", FakeTrain([slow, slow]))
    url = _storage_url(kind, tmp_path, "shared")
    args = [*study_args("shared", n_trials=2), *_storage_args(kind, tmp_path, "shared"), *FAST_HEARTBEAT]
    other = optuna.create_study(study_name="shared", storage=open_storage(url, Liveness(1, 2)),
                                directions=["maximize", "minimize"])
    trial = ask_live(other)
    trial.suggest_categorical("model.net.nf", [4, 8])
    with heartbeat_running(other, trial):
        result = run_sweep(args)
        assert load_study(url, "shared").trials[trial.number].state == TrialState.RUNNING
    other.tell(trial, [30.0, 400.0])
    trials = load_study(url, "shared").trials
    assert result.complete and [t.state for t in trials] == [TrialState.COMPLETE] * 3


def test_journal_storage_url_needs_a_path_and_an_existing_file_to_summarize(tmp_path):
    with pytest.raises(ValueError, match="journal:<path"):
        open_storage("journal:")
    with pytest.raises(FileNotFoundError, match="nowhere.journal"):
        load_study(f"journal:{tmp_path / 'nowhere.journal'}", None)
    assert not (tmp_path / "nowhere.journal").exists()


DRIVER_PROCESS = """
import sys, time
from cirlab.cli.sweep import main
from cirlab.sweeps import driver

def train_for_3_s(cfg):  # a trial longer than grace_period (2 s)
    time.sleep(3)
    nf = cfg.model.net.nf
    return {"val/psnr": 20.0 + nf, "model/params_total": 100.0 * nf}

driver.train_job = train_for_3_s
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("kind", STORAGES)
def test_two_drivers_at_once_on_one_study(kind, study_args, tmp_path):
    """Two cirlab-sweep processes share one study (a cluster array job): both finish, the study
    holds its trials, none failed, and trials of the two drivers ran at the same time."""
    args = [*study_args("pair", n_trials=4), *_storage_args(kind, tmp_path, "pair"), *FAST_HEARTBEAT]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    drivers = [subprocess.Popen([sys.executable, "-c", DRIVER_PROCESS, *args], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL) for _ in range(2)]
    outputs = [d.communicate(timeout=600) for d in drivers]
    for d, (_, err) in zip(drivers, outputs):
        assert d.returncode == 0, err[-3000:]
    trials = load_study(_storage_url(kind, tmp_path, "pair"), "pair").trials
    assert 4 <= len(trials) <= 5  # the second driver may finish one trial past n_trials
    assert all(t.state == TrialState.COMPLETE for t in trials), [(t.number, t.state, t.user_attrs) for t in trials]
    assert len({t.user_attrs["run_dir"] for t in trials}) == len(trials)
    spans = sorted((t.datetime_start, t.datetime_complete) for t in trials)
    assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:]))  # two trials ran at once
    logs = [err for _, err in outputs]
    assert all("trial" in err and "complete" in err for err in logs)  # each driver finished trials of its own


def test_cirlab_train_refuses_an_optuna_study_and_points_at_cirlab_sweep(tmp_path, shared_cache):
    from cirlab.training import train
    from conftest import compose

    cfg = compose("train", [f"paths.root_dir={tmp_path}", f"paths.cache_dir={shared_cache}",
                            "hparams_search=cresmd_optuna"])
    with pytest.raises(ValueError, match=r"cirlab-sweep hparams_search=") as error:
        train(cfg)
    assert "optuna.study_name=cresmd_optuna" in str(error.value)
    # the real command line, as a multirun: it stops with that message, and no job trained
    command = [sys.executable, "-m", "cirlab.cli.train", "-m", "hparams_search=tasnet_optuna",
               f"paths.root_dir={tmp_path}", f"paths.cache_dir={shared_cache}", "logger=csv"]
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
                          env={**os.environ, "WANDB_MODE": "disabled"})
    assert done.returncode != 0
    assert "run the study with `cirlab-sweep hparams_search=" in done.stderr + done.stdout
    assert not list(tmp_path.glob("logs/**/*.ckpt")) and not list(tmp_path.glob("logs/**/metrics.json"))


# --------------------------------------------------------------------------- real training
@pytest.mark.slow
def test_two_objective_sweep_of_tiny_cresmd_persists_and_resumes(study_args, tmp_path, capsys):
    args = [*study_args("tiny", n_trials=2), *TINY_SWEEP]
    assert main(args) == 0
    db = tmp_path / "logs" / "sweeps" / "tiny.db"
    folder = tmp_path / "logs" / "sweeps" / "tiny"
    assert db.is_file()
    assert f"sweep summary: {folder / 'summary.md'}" in capsys.readouterr().out
    assert len(table_rows(folder / "summary.md")) == 2
    assert (folder / "pareto.png").stat().st_size > 10_000
    with open(folder / "summary.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["trial"] for r in rows] == ["0", "1"] and all(r["state"] == "COMPLETE" for r in rows)
    study = load(tmp_path, "tiny")
    for trial in study.trials:  # objectives are the trial's own metrics.json values
        saved = json.loads((folder / f"trial_{trial.number}" / "metrics.json").read_text())
        assert trial.values == [pytest.approx(saved["val/psnr"]), saved["model/params_total"]]
        assert f"model.net.nf={trial.params['model.net.nf']}" in trial.user_attrs["overrides"]
    by_nf = {t.params["model.net.nf"]: t.values[1] for t in study.trials}
    if len(by_nf) == 2:
        assert by_nf[4] < by_nf[8]

    # a driver died in the middle of a trial: the trial is RUNNING, its heartbeat stopped 3 s ago
    stale = _dead_driver_trial(f"sqlite:///{db}", "tiny", nf=8)
    assert load(tmp_path, "tiny").trials[stale].state == TrialState.RUNNING
    # the same command, with a larger budget: the stale trial fails and is run again (same nf)
    assert main([*args, "optuna.n_trials=3", *FAST_HEARTBEAT]) == 0
    trials = load(tmp_path, "tiny").trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2 + [TrialState.FAIL, TrialState.COMPLETE]
    assert "no heartbeat" in trials[2].user_attrs["fail_reason"]
    assert trials[3].params == {"model.net.nf": 8} and trials[3].system_attrs["failed_trial"] == 2
    assert len(table_rows(folder / "summary.md")) == 4


@pytest.mark.slow
def test_summary_of_a_hydra_multirun(tmp_path, shared_cache, capsys):
    command = [sys.executable, "-m", "cirlab.cli.train", "-m", "model.optimizer.lr=1e-3,2e-3",
               f"paths.root_dir={tmp_path}", f"paths.cache_dir={shared_cache}", f"hydra.sweep.dir={tmp_path / 'sweep'}",
               *TINY_SWEEP]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    done = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = summarize(tmp_path / "sweep", [("val/psnr", "max"), ("model/params_total", "min")])
    assert [r["job"] for r in rows] == ["0", "1"]
    assert sorted(float(r["model.optimizer.lr"]) for r in rows) == [1e-3, 2e-3]
    assert all(r["val/psnr"] > 0 and r["model/params_total"] > 0 for r in rows)
    # same parameter count: the front is the better PSNR (both when they tie)
    best = max(r["val/psnr"] for r in rows)
    assert [r["pareto"] for r in rows] == [r["val/psnr"] == best for r in rows]
    for name in ("summary.md", "summary.csv", "pareto.png"):
        assert (tmp_path / "sweep" / name).is_file()
    assert len(table_rows(tmp_path / "sweep" / "summary.md")) == 2
    # the command line, with its default objectives, writes the same table
    assert main(["summarize", str(tmp_path / "sweep"), "--objectives", "val/psnr:max,model/params_total:min"]) == 0
    assert "2 rows" in capsys.readouterr().out


# --------------------------------------------------------------------------- entry points and config targets
def test_module_entry_point_prints_usage():
    done = subprocess.run([sys.executable, "-m", "cirlab.cli.sweep", "--help"], capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("usage: cirlab-sweep hparams_search=<study>")


@pytest.mark.parametrize("name", ["cresmd_lr_grid", "tasnet_grid"])
def test_grid_studies_name_the_multirun_summary_callback(name):
    from hydra.utils import instantiate

    from cirlab.config import CONFIG_DIR
    from cirlab.sweeps.hydra_callback import MultirunSummary

    node = OmegaConf.load(Path(CONFIG_DIR) / "hparams_search" / f"{name}.yaml").hydra.callbacks.summary
    callback = instantiate(node)
    assert isinstance(callback, MultirunSummary) and callback.objectives[0] == ("val/psnr", "maximize")


# ------------------------------------------------------------------ objectives checked before the first trial (issue 15.8)
@pytest.mark.parametrize(("objectives", "overrides", "message"), [
    ({"val/pnsr": "maximize"}, [], "optuna.objectives.val/pnsr: cirlab.models.cresmd.CResMD logs no such metric"),
    ({"val/psnr": "maximize", "search/gflops_27_hd": "minimize"}, [], "optuna.objectives.search/gflops_27_hd"),
    ({"test/psnr": "maximize"}, ["test=false"], "optuna.objectives.test/psnr: trials run with test=false"),
])
def test_an_objective_no_trial_produces_fails_before_any_training(study_args, monkeypatch, objectives, overrides,
                                                                  message):
    fake = FakeTrain()
    monkeypatch.setattr(driver, "train_job", fake)
    with pytest.raises(ValueError) as info:
        run_sweep([*study_args("misspelt", objectives=objectives), *overrides])
    assert message in str(info.value) and "valid names" in str(info.value) and "val/psnr" in str(info.value)
    assert fake.configs == []


def test_objectives_of_labelled_metrics_and_of_the_shipped_studies_are_accepted(study_args, monkeypatch):
    from cirlab.config import compose_job
    from cirlab.sweeps.spec import StudySpec, check_objectives

    monkeypatch.setattr(driver, "train_job", FakeTrain([lambda cfg, m: {**m, "test_grid/psnr/r0.0_s50_qnone": 1.0}]))
    assert run_sweep(study_args("labelled", n_trials=1, objectives={"test_grid/psnr/r0.0_s50_qnone": "maximize"})).complete
    for name in ("cresmd_optuna", "tasnet_optuna"):
        cfg = compose_job("sweep", [f"hparams_search={name}"], run_dir=".")
        check_objectives(StudySpec.from_config(cfg), compose_job("train", [f"hparams_search={name}"], run_dir="."))
