"""End-to-end training jobs through the real config: fast_dev_run, a full tiny run, eval,
resume, a multirun sweep with W&B offline, and bad input (DDP on CPU: tests/test_ddp.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from cirlab.data.image_files import ImageFolderError
from cirlab.evaluation.grid import evaluate
from cirlab.training import train
from conftest import TINY


def read_state(ckpt: Path) -> dict:
    return torch.load(ckpt, map_location="cpu", weights_only=True)


def test_fast_dev_run(train_cfg):
    metrics = train(train_cfg("debug=fast_dev_run"))
    assert metrics["train/l1"] > 0
    assert 0 < metrics["test/ssim"] <= 1


def test_tiny_run_leaves_checkpoints_tables_metrics_and_picture(train_cfg, tmp_path):
    cfg = train_cfg()
    metrics = train(cfg)
    run = Path(cfg.paths.output_dir)
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert len(list((run / "checkpoints").glob("step*.ckpt"))) == 1
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["val/psnr"] == pytest.approx(metrics["val/psnr"])
    assert saved["model/params_total"] == saved["model/params_trainable"] > 0
    rows = (run / "test_per_task.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 27 and rows[1].startswith("r0.0_s0_qnone")
    assert rows[0] == "label,r,sigma,q,psnr,ssim,psnr_input"
    assert float(rows[1].split(",")[6]) == 100.0  # the clean input is the target (capped PSNR)
    assert metrics["test_grid/psnr_input/r0.0_s50_qnone"] < 20  # sigma 50 noise: ~14 dB
    assert (run / "pictures" / "latest.png").stat().st_size > 10_000
    # the heavily degraded grid points score lower than the mild ones
    per_task = {row.split(",")[0]: float(row.split(",")[4]) for row in rows[1:]}
    assert per_task["r4.0_s50_q10"] < per_task["r0.0_s0_q80"]
    # test/psnr averages the 26 restoration tasks; the clean point is reported apart
    tasks = [v for k, v in metrics.items() if k.startswith("test_grid/psnr/") and not k.endswith("r0.0_s0_qnone")]
    assert len(tasks) == 26 and metrics["test/psnr"] == pytest.approx(sum(tasks) / 26, rel=1e-5)
    assert metrics["test/psnr_all_points"] > metrics["test/psnr"]
    # the checkpoint holds the network and plain hyper-parameters only (weights_only loads it)
    state = read_state(run / "checkpoints" / "last.ckpt")
    assert state["cirlab_module"] == "cirlab.models.cresmd.CResMD"
    assert all(key.startswith("net.") for key in state["state_dict"])


def test_last_ckpt_is_the_newest_state_when_the_monitored_metric_stops_improving(train_cfg):
    """Lightning 2.6's save_last only follows new best checkpoints; cirlab's LastCheckpoint does not."""
    cfg = train_cfg("data.batches_per_epoch=2", "trainer.max_steps=6", "test=false",
                    "callbacks.model_checkpoint.monitor=step", "callbacks.model_checkpoint.mode=min")
    from cirlab.training import run_training

    run = run_training(cfg)
    assert read_state(run.best_ckpt)["global_step"] == 2  # the best by this monitor is the first
    assert run.last_ckpt.endswith("last.ckpt") and read_state(run.last_ckpt)["global_step"] == 6
    assert not list(Path(run.last_ckpt).parent.glob(".*.tmp"))


def test_a_resumed_run_keeps_the_csv_rows_of_the_interrupted_one(train_cfg, tmp_path):
    run_dir = f"hydra.run.dir={tmp_path / 'run'}"
    first = train_cfg("data.batches_per_epoch=2", "trainer.max_steps=2", "test=false", "trainer.log_every_n_steps=1", run_dir)
    train(first)
    last = Path(first.paths.output_dir) / "checkpoints" / "last.ckpt"
    train(train_cfg("data.batches_per_epoch=2", "trainer.max_steps=4", "test=false", "trainer.log_every_n_steps=1",
                    run_dir, f"ckpt_path={last}"))
    files = sorted((tmp_path / "run" / "csv").glob("version_*/metrics.csv"))
    assert [f.parent.name for f in files] == ["version_0", "version_1"]
    steps = [{int(row.split(",")[header.index("step")]) for row in rows if row.split(",")[header.index("step")]}
             for header, rows in ((text[0].split(","), text[1:]) for text in (f.read_text().splitlines() for f in files))]
    assert min(steps[0]) < 2 <= max(steps[1])  # the first start's rows are still there


def test_eval_scores_a_checkpoint_and_writes_tables(train_cfg, tmp_path, shared_cache):
    cfg = train_cfg()
    train(cfg)
    ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    eval_cfg = train_cfg(f"ckpt_path={ckpt}", "data=embedded", "data.test_crop=48", "data.num_workers=0",
                         f"hydra.run.dir={tmp_path / 'eval'}", config_name="eval")
    metrics = evaluate(eval_cfg).metrics
    out = Path(eval_cfg.paths.output_dir)
    assert (out / "test_per_task.md").read_text().count("\n") == 2 + 27
    assert "test/psnr" in (out / "test_average.md").read_text()
    assert metrics["test/psnr"] > 10


def test_eval_without_checkpoint_names_the_path(train_cfg):
    with pytest.raises(FileNotFoundError, match="nowhere.ckpt"):
        evaluate(train_cfg("ckpt_path=nowhere.ckpt", "data=embedded", config_name="eval"))


@pytest.mark.slow
def test_resume_mid_epoch_continues_steps_schedule_and_data(train_cfg, tmp_path):
    common = ["data.batches_per_epoch=3", "callbacks.last_checkpoint.every_n_train_steps=2", "test=false",
              "callbacks.task_grid_picture=null", "model.scheduler.milestones=[3,5]"]
    straight = train_cfg(*common, "trainer.max_steps=6", f"hydra.run.dir={tmp_path / 'straight'}")
    train(straight)
    first = train_cfg(*common, "trainer.max_steps=4", f"hydra.run.dir={tmp_path / 'resumed'}")
    train(first)
    assert read_state(tmp_path / "resumed" / "checkpoints" / "last.ckpt")["global_step"] == 4  # mid-epoch 2
    second = train_cfg(*common, "trainer.max_steps=6", "ckpt_path=last", f"hydra.run.dir={tmp_path / 'resumed'}")
    train(second)
    a = read_state(tmp_path / "straight" / "checkpoints" / "last.ckpt")
    b = read_state(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 6
    assert a["lr_schedulers"][0]["last_epoch"] == b["lr_schedulers"][0]["last_epoch"] == 6
    assert a["optimizer_states"][0]["param_groups"][0]["lr"] == b["optimizer_states"][0]["param_groups"][0]["lr"]
    for key, value in a["state_dict"].items():  # same data stream => same weights
        torch.testing.assert_close(b["state_dict"][key], value, rtol=0, atol=1e-6, msg=key)


@pytest.mark.slow
def test_multirun_sweep_with_wandb_offline(tmp_path, shared_cache):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path), NETRC=str(tmp_path / "no-netrc"))  # no credentials anywhere
    overrides = [o for o in TINY if not o.startswith(("logger=", "callbacks.task_grid_picture"))]
    command = [sys.executable, "-m", "cirlab.cli.train", "-m", "model.optimizer.lr=1e-3,2e-3", "logger=wandb",
               f"paths.root_dir={tmp_path}", f"paths.cache_dir={shared_cache}", "test=false",
               "trainer.max_steps=2", "data.batches_per_epoch=2", "callbacks.task_grid_picture=null",
               f"hydra.sweep.dir={tmp_path / 'sweep'}", *overrides]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-3000:]
    jobs = sorted(p for p in (tmp_path / "sweep").iterdir() if p.is_dir() and p.name.isdigit())
    assert [j.name for j in jobs] == ["0", "1"]
    for job in jobs:
        assert "val/psnr" in json.loads((job / "metrics.json").read_text())
        runs = list((job / "wandb").glob("offline-run-*"))
        assert len(runs) == 1, f"{job}: one offline W&B run per job expected, found {runs}"
        assert list(runs[0].glob("run-*.wandb")), "the offline run was not written"


def _make_folder(path: Path, sizes, mode="RGB") -> Path:
    path.mkdir(parents=True)
    for index, (h, w) in enumerate(sizes):
        Image.new(mode, (w, h), color=(index * 40) % 255 if mode == "L" else (10, 20 * index, 30)).save(path / f"img{index}.png")
    return path


def test_empty_training_folder_fails_before_training(train_cfg, tmp_path):
    (tmp_path / "empty").mkdir()
    cfg = train_cfg(f"data.train_dir={tmp_path / 'empty'}", "data.embedded_root=null",
                    f"data.val_dir={tmp_path / 'empty'}")
    with pytest.raises(ImageFolderError, match="data.train_dir"):
        train(cfg)
    assert not (Path(cfg.paths.output_dir) / "checkpoints").exists()


def test_image_smaller_than_patch_names_file_and_key(train_cfg, tmp_path):
    folder = _make_folder(tmp_path / "train", [(64, 64), (20, 64)])
    cfg = train_cfg(f"data.train_dir={folder}", "data.patch_size=32")
    with pytest.raises(ImageFolderError, match=r"img1\.png.*data\.patch_size"):
        train(cfg)


def test_grayscale_image_skipped_with_warning_when_configured(train_cfg, tmp_path, caplog):
    folder = _make_folder(tmp_path / "train", [(64, 64), (64, 80)])
    Image.new("L", (64, 64)).save(folder / "gray.png")
    with pytest.raises(ImageFolderError, match="gray.png"):
        train(train_cfg(f"data.train_dir={folder}", "debug=fast_dev_run"))
    with caplog.at_level("WARNING"):
        train(train_cfg(f"data.train_dir={folder}", "data.on_bad=skip", "debug=fast_dev_run"))
    assert any("gray.png" in record.getMessage() for record in caplog.records)


@pytest.mark.slow
def test_test_stage_reports_niqe_and_brisque_and_keeps_them_out_of_checkpoints(train_cfg, iqa_dir):
    cfg = train_cfg("model.test_iqa=true", f"model.iqa_weights_dir={iqa_dir}", "data.test_crop=96",
                    "data.test_grid=[[0,0,0],[0,1,0]]", "data.val_grid=[[0,0,0],[0,1,0]]")
    metrics = train(cfg)
    assert 0 < metrics["test/niqe"] < 100 and 0 <= metrics["test/brisque"] <= 150
    assert metrics["test_grid/psnr/r0.0_s50_qnone"] < metrics["test_grid/psnr/r0.0_s0_qnone"]
    state = read_state(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt")
    assert all(key.startswith("net.") for key in state["state_dict"])
