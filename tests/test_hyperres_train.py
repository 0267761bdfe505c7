"""HyperRes end to end through the real config: every hyperres experiment runs one tiny step, a tiny
run leaves its per-level table and checkpoint, and the level sweep scores HyperRes beside a
dedicated network (on the shared CBSD68/LIVE1/Set5 images when present)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cirlab.training import train
from conftest import CONFIG_DIR, compose, shared_data_path

HYPERRES_EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("hyperres*.yaml"))

EMBEDDED = ["data.embedded_root=${paths.cache_dir}/embedded", "data.train_dir=${paths.cache_dir}/embedded/train",
            "data.val_dir=${paths.cache_dir}/embedded/heldout", "data.test_dir=${paths.cache_dir}/embedded/heldout"]


def tiny_overrides(experiment: str) -> list[str]:
    """One step of a tiny network on the embedded photos, whatever the experiment's scale."""
    common = ["trainer.accelerator=cpu", "trainer.devices=1", "trainer.max_steps=1", "data.batches_per_epoch=1",
              "data.num_workers=0", "data.patch_size=32", "data.batch_size=2", "data.val_max_images=1",
              "data.test_max_images=1", "logger=csv", "model.net.nf=8", "model.net.nb=1",
              "callbacks.progress_bar.refresh_rate=0", *EMBEDDED]
    if "3d" in experiment:
        return [*common, "data.val_crop=48", "data.test_crop=48", "callbacks.task_grid_picture.crop=48"]
    return [*common, "data.val_crop=40", "data.test_crop=40", "callbacks.level_picture.crop=40"]


def run_cfg(tmp_path: Path, cache: Path, experiment: str, *overrides: str, run: str = "run"):
    base = [f"paths.root_dir={tmp_path}", f"paths.cache_dir={cache}", f"hydra.run.dir={tmp_path / run}"]
    return compose("train", [*base, f"experiment={experiment}", *tiny_overrides(experiment), *overrides])


def test_hyperres_experiments_exist():
    assert {"hyperres_denoise", "hyperres_dejpeg", "hyperres_sr", "hyperres_3d", "hyperres_dedicated",
            "hyperres_dedicated_dejpeg", "hyperres_dedicated_sr", "hyperres_denoise_paper", "hyperres_dejpeg_paper",
            "hyperres_sr_paper", "hyperres_3d_paper", "hyperres_dedicated_paper", "hyperres_dedicated_dejpeg_paper",
            "hyperres_dedicated_sr_paper"} <= set(HYPERRES_EXPERIMENTS)


