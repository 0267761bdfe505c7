"""W&B as its users use it, through the real logger in offline mode: the credential check of a
self-hosted server, summaries by define_metric, the per-task table, captioned pictures, the
derived architecture as an artifact and a sweep summary in the sweep's group."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from cirlab.utils.wandb import (
    DEFAULT_BASE_URL,
    finish_wandb,
    has_wandb_credentials,
    log_architecture_artifact,
    make_wandb_logger,
    publish_sweep_summary,
    resolve_mode,
    wandb_base_url,
)
from tasnet_testing import fake_search_checkpoint, search_state

pytest.importorskip("wandb")


@pytest.fixture
def wandb_env(monkeypatch, tmp_path):
    """No credentials, no user settings: every run is written offline under tmp_path."""
    for name in ("WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_MODE", "WANDB_ENTITY", "WANDB_PROJECT", "WANDB_RUN_ID",
                 "WANDB_RUN_GROUP"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_MODE", "offline")
    yield tmp_path
    finish_wandb()


def _write_netrc(path: Path, host: str) -> None:
    path.write_text(f"machine {host}\n  login user\n  password {'k' * 40}\n")
    path.chmod(0o600)


# --------------------------------------------------------------------------- credentials
def test_a_self_hosted_server_is_the_host_whose_credentials_count(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org:8443/")
    _write_netrc(tmp_path / "netrc", "wandb.example.org:8443")  # what `wandb login --host` writes
    assert wandb_base_url() == "https://wandb.example.org:8443"
    assert has_wandb_credentials() and resolve_mode("auto") == "online"
    # a key for the public server does not log in to this one
    _write_netrc(tmp_path / "netrc", "api.wandb.ai")
    assert not has_wandb_credentials() and resolve_mode("auto") == "offline"


def test_the_server_of_wandb_login_host_is_read_from_the_settings(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))
    assert wandb_base_url() == DEFAULT_BASE_URL
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "settings").write_text("[default]\nbase_url = https://wandb.lab.internal\n")
    _write_netrc(tmp_path / "netrc", "wandb.lab.internal")
    assert wandb_base_url() == "https://wandb.lab.internal" and has_wandb_credentials()


def test_an_api_key_in_the_environment_is_enough(monkeypatch, tmp_path):
    monkeypatch.setenv("NETRC", str(tmp_path / "missing"))
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert has_wandb_credentials()


def test_bad_summary_names_fail_with_the_key(wandb_env):
    with pytest.raises(ValueError, match="summary_metrics.val/psnr"):
        make_wandb_logger(str(wandb_env / "run"), summary_metrics={"val/psnr": "highest"})


# --------------------------------------------------------------------------- a training run
def _summary(run, key):
    value = run.summary[key]
    return dict(value) if hasattr(value, "keys") else value


@pytest.mark.slow
def test_a_training_run_logs_summaries_a_per_task_table_and_captioned_pictures(wandb_env, train_cfg, capfd):
    import wandb

    from cirlab.training import train

    cfg = train_cfg("logger=many", "trainer.max_steps=6", "trainer.log_every_n_steps=1")
    metrics = train(cfg)
    run = wandb.run
    assert run is not None and run.offline
    # define_metric: the summary of val/psnr is its best value over the two validations (read
    # back from the CSV logger of the same run), of train/l1 its lowest
    import csv

    (csv_file,) = Path(cfg.paths.output_dir).glob("csv/version_*/metrics.csv")
    logged = list(csv.DictReader(csv_file.open()))
    val = [float(r["val/psnr"]) for r in logged if r.get("val/psnr")]
    l1 = [float(r["train/l1"]) for r in logged if r.get("train/l1")]
    assert len(val) == 2 and len(l1) == 6
    assert _summary(run, "val/psnr") == {"max": pytest.approx(max(val), abs=1e-4)}
    assert _summary(run, "train/l1") == {"min": pytest.approx(min(l1), abs=1e-6)}
    # the CSV logger no longer gets the per-point columns either (test_per_task.csv has them)
    assert not [k for k in logged[0] if k.startswith("test_grid/")]
    # one table instead of 27 x 3 scalar keys
    keys = list(run.summary.keys())
    assert not [k for k in keys if k.startswith("test_grid/")]
    table = _summary(run, "test/per_task")
    assert table["_type"] == "table-file" and table["nrows"] == 27
    content = json.loads((Path(run.dir) / table["path"]).read_text())
    assert content["columns"] == ["label", "r", "sigma", "q", "psnr", "ssim", "psnr_input"]
    rows = {row[0]: row for row in content["data"]}
    assert rows["r4.0_s50_q10"][4] == pytest.approx(metrics["test_grid/psnr/r4.0_s50_q10"], abs=1e-4)
    assert rows["r0.0_s50_qnone"][2] == "50" and rows["r0.0_s50_qnone"][3] == "none"
    # the task-grid picture: a wandb.Image with a caption saying what it shows
    picture = _summary(run, "val/task_grid")
    assert picture["_type"] == "images/separated" and picture["count"] == 1
    (caption,) = picture["captions"]
    assert caption.startswith("step 6: held-out image degraded at r=2, sigma=30, q=30")
    finish_wandb()
    stderr = capfd.readouterr().err
    assert "anonymous setting has no effect" not in stderr


def test_a_finetuned_tasnet_logs_its_architecture_as_an_artifact(wandb_env, tmp_path):
    from cirlab.derivation import derive_checkpoint

    fake_search_checkpoint(search_state(3, seed=5), tmp_path / "search.ckpt")
    derived = derive_checkpoint(tmp_path / "search.ckpt", tmp_path / "derived", grid="single", height=16, width=16)
    logger = make_wandb_logger(str(tmp_path / "run"), project="cirlab-test")
    artifact = log_architecture_artifact(logger, derived.json_path.parent)
    assert artifact is not None and artifact.type == "architecture"
    assert {"architecture.json", "architecture.png"} <= set(artifact.manifest.entries)
    summary = json.loads(derived.json_path.read_text())
    assert artifact.metadata["shared_maps"] == summary["shared_maps"]
    assert log_architecture_artifact(logger, tmp_path / "nowhere") is None


def test_the_artifact_callback_takes_the_folder_the_module_was_derived_from(wandb_env, tmp_path):
    from types import SimpleNamespace

    from cirlab.callbacks.wandb_artifacts import ArchitectureArtifact
    from cirlab.derivation import derive_checkpoint

    fake_search_checkpoint(search_state(3, seed=5), tmp_path / "search.ckpt")
    derived = derive_checkpoint(tmp_path / "search.ckpt", tmp_path / "derived", grid="single", height=16, width=16,
                                figure=False)
    logger = make_wandb_logger(str(tmp_path / "run"), project="cirlab-test")
    trainer = SimpleNamespace(loggers=[logger], is_global_zero=True)
    callback = ArchitectureArtifact()
    callback.on_fit_start(trainer, SimpleNamespace(hparams={"derived_from": str(derived.ckpt_path)}))
    assert callback.logged == [str(derived.json_path)]
    callback.on_fit_start(trainer, SimpleNamespace(hparams={"derived_from": None}))  # a CResMD run: nothing
    assert len(callback.logged) == 1


# --------------------------------------------------------------------------- sweeps
def test_a_sweep_summary_goes_to_the_sweep_group_as_a_table_and_the_pareto_plot(wandb_env, tmp_path):
    from cirlab.sweeps.summary import write_summary

    folder = tmp_path / "multirun"
    for job, (lr, psnr, params) in enumerate([(1e-4, 24.0, 100), (5e-4, 25.0, 200), (1e-3, 23.0, 50)]):
        (folder / str(job) / ".hydra").mkdir(parents=True)
        (folder / str(job) / ".hydra" / "overrides.yaml").write_text(f"- model.optimizer.lr={lr}\n")
        (folder / str(job) / "metrics.json").write_text(json.dumps({"val/psnr": psnr, "model/params_total": params}))
    rows, out_dir = write_summary(folder)
    logger_cfg = {"wandb": {"_target_": "cirlab.utils.wandb.make_wandb_logger", "project": "cirlab-test",
                            "entity": None, "group": "lr-grid", "mode": "auto"}}
    run = publish_sweep_summary(logger_cfg, out_dir)
    assert run is not None and run.group == "lr-grid" and run.job_type == "sweep-summary"
    media = Path(run.dir) / "media"
    (table_file,) = (media / "table" / "sweep").glob("summary_*.table.json")
    table = json.loads(table_file.read_text())
    assert len(table["data"]) == len(rows) == 3 and "val/psnr" in table["columns"]
    assert list((media / "images" / "sweep").glob("pareto_*.png"))
    # no W&B logger in the jobs' config: nothing is sent
    assert publish_sweep_summary({"csv": {"_target_": "lightning.pytorch.loggers.CSVLogger"}}, out_dir) is None

    # the end of a `cirlab-train -m` grid does the same through its Hydra callback
    from omegaconf import OmegaConf

    from cirlab.sweeps.hydra_callback import MultirunSummary

    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(folder)}}, "logger": logger_cfg})
    before = set((folder / "wandb").glob("offline-run-*"))
    MultirunSummary().on_multirun_end(config=config)
    (new_run,) = set((folder / "wandb").glob("offline-run-*")) - before
    assert list((new_run / "files" / "media" / "images" / "sweep").glob("pareto_*.png"))


def test_the_wandb_module_does_not_import_wandb_or_lightning_by_itself():
    """Entry points import cirlab.utils.wandb; W&B and Lightning load only when a logger is made."""
    import subprocess

    code = ("import sys, cirlab.utils.wandb as w; w.has_wandb_credentials(); "
            "print('wandb' in sys.modules, 'lightning' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]
