"""``cirlab-pipeline`` (``make train``): the real stages end to end at a tiny scale, resuming, and
the checks that fail before any work starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cirlab.pipeline import STAGES, PipelineError, check_pipeline_config, precheck, run_pipeline
from conftest import compose

DEFAULT_STAGES = [s for s in STAGES if s != "baseline"]  # `make train` keeps one baseline

TINY_DATA = ("data.batch_size=4 data.patch_size=32 data.batches_per_epoch=3 data.val_crop=48 trainer.max_steps=3 "
             "callbacks.task_grid_picture.crop=48")


def tiny_overrides(root: Path, cache: Path, run_dir: Path) -> list[str]:
    return [f"paths.root_dir={root}", f"paths.cache_dir={cache}", f"hydra.run.dir={run_dir}",
            'pipeline.train_common="logger=csv callbacks.progress_bar.refresh_rate=0"',
            f'pipeline.cresmd.extra="model=cresmd_tiny {TINY_DATA}"',
            f'pipeline.search.extra="model=tasnet_search_tiny {TINY_DATA} trainer.log_every_n_steps=1"',
            f'pipeline.finetune.extra="{TINY_DATA}"',
            'pipeline.evaluate.extra="data.test_crop=48"',
            'pipeline.evaluate.blind_extra="protocol.crop=48 protocol.strips=1"',
            "pipeline.bench.resolutions=[32x48]", "pipeline.bench.repeats=1", "pipeline.bench.warmup=0",
            "pipeline.bench.threads=[1]", "pipeline.bench.device=cpu", "pipeline.threads=1"]


def pipeline_cfg(overrides: list[str]):
    return compose("pipeline", overrides)


THREADS_BEFORE = torch.get_num_threads()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One whole tiny pipeline (every real stage, 3 training steps each), shared by the tests below."""
    root = tmp_path_factory.mktemp("pipeline")
    cache = root / "cache"
    run_dir = root / "run"
    overrides = tiny_overrides(root, cache, run_dir)
    manifest = run_pipeline(pipeline_cfg(overrides), run_dir)
    return run_dir, overrides, manifest


def test_every_stage_leaves_its_products(tiny_run):
    run_dir, _, manifest = tiny_run
    assert list(manifest["stages"]) == DEFAULT_STAGES
    assert manifest["torch_threads"] == 1 and torch.get_num_threads() == THREADS_BEFORE  # set for the run only
    for name in DEFAULT_STAGES:
        record = json.loads((run_dir / name / "stage.json").read_text())
        assert record["stage"] == name and (run_dir / name / f"{name}.log").is_file()
    products = manifest["products"]
    for key in ("cresmd_ckpt", "search_ckpt", "derived_ckpt", "tasnet_ckpt"):
        assert Path(products[key]).is_file(), key
    assert Path(products["search_ckpt"]).name == "last.ckpt"  # the end of the search, not its best val/psnr
    assert json.loads((run_dir / "pipeline.json").read_text())["products"] == products


def test_stages_are_linked(tiny_run):
    """The search starts from the CResMD stage's checkpoint; fine-tuning from the derived network."""
    from cirlab.archs.tasnet import TASNet
    from cirlab.checkpoints import load_module

    _, _, manifest = tiny_run
    products = manifest["products"]
    search = torch.load(products["search_ckpt"], map_location="cpu", weights_only=True)
    assert search["hyper_parameters"]["init_ckpt"] == products["cresmd_ckpt"]
    tuned = load_module(products["tasnet_ckpt"])
    assert tuned.hparams.derived_from == products["derived_ckpt"]
    assert tuned.net.architecture == TASNet.load(products["derived_ckpt"]).architecture