@pytest.mark.parametrize("task", ["denoise", "dejpeg", "sr"])
@pytest.mark.parametrize("scale", ["", "_paper"])
def test_dedicated_baselines_and_their_level_sweeps_exist_for_every_task(task, scale):
    """Issue 11: a dedicated MainNet per level of the task's test sweep, for DeJPEG and SR as for denoising."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    from cirlab.data.hyperres import get_task

    experiment = f"hyperres_dedicated{'' if task == 'denoise' else '_' + task}{scale}"
    cfg = compose("train", [f"experiment={experiment}", "hparams_search=hyperres_dedicated_levels"])
    assert cfg.data.task == task and cfg.model.net._target_.endswith("MainNet")
    assert cfg.model.net.nf == (64 if scale else 32) and cfg.hydra.mode.name == "MULTIRUN"
    params = OmegaConf.to_container(cfg.hydra.sweeper.params, resolve=True)
    (override,) = OverridesParser.create().parse_overrides([f"{key}={value}" for key, value in params.items()])
    assert override.key_or_group == "dedicated_level"
    assert list(override.sweep_iterator()) == list(get_task(task).sweep_levels)  # the task's test levels
    one = compose("train", [f"experiment={experiment}", f"dedicated_level={get_task(task).sweep_levels[-1]}"])
    assert list(one.data.levels) == list(one.model.train_levels) == [get_task(task).sweep_levels[-1]]
    if scale:
        assert Path(one.data.test_dir).name == get_task(task).test_set and one.data.patch_size == 96


def test_paper_recipe_matches_method_md():
    cfg = compose("train", ["experiment=hyperres_denoise_paper"])
    assert (cfg.model.net.nf, cfg.model.net.nb, cfg.model.net.cond_dim) == (64, 16, 1)
    assert cfg.model.optimizer.lr == 1e-4 and list(cfg.model.scheduler.milestones) == [500000]
    assert cfg.model.scheduler.gamma == 0.1 and cfg.trainer.max_steps == 1_000_000
    assert (cfg.data.batch_size, cfg.data.patch_size, cfg.data.level_scale) == (16, 96, 255.0)
    assert list(cfg.data.levels) == [15, 35, 55, 75] and list(cfg.model.train_levels) == [15, 35, 55, 75]
    assert Path(cfg.data.test_dir).name == "CBSD68"
    assert Path(compose("train", ["experiment=hyperres_dejpeg_paper"]).data.test_dir).name == "LIVE1"
    sr = compose("train", ["experiment=hyperres_sr_paper"])
    assert Path(sr.data.test_dir).name == "Set5" and list(sr.data.levels) == [2, 3, 4, 5]
    dedicated = compose("train", ["experiment=hyperres_dedicated_paper", "dedicated_level=40"])
    assert dedicated.model.net._target_.endswith("MainNet") and list(dedicated.model.train_levels) == [40]


@pytest.mark.parametrize("experiment", HYPERRES_EXPERIMENTS)
def test_every_hyperres_experiment_runs_one_tiny_step(experiment, tmp_path, shared_cache):
    # test=true: a recipe that leaves testing to a later command (hyperres_3d_compare) is tested here too
    cfg = run_cfg(tmp_path, shared_cache, experiment, "test=true")
    metrics = train(cfg)
    assert metrics["train/l1"] > 0 and metrics["test/psnr"] > 0
    assert (Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt").is_file()
    assert metrics["model/gflops_hd"] > 0  # cost beside quality (the 3-D variant: the 27-point workload too)
    if "3d" in experiment:
        assert metrics["model/gflops_27_hd"] == pytest.approx(27 * metrics["model/gflops_hd"])
        assert len([k for k in metrics if k.startswith("test_grid/psnr/")]) == 27  # CResMD's grid


def test_tiny_denoise_run_writes_per_level_table_and_loadable_checkpoint(tmp_path, shared_cache):
    from cirlab.archs.hyperres import HyperResNet
    from cirlab.checkpoints import load_module

    cfg = run_cfg(tmp_path, shared_cache, "hyperres_denoise", "trainer.max_steps=2")
    metrics = train(cfg)
    run = Path(cfg.paths.output_dir)
    assert {f"train_level/l1_sigma{s}" for s in (15, 35, 55, 75)} <= set(metrics)
    assert {f"val_level/psnr_sigma{s}" for s in (5, 25, 90)} <= set(metrics)  # unseen levels validated too
    rows = (run / "test_levels.csv").read_text().strip().splitlines()
    assert rows[0] == "level,psnr,ssim,psnr_input" and len(rows) == 1 + 18 and rows[1].startswith("5,")
    assert metrics["test_grid/psnr_input/sigma90"] < metrics["test_grid/psnr_input/sigma5"]
    assert (run / "pictures" / "latest.png").stat().st_size > 5_000
    module = load_module(run / "checkpoints" / "last.ckpt")
    assert isinstance(module.net, HyperResNet)
    assert module.hparams.task == "denoise" and module.hparams.train_levels == [15, 35, 55, 75]
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["model/params_total"] == sum(p.numel() for p in module.net.parameters())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny HyperRes and a tiny dedicated denoiser (sigma 25), trained 2 steps each."""
    root = tmp_path_factory.mktemp("hyperres-runs")
    cache = root / "cache"
    paths = {}
    for name, experiment, extra in (("hyperres", "hyperres_denoise", []), ("dedicated", "hyperres_dedicated", ["dedicated_level=25"])):
        cfg = run_cfg(root, cache, experiment, "trainer.max_steps=2", "test=false", *extra, run=name)
        train(cfg)
        paths[name] = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    paths["heldout"] = cache / "embedded" / "heldout"
    return paths


