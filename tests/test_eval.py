"""cirlab-eval: one command for every checkpoint kind under a protocol of conf/protocol/, one
comparison table and plot per call with each model's FLOPs; the single-checkpoint form as before."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cirlab.archs.flops import cresmd_flops
from cirlab.evaluation.compare import model_specs, run_eval
from cirlab.tasks import level_grid
from conftest import compose, shared_data_path
from eval_testing import make_checkpoint
from tasnet_testing import NB, NF


def write_images(folder: Path, count: int = 2, size: tuple[int, int] = (30, 34)) -> Path:
    """Smooth colour test images, one per format cirlab reads (PNG, BMP, TIFF, JPEG)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0 : size[0], 0 : size[1]]
    for index, suffix in zip(range(count), [".png", ".bmp", ".tif", ".jpg"]):
        phase = rng.uniform(0, 6, 3)
        image = np.stack([127 + 100 * np.sin(xx / (4 + c) + yy / 7 + phase[c]) for c in range(3)], axis=-1)
        Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(folder / f"img{index}{suffix}")
    return folder


def eval_cfg(tmp_path: Path, *overrides: str, run: str = "eval"):
    return compose("eval", [f"paths.root_dir={tmp_path}", f"paths.cache_dir={tmp_path / 'cache'}", "device=cpu",
                            f"hydra.run.dir={tmp_path / run}", *overrides])


def test_two_models_give_one_table_and_plot_with_their_flops(tmp_path):
    images = write_images(tmp_path / "images", count=4)  # PNG, BMP, TIFF and JPEG
    cresmd = make_checkpoint("cresmd", tmp_path / "a", seed=1)
    tasnet = make_checkpoint("tasnet", tmp_path / "b", seed=2)
    cfg = eval_cfg(tmp_path, f"images={images}", f"models={{CResMD:{cresmd},TASNet:{tasnet}}}")
    result = run_eval(cfg)
    out = Path(cfg.paths.output_dir)
    table = (out / "comparison.md").read_text()
    assert "| CResMD | cresmd |" in table and "| TASNet | tasnet |" in table
    assert (out / "comparison.png").stat().st_size > 5_000
    data = json.loads((out / "comparison.json").read_text())
    flops = {m["name"]: m["flops"] for m in data["models"]}
    tasks = level_grid("cresmd27")
    assert flops["CResMD"] == cresmd_flops(NF, NB, 720, 1280, tasks=27)
    from cirlab.archs.tasnet import TASNet

    assert flops["TASNet"] == TASNet.load(tasnet).flops(tasks, 720, 1280)
    assert "images (4), " in data["notes"][0]  # every image of the folder was scored
    assert data["workload"] == {"tasks": 27, "height": 720, "width": 1280,
                                "text": "cresmd27 (27 task vectors) on one 1280x720 image"}
    for name in ("CResMD", "TASNet"):  # per-model grid tables in their own folders
        assert (out / name / "test_per_task.md").read_text().count("\n") == 2 + 27
        model = next(m for m in data["models"] if m["name"] == name)
        assert 5 < model["psnr"] < 100 and 0 < model["ssim"] <= 1
        assert f"{model['flops'] / 1e9:,.3f}" in table
    assert result.comparison.quality["CResMD"]["psnr"] != result.comparison.quality["TASNet"]["psnr"]
    per_task = (out / "comparison_per_task.md").read_text()
    assert "CResMD, TASNet on the same test grid" in per_task and "| PSNR TASNet - CResMD |" in per_task
    assert per_task.count("| r=") == 27  # one row per grid point
    csv = (out / "comparison.csv").read_text().splitlines()
    assert csv[0].startswith("model,kind,psnr,ssim,flops") and len(csv) == 3


def test_trainer_path_and_restorer_path_score_the_same(tmp_path):
    images = write_images(tmp_path / "images", count=2)
    ckpt = make_checkpoint("tasnet_finetune", tmp_path / "m", seed=3)
    single = run_eval(eval_cfg(tmp_path, f"images={images}", f"ckpt_path={ckpt}", "protocol.grid=single",
                               run="single"))
    assert single.grid is not None  # one module checkpoint: trainer.test, tables and metrics.json as before
    out = tmp_path / "single"
    assert (out / "test_per_task.md").read_text().count("\n") == 2 + 7
    metrics = json.loads((out / "metrics.json").read_text())
    listed = run_eval(eval_cfg(tmp_path, f"images={images}", f"models=[{ckpt}]", "protocol.grid=single",
                               run="listed"))
    assert listed.grid is None
    name = listed.comparison.models[0]
    for key in ("psnr", "ssim"):
        assert listed.comparison.quality[name][key] == pytest.approx(metrics[f"test/{key}"], abs=1e-3)
    assert listed.comparison.flops[name] == single.comparison.flops[single.comparison.models[0]]