def test_evaluate_compares_both_models_on_every_task(tiny_run):
    run_dir, _, manifest = tiny_run
    table = (run_dir / "evaluate" / "comparison.md").read_text()
    # the one baseline of `make train` says what it is
    assert "| CResMD: CResMD trained with relative GT (the CResMD TASNet was searched from) |" in table
    assert "| TASNet: TASNet trained with relative GT (searched, derived and fine-tuned) |" in table
    task_rows = [line for line in table.splitlines() if line.startswith("| r=")]
    assert len(task_rows) == 27
    metrics = manifest["stages"]["evaluate"]["products"]["metrics"]
    for name in ("CResMD", "TASNet"):
        scored = json.loads((run_dir / "evaluate" / name.lower() / "metrics.json").read_text())
        assert scored["test/psnr"] == pytest.approx(metrics[name]["test/psnr"])
        assert scored["ckpt_path"] == manifest["products"]["cresmd_ckpt" if name == "CResMD" else "tasnet_ckpt"]


def test_evaluate_adds_the_blind_studies_of_both_models(tiny_run):
    run_dir, _, manifest = tiny_run
    table = (run_dir / "evaluate" / "comparison.md").read_text()
    blind = manifest["stages"]["evaluate"]["products"]["blind"]
    assert list(blind) == ["blind_artifacts", "blind_modulation", "blind_oversmoothing"]
    for protocol, quality in blind.items():
        assert f"### {protocol}" in table
        assert set(quality) == {"CResMD", "TASNet"}
        # the summary equals what the study itself wrote in its own folder
        written = json.loads((run_dir / "evaluate" / protocol / "comparison.json").read_text())
        assert quality == {m["name"]: {k: m[k] for k in written["metrics"]} for m in written["models"]}
        assert (run_dir / "evaluate" / protocol / f"{protocol}.png").is_file()


def test_the_search_decides_over_a_declared_task_set(tiny_run):
    run_dir, _, manifest = tiny_run
    arch = json.loads((run_dir / "derive" / "architecture.json").read_text())
    # the 27-point grid and 256 task vectors of the training distribution (conf/model/tasnet_search.yaml)
    assert arch["decision"]["rule"] == "declared" and arch["decision"]["tasks"] == 27 + 256
    assert arch["decision"]["shared_maps"] == manifest["stages"]["derive"]["products"]["summary"]["shared_maps"]
    assert set(arch["decision"]["agreement"]) == {m["name"] for m in arch["maps"]}
    logged = (next((run_dir / "search" / "csv").glob("version_*")) / "metrics.csv").read_text().splitlines()[0]
    assert "agreement/conv_first" in logged and "agreement/HRconv" in logged  # how close each map sits to gamma


def test_a_baseline_cresmd_joins_the_comparison_with_its_ground_truth(tiny_run):
    """At paper scale TASNet is compared with the absolute-GT CResMD too (stage `baseline`)."""
    run_dir, overrides, manifest = tiny_run
    products = manifest["products"]
    again = run_dir.parent / "with_baseline"
    run_pipeline(pipeline_cfg([*[o for o in overrides if not o.startswith("hydra.run.dir")],
                               f"hydra.run.dir={again}", "pipeline.stages=[baseline,evaluate]",
                               f'pipeline.baseline.extra="model=cresmd_tiny {TINY_DATA}"',
                               f"pipeline.inputs.cresmd_ckpt={products['cresmd_ckpt']}",
                               f"pipeline.inputs.tasnet_ckpt={products['tasnet_ckpt']}"]), again)
    table = (again / "evaluate" / "comparison.md").read_text()
    assert "| CResMD-baseline: CResMD trained with absolute GT (baseline) |" in table
    assert "| CResMD: CResMD trained with relative GT (the CResMD TASNet was searched from) |" in table
    assert "PSNR TASNet - CResMD |" in table and "PSNR TASNet - CResMD-baseline |" in table
    assert len([line for line in table.splitlines() if line.startswith("| r=")]) == 27


def test_bench_measures_tasnet_against_cresmd(tiny_run):
    run_dir, _, manifest = tiny_run
    record = json.loads((run_dir / "bench" / "cost.json").read_text())
    assert {"CResMD", "TASNet"} <= set(record["results"])
    tasnet = record["results"]["TASNet"]["32x48"]
    assert tasnet["flops"]["total"] <= record["results"]["CResMD"]["32x48"]["flops"]["total"]
    assert tasnet["latency"]["cpu-1t"]["total_s"]["median"] > 0
    assert (run_dir / "bench" / "flops_per_task.png").stat().st_size > 0
    assert manifest["stages"]["bench"]["products"]["tasnet_vs_cresmd"]["32x48"]["flops_ratio"] >= 1.0


