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

    # a process died in the middle of a trial: that trial is still RUNNING in the database
    stale = study.ask()
    assert study.trials[stale.number].state == TrialState.RUNNING
    # the same command, with a larger budget: the stale trial fails, exactly one new trial runs
    assert main([*args, "optuna.n_trials=3"]) == 0
    trials = load(tmp_path, "tiny").trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2 + [TrialState.FAIL, TrialState.COMPLETE]
    assert "interrupted" in trials[2].user_attrs["fail_reason"]
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