def test_a_derived_tasnet_alone_writes_the_single_checkpoint_files(tmp_path):
    images = write_images(tmp_path / "images", count=1)
    ckpt = make_checkpoint("tasnet", tmp_path / "m", seed=4)
    cfg = eval_cfg(tmp_path, f"images={images}", f"ckpt_path={ckpt}", "protocol.grid=single")
    run_eval(cfg)
    out = Path(cfg.paths.output_dir)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["ckpt_path"] == str(ckpt) and metrics["test/psnr"] > 5
    assert (out / "test_per_task.md").read_text().count("\n") == 2 + 7 and (out / "test_average.md").is_file()


def test_hyperres_runs_the_levels_protocol_through_cirlab_eval(tmp_path, monkeypatch):
    from cirlab.cli.eval import main

    images = write_images(tmp_path / "images", count=2)
    hyperres = make_checkpoint("hyperres", tmp_path / "h", seed=5)
    dedicated = make_checkpoint("hyperres_dedicated", tmp_path / "d", seed=6)
    out = tmp_path / "levels"
    argv = ["cirlab-eval", "protocol=levels", f"images={images}", "device=cpu",
            f"models={{HyperRes:{hyperres},dedicated25:{dedicated}}}", "protocol.levels=[15,25,50]",
            f"paths.root_dir={tmp_path}", f"hydra.run.dir={out}"]
    monkeypatch.setattr(sys, "argv", argv)
    main()  # the console entry point, in this process
    levels = (out / "levels.md").read_text()
    assert "HyperRes" in levels and "dedicated (own level)" in levels
    data = json.loads((out / "comparison.json").read_text())
    assert data["protocol"] == "levels (denoise)" and data["workload"]["tasks"] == 3
    flops = {m["name"]: m["flops"] for m in data["models"]}
    from cirlab.evaluation.restorers import load_restorer

    hyper = load_restorer(str(hyperres))
    cost = hyper.net.flops(720, 1280, levels=3)
    assert flops["HyperRes"] == 3 * cost["main"] + cost["generation"] and cost["generation"] > 0
    assert flops["dedicated25"] == 3 * cost["main"]  # same main network, nothing generated
    means = {m["name"]: m["psnr"] for m in data["models"]}
    per_level = json.loads((out / "levels.json").read_text())["psnr"]
    assert means["HyperRes"] == pytest.approx(sum(per_level["HyperRes"]) / 3)
    assert (out / "comparison.png").is_file() and (out / "levels_psnr.png").is_file()


def test_scalar_hyperres_on_the_27_point_grid_is_refused_before_any_work(tmp_path):
    images = write_images(tmp_path / "images", count=1)
    ckpt = make_checkpoint("hyperres", tmp_path / "h", seed=7)
    cfg = eval_cfg(tmp_path, f"images={images}", f"models={{HR:{ckpt}}}")
    with pytest.raises(ValueError, match=r"HR: a scalar-level HyperRes \(denoise\).*protocol=levels"):
        run_eval(cfg)
    assert not (Path(cfg.paths.output_dir) / "comparison.md").exists()
    assert not (tmp_path / "cache" / "evalsets").exists()  # no evaluation set was generated
    # on its own axis the grid is defined: noise-only task vectors
    axis = eval_cfg(tmp_path, f"images={images}", f"models={{HR:{ckpt}}}", "protocol.grid=[[0,0.3,0],[0,1,0]]",
                    run="axis")
    result = run_eval(axis)
    assert result.comparison.workload["tasks"] == 2 and result.comparison.quality["HR"]["psnr"] > 0


def test_a_task_vector_model_on_the_levels_protocol_is_refused(tmp_path):
    ckpt = make_checkpoint("hyperres_3d", tmp_path / "h", seed=8)
    cfg = eval_cfg(tmp_path, f"images={write_images(tmp_path / 'images', 1)}", "protocol=levels", f"models=[{ckpt}]")
    with pytest.raises(ValueError, match="hyperres_3d checkpoint: use protocol=grid"):
        run_eval(cfg)


def test_unknown_protocol_and_missing_inputs_are_named(tmp_path):
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match=r"protocol/nonsense[\s\S]*Available options[\s\S]*grid"):
        eval_cfg(tmp_path, "protocol=nonsense")
    ckpt = make_checkpoint("cresmd", tmp_path / "c")
    with pytest.raises(ValueError, match="protocol.runner='cirlab.nowhere.run'"):
        run_eval(eval_cfg(tmp_path, f"ckpt_path={ckpt}", "protocol.runner=cirlab.nowhere.run"))
    with pytest.raises(ValueError, match="ckpt_path"):
        model_specs(eval_cfg(tmp_path))
    with pytest.raises(ValueError, match="not both"):
        model_specs(eval_cfg(tmp_path, f"ckpt_path={ckpt}", f"models=[{ckpt}]"))
    with pytest.raises(FileNotFoundError, match="images='.*nowhere'"):
        run_eval(eval_cfg(tmp_path, f"ckpt_path={ckpt}", f"images={tmp_path / 'nowhere'}"))
    with pytest.raises(FileNotFoundError, match="models.*missing.ckpt"):
        run_eval(eval_cfg(tmp_path, f"models={{A:{tmp_path / 'missing.ckpt'}}}"))
    with pytest.raises(ValueError, match="unique"):
        run_eval(eval_cfg(tmp_path, f"models=['A={ckpt}','A={ckpt}']"))