def test_a_second_start_keeps_finished_stages(tiny_run, caplog):
    run_dir, overrides, manifest = tiny_run
    before = {name: (run_dir / name / "stage.json").stat().st_mtime_ns for name in DEFAULT_STAGES}
    with caplog.at_level("INFO", logger="cirlab.pipeline"):
        again = run_pipeline(pipeline_cfg(overrides), run_dir)
    assert {name: (run_dir / name / "stage.json").stat().st_mtime_ns for name in DEFAULT_STAGES} == before
    assert again["products"] == manifest["products"]
    assert sum("already done" in r.getMessage() for r in caplog.records) == len(DEFAULT_STAGES)
    summary = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("pipeline finished"))
    assert str(run_dir / "bench" / "cost.md") in summary and str(run_dir / "derive" / "tasnet.ckpt") in summary
    entry = again["stages"]["bench"]["products"]["tasnet_vs_cresmd"]["32x48"]
    label, speedup = next(iter(entry["speedup"].items()))
    assert f"{label} {speedup:.2f}x (efficiency {speedup / entry['flops_ratio']:.2f})" in summary


def test_a_finished_stage_with_other_overrides_is_an_error(tiny_run):
    run_dir, overrides, _ = tiny_run
    changed = [*overrides, f'pipeline.search.extra="model=tasnet_search_tiny {TINY_DATA} model.lambda1=0.5"']
    with pytest.raises(PipelineError, match="stage search finished with other overrides"):
        run_pipeline(pipeline_cfg(changed), run_dir)


def test_an_unfinished_training_stage_resumes_from_its_last_checkpoint(tiny_run, caplog):
    run_dir, overrides, manifest = tiny_run
    (run_dir / "finetune" / "stage.json").unlink()
    with caplog.at_level("INFO", logger="cirlab.pipeline"):
        again = run_pipeline(pipeline_cfg(overrides), run_dir)
    messages = [r.getMessage() for r in caplog.records]
    assert any(m == f"stage finetune: resuming from {run_dir / 'finetune' / 'checkpoints' / 'last.ckpt'}" for m in messages)
    assert (run_dir / "finetune" / "stage.json").is_file()
    assert again["products"]["derived_ckpt"] == manifest["products"]["derived_ckpt"]


# --------------------------------------------------------------------------- fails before work
def test_a_typo_in_a_late_stage_fails_before_the_first_stage_runs(tmp_path, shared_cache):
    overrides = tiny_overrides(tmp_path, shared_cache, tmp_path / "run")
    overrides.append(f'pipeline.finetune.extra="{TINY_DATA} model.learning_rat=1"')
    with pytest.raises(PipelineError, match="pipeline stage finetune.*learning_rat"):
        run_pipeline(pipeline_cfg(overrides), tmp_path / "run")
    assert not (tmp_path / "run" / "cresmd" / "checkpoints").exists()


def test_a_stage_built_for_another_model_is_an_error(tmp_path, shared_cache):
    overrides = tiny_overrides(tmp_path, shared_cache, tmp_path / "run")
    overrides += ['pipeline.search.overrides="model=cresmd_tiny test=false"', 'pipeline.search.extra=""']
    with pytest.raises(PipelineError, match="pipeline.search: .*needs a TASNetSearch"):
        run_pipeline(pipeline_cfg(overrides), tmp_path / "run")


@pytest.mark.parametrize(("override", "message"), [
    ("pipeline.stages=[cresmd,serch]", r"unknown stage\(s\) \['serch'\]"),
    ("pipeline.stages=[search,cresmd]", "stages run in the order"),
    ("pipeline.stages=[derive]", "stage 'derive' needs search_ckpt"),
    ("pipeline.inputs.cresmd_ckpt=/nonexistent/c.ckpt", r"pipeline.inputs.cresmd_ckpt='/nonexistent/c.ckpt': no such file"),
    ("pipeline.cresmd.checkpoint=first", "pipeline.cresmd.checkpoint='first': best or last"),
    (f"pipeline.inputs.cresmd_ckpt={Path(__file__).resolve()}", "cresmd_ckpt is set but stage 'cresmd' would make it"),
    ("pipeline.cresmd.extra=3", "pipeline.cresmd.extra must be a list of Hydra overrides"),
    ("pipeline.threads=0", "pipeline.threads=0: a positive number of torch threads"),
    ("pipeline.stages=[baseline,derive]", "stage 'derive' needs search_ckpt"),
])
def test_bad_pipeline_settings_name_the_key(override, message):
    with pytest.raises(PipelineError, match=message):
        check_pipeline_config(pipeline_cfg([override]))