def test_level_sweep_scores_hyperres_and_dedicated_networks(trained, tmp_path):
    from cirlab.cli.hyperres_eval import run
    from cirlab.data.hyperres import ENVELOPE

    out = tmp_path / "sweep"
    result = run(["--task", "denoise", "--model", f"HyperRes={trained['hyperres']}", str(trained["dedicated"]),
                   "--data", str(trained["heldout"]), "--levels", "10:30:5", "--crop", "48", "--out", str(out)])
    assert result["levels"] == [10, 15, 20, 25, 30] and result["images"] == 2
    assert set(result["psnr"]) == {"input", "HyperRes", "dedicated 25", ENVELOPE}
    envelope = result["psnr"][ENVELOPE]
    assert envelope[3] == result["psnr"]["dedicated 25"][3] and all(v != v for i, v in enumerate(envelope) if i != 3)
    assert result["psnr"]["input"][0] > result["psnr"]["input"][-1]
    assert (out / "levels_psnr.png").stat().st_size > 10_000
    table = (out / "levels.md").read_text()
    assert "| 25 |" in table and "dedicated (own level)" in table
    assert (out / "levels.csv").read_text().splitlines()[0] == 'level,input,HyperRes,dedicated 25,dedicated (own level)'


def test_mixed_level_sweep_equals_one_level_at_a_time(trained):
    from cirlab.evaluation.levels import evaluate_levels, load_level_model

    model = load_level_model(str(trained["hyperres"]))
    kwargs = {"levels": [10, 40, 95], "crop": 40, "progress": False}
    chunked = evaluate_levels([model], "denoise", trained["heldout"], chunk=3, **kwargs)
    single = evaluate_levels([model], "denoise", trained["heldout"], chunk=1, **kwargs)
    assert chunked["psnr"]["HyperRes [15,35,55,75]"] == pytest.approx(single["psnr"]["HyperRes [15,35,55,75]"], abs=1e-6)


@pytest.mark.parametrize(("task", "folder", "levels"), [("denoise", "CBSD68", "5,50,90"), ("dejpeg", "LIVE1", "10,80"),
                                                         ("sr", "Set5", "2,6")])
def test_level_sweep_on_the_shared_test_sets(trained, tmp_path, task, folder, levels):
    from cirlab.cli.hyperres_eval import run

    data = shared_data_path("test", folder)
    result = run(["--task", task, "--model", f"h={trained['hyperres']}", "--data", str(data), "--levels", levels,
                   "--max-images", "1", "--crop", "64", "--out", str(tmp_path / task)])
    assert result["channel"] == ("rgb" if task == "denoise" else "y_rounded")
    # the degraded input's PSNR falls with the level (JPEG: rises with quality)
    first, last = result["psnr"]["input"][0], result["psnr"]["input"][-1]
    assert (first < last) if task == "dejpeg" else (first > last)


def test_hyperres_model_needs_level_data(tmp_path, shared_cache):
    cfg = compose("train", [f"paths.root_dir={tmp_path}", f"paths.cache_dir={shared_cache}",
                            f"hydra.run.dir={tmp_path / 'run'}", "model=hyperres_tiny", "data=embedded", "logger=none",
                            "trainer.max_steps=1", "data.batches_per_epoch=1", "data.num_workers=0"])
    with pytest.raises(ValueError, match="level data config"):
        train(cfg)


def test_checkpoint_holds_only_network_weights(trained):
    state = torch.load(trained["dedicated"], map_location="cpu", weights_only=True)
    assert state["cirlab_module"] == "cirlab.models.hyperres.HyperRes"
    assert all(key.startswith("net.") for key in state["state_dict"])
    assert state["hyper_parameters"]["train_levels"] == [25.0]