def test_every_kind_scores_on_the_grid_in_one_call(tmp_path):
    images = write_images(tmp_path / "images", count=1, size=(24, 26))
    kinds = ["cresmd", "tsnet_search", "tasnet_search", "tasnet", "tasnet_finetune", "hyperres_3d"]
    specs = [f"'{kind}={make_checkpoint(kind, tmp_path / kind, seed=i)}'" for i, kind in enumerate(kinds)]
    cfg = eval_cfg(tmp_path, f"images={images}", "models=[" + ",".join(specs) + "]", "protocol.grid=single")
    result = run_eval(cfg).comparison
    assert result.models == kinds and result.kinds == dict(zip(kinds, kinds))
    assert all(result.flops[k] > 0 for k in kinds)


def test_a_named_set_from_the_shared_data(tmp_path):
    root = shared_data_path("test")
    ckpt = make_checkpoint("cresmd", tmp_path / "c")
    cfg = eval_cfg(tmp_path, "images=set5", f"paths.data_dir={root}", f"models=[{ckpt}]", "protocol.grid=single",
                   "protocol.max_images=2", "protocol.crop=48")
    result = run_eval(cfg).comparison
    assert "Set5 (2)" in result.notes[0]
    assert torch.isfinite(torch.tensor(result.quality[result.models[0]]["psnr"]))


@pytest.mark.slow
def test_make_compare_recipe_at_a_tiny_scale(tmp_path):
    """The recipe end to end: the pipeline's CResMD and TASNet, the 3-D HyperRes on the same data,
    one grid comparison of the three (3 training steps each, tiny networks)."""
    from cirlab.evaluation.recipe import run_compare

    tiny = ("data.batch_size=4 data.patch_size=32 data.batches_per_epoch=3 data.val_crop=48 trainer.max_steps=3 "
            "callbacks.task_grid_picture.crop=48 logger=csv callbacks.progress_bar.refresh_rate=0")
    paths = [f"paths.root_dir={tmp_path}", f"paths.cache_dir={tmp_path / 'cache'}"]
    pipeline = [*paths, f'pipeline.cresmd.extra="model=cresmd_tiny {tiny}"',
                f'pipeline.search.extra="model=tasnet_search_tiny {tiny}"', f'pipeline.finetune.extra="{tiny}"',
                "pipeline.threads=1"]
    hyperres = [*paths, "model.net.nf=8", "model.net.nb=2", *tiny.split()]
    result = run_compare(tmp_path / "compare", protocols=["grid"], pipeline_overrides=pipeline,
                         hyperres_overrides=hyperres, eval_overrides=[*paths, "data=embedded", "protocol.crop=48",
                                                                      "device=cpu"])
    grid = result["comparisons"]["grid"]
    assert [m["name"] for m in grid["models"]] == ["CResMD", "TASNet", "HyperRes3D"]
    assert [m["kind"] for m in grid["models"]] == ["cresmd", "tasnet_finetune", "hyperres_3d"]
    assert all(m["flops"] > 0 and m["psnr"] > 5 for m in grid["models"])
    summary = Path(result["summary"]).read_text()
    assert "HyperRes3D" in summary and "cirlab.cli.eval" in summary
    again = run_compare(tmp_path / "compare", protocols=["grid"], pipeline_overrides=pipeline,
                        hyperres_overrides=hyperres)  # finished steps are kept: nothing reruns
    assert again["comparisons"] == result["comparisons"]
    with pytest.raises(ValueError, match="nonsense"):
        run_compare(tmp_path / "other", protocols=["nonsense"])


@pytest.mark.parametrize("logger", ["csv", "wandb"])
def test_the_comparison_reaches_the_loggers(tmp_path, logger, monkeypatch):
    from cirlab.utils.wandb import finish_wandb

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    images = write_images(tmp_path / "images", count=1)
    ckpt = make_checkpoint("cresmd", tmp_path / "c")
    cfg = eval_cfg(tmp_path, f"images={images}", f"models={{A:{ckpt}}}", "protocol.grid=single", f"logger={logger}")
    try:
        run_eval(cfg)
    finally:
        finish_wandb()
    out = Path(cfg.paths.output_dir)
    if logger == "csv":
        header = next(out.glob("csv/version_*/metrics.csv")).read_text().splitlines()[0]
        assert "eval/grid/A/psnr" in header and "eval/grid/A/gflops_per_inference" in header
    else:
        run = next(out.glob("wandb/offline-run-*"))
        media = [p.name for p in run.rglob("*") if p.is_file() and "media" in p.parts]
        assert any(name.endswith(".png") for name in media) and any(name.endswith(".table.json") for name in media)