def test_stages_can_start_from_given_products(tmp_path):
    checkpoint = tmp_path / "given.ckpt"
    checkpoint.write_bytes(b"")
    spec = check_pipeline_config(pipeline_cfg(["pipeline.stages=[search,derive]", f"pipeline.inputs.cresmd_ckpt={checkpoint}"]))
    assert spec["stages"] == ["search", "derive"]


def test_single_job_and_pipeline_experiments_are_not_mixed(train_cfg):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="Could not override 'data'"):
        pipeline_cfg(["experiment=cresmd_paper"])  # Hydra itself refuses its group overrides
    with pytest.raises(PipelineError, match="trainer: not pipeline settings.*runs with cirlab-train"):
        check_pipeline_config(pipeline_cfg(["+trainer.max_steps=5"]))
    from cirlab.training import train

    with pytest.raises(ValueError, match="run it with cirlab-pipeline"):
        train(train_cfg("experiment=tasnet_paper"))


def test_the_paper_pipeline_composes_every_stage_with_its_recipe(tmp_path):
    from cirlab.config import compose_job

    cfg = pipeline_cfg(["experiment=tasnet_paper"])
    spec = check_pipeline_config(cfg)
    precheck(spec, int(cfg.seed), tmp_path)  # every stage's config composes and validates
    from cirlab.pipeline import _eval_overrides, _train_overrides

    cresmd = compose_job("train", _train_overrides(spec, "cresmd", 1, []), tmp_path)
    assert cresmd.model.net.nf == 64 and cresmd.model.net.nb == 32 and cresmd.trainer.max_steps == 1_000_000
    assert cresmd.sampling.ground_truth == "relative" and cresmd.trainer.accelerator == "gpu"
    # TASNet is compared with the relative-GT CResMD it was searched from and the absolute-GT
    # CResMD of the paper's Tables 2 and 4
    assert "baseline" in spec["stages"]
    baseline = compose_job("train", _train_overrides(spec, "baseline", 1, []), tmp_path)
    assert baseline.sampling.ground_truth == "absolute" and baseline.trainer.max_steps == 1_000_000
    assert baseline.model.net.nb == 32 and baseline.model._target_.endswith(".CResMD")
    search = compose_job("train", _train_overrides(spec, "search", 1, []), tmp_path)
    assert search.model._target_.endswith("TASNetSearch") and search.model.net.nb == 32
    finetune = compose_job("train", _train_overrides(spec, "finetune", 1, []), tmp_path)
    assert finetune.model._target_.endswith("TASNetFinetune") and finetune.trainer.max_steps == 200_000
    evaluation = compose_job("eval", _eval_overrides(spec, 1, "x.ckpt"), tmp_path)
    assert evaluation.iqa and Path(evaluation.data.test_dir).name == "CBSD68"
    assert spec["bench"]["resolutions"] == ["hd", "2k", "4k"]


def test_stage_runs_share_one_wandb_group(tmp_path, shared_cache):
    """With the W&B logger (offline here), each training stage is a run named after the stage,
    in one group per pipeline run directory."""
    run_dir = tmp_path / "run7"
    overrides = [*tiny_overrides(tmp_path, shared_cache, run_dir), "pipeline.stages=[cresmd]",
                 'pipeline.train_common="logger=wandb callbacks.progress_bar.refresh_rate=0"']
    run_pipeline(pipeline_cfg(overrides), run_dir)
    runs = list((run_dir / "cresmd" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    record = runs[0].read_bytes()
    assert b"pipeline-run7" in record and b"cresmd" in record
