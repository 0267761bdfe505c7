"""TASNetFinetune through the real config: every TASNet-table experiment runs one tiny step, a
fine-tune run tests on the 27-point grid and leaves a self-contained checkpoint, and a real
search checkpoint derives (TSNet: nothing shared)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cirlab.derivation import derive
from cirlab.tasks import level_grid
from cirlab.training import train
from conftest import compose
from tasnet_testing import NB, NF, search_state

EMBEDDED = ["data.embedded_root=${paths.cache_dir}/embedded", "data.train_dir=${paths.cache_dir}/embedded/train",
            "data.val_dir=${paths.cache_dir}/embedded/heldout", "data.test_dir=${paths.cache_dir}/embedded/heldout"]
TINY_STEP = ["trainer.accelerator=cpu", "trainer.devices=1", "trainer.max_steps=1", "data.batches_per_epoch=1",
             "data.num_workers=0", "data.patch_size=32", "data.batch_size=2", "data.val_max_images=1",
             "data.test_max_images=1", "data.val_crop=32", "data.test_crop=32", "data.val_grid=single",
             "callbacks.task_grid_picture.crop=32", "callbacks.progress_bar.refresh_rate=0", "logger=csv", "test=false", "model.test_iqa=false",
             *EMBEDDED]
FINETUNE_EXPERIMENTS = ["tasnet_finetune_small", "tasnet_finetune_paper", "tasnet_a_paper", "tsnet_finetune_paper"]
NAIVE_EXPERIMENTS = ["cresmd_shared31_paper", "cresmd_shared62_paper", "cresmd_shared99_paper"]
TINY_NET = [f"model.net.nf={NF}", f"model.net.nb={NB}"]


@pytest.fixture(scope="module")
def derived_ckpt(tmp_path_factory) -> Path:
    net = derive(search_state(3, seed=7))
    return net.save(tmp_path_factory.mktemp("derived") / "tasnet.ckpt")


def run_cfg(tmp_path: Path, cache: Path, experiment: str, *overrides: str, run: str = "run"):
    base = [f"paths.root_dir={tmp_path}", f"paths.cache_dir={cache}", f"hydra.run.dir={tmp_path / run}"]
    return compose("train", [*base, f"experiment={experiment}", *TINY_STEP, *overrides])


def test_table_experiments_compose_with_their_settings():
    tasnet = compose("train", ["experiment=tasnet_finetune_paper"])
    assert tasnet.model._target_.endswith("TASNetFinetune") and tasnet.sampling.ground_truth == "relative"
    assert tasnet.trainer.max_steps == 200_000 and tasnet.model.optimizer.lr == 1e-4
    tasnet_a = compose("train", ["experiment=tasnet_a_paper"])
    assert tasnet_a.sampling.ground_truth == "absolute"
    # as many steps after its (absolute-GT) CResMD as TASNet's weights get after theirs: 200k + 200k
    assert tasnet_a.trainer.max_steps == 400_000 and list(tasnet_a.model.scheduler.milestones) == [200_000, 300_000]
    assert compose("train", ["experiment=tsnet_finetune_paper"]).sampling.ground_truth == "relative"
    tsnet = compose("train", ["experiment=tsnet_search_paper"])
    assert tsnet.model.net.sharing is False and tsnet.model._target_.endswith("TASNetSearch")
    assert tsnet.model.lambda2 == 0.0 and tsnet.model.lambda1 == 0.1  # no sharing: R2 has nothing to lengthen
    assert compose("train", ["experiment=tasnet_search_paper"]).model.lambda2 == 0.1
    for experiment, flops in zip(NAIVE_EXPERIMENTS, (132.0, 69.5, 7.0)):  # of CResMD's 189.1 G (Table 4)
        cfg = compose("train", [f"experiment={experiment}"])
        assert cfg.model.net.flops_fraction == pytest.approx(flops / 189.1, abs=1e-4)
        assert cfg.model.net.shared_fraction is None and cfg.sampling.ground_truth == "absolute"
        assert (cfg.model.net.nf, cfg.model.net.nb) == (64, 32) and cfg.trainer.max_steps == 1_000_000


def test_finetune_without_a_derived_checkpoint_says_what_to_do(tmp_path, shared_cache):
    from hydra.utils import instantiate

    cfg = run_cfg(tmp_path, shared_cache, "tasnet_finetune_small")
    with pytest.raises(Exception, match="model.derived_ckpt is required.*cirlab-derive"):
        instantiate(cfg.model)


@pytest.mark.parametrize("experiment", FINETUNE_EXPERIMENTS + NAIVE_EXPERIMENTS + ["tsnet_search_paper"])
def test_every_table_experiment_runs_one_tiny_step(experiment, tmp_path, shared_cache, derived_ckpt):
    if experiment in FINETUNE_EXPERIMENTS:
        extra = [f"model.derived_ckpt={derived_ckpt}"]
    elif experiment in NAIVE_EXPERIMENTS:
        extra = TINY_NET
    else:
        extra = [*TINY_NET, "model.net.controller_hidden=8", "model.workload_grid=single"]
    cfg = run_cfg(tmp_path, shared_cache, experiment, *extra)
    metrics = train(cfg)
    assert metrics["train/l1"] > 0 and metrics["val/psnr"] > 0
    assert (Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt").is_file()
    if experiment in NAIVE_EXPERIMENTS:
        # nb = 2: the maps whose FLOPs fraction is closest to the paper's (nb = 32: 24, 48, 67)
        expected = {"cresmd_shared31_paper": 5, "cresmd_shared62_paper": 6, "cresmd_shared99_paper": 7}[experiment]
        assert metrics["model/shared_maps"] == expected


def test_finetune_run_tests_on_the_grid_and_leaves_a_self_contained_checkpoint(tmp_path, shared_cache, derived_ckpt):
    import shutil

    from cirlab.archs.tasnet import TASNet
    from cirlab.checkpoints import load_module, load_network
    from cirlab.inference import restore

    local = tmp_path / "tasnet.ckpt"
    shutil.copy(derived_ckpt, local)
    start = TASNet.load(local)
    cfg = run_cfg(tmp_path, shared_cache, "tasnet_finetune_small", f"model.derived_ckpt={local}", "trainer.max_steps=3",
                  "data.batches_per_epoch=3", "test=true", "data.val_grid=cresmd27")
    metrics = train(cfg)
    run = Path(cfg.paths.output_dir)
    rows = (run / "test_per_task.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 27 and metrics["test/psnr"] > 0
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["model/gflops_per_inference"] == pytest.approx(start.flops(level_grid("cresmd27"), 720, 1280) / 27 / 1e9)
    assert saved["model/params_trainable"] < saved["model/params_total"]  # controllers frozen
    local.unlink()  # the fine-tuned checkpoint needs neither the derived file nor the search code
    module = load_module(run / "checkpoints" / "last.ckpt")
    assert module.hparams.derived_from == str(local) and module.hparams.derived_ckpt is None
    net = module.net.eval()
    assert net.architecture == start.architecture
    tuned, before = net.state_dict(), start.state_dict()
    assert all(torch.equal(tuned[k], before[k]) for k in before if k.startswith("controllers."))
    assert not all(torch.equal(tuned[k], before[k]) for k in before)
    image, tasks = torch.rand(3, 24, 24), torch.rand(5, 3)
    with torch.no_grad():
        per_task = torch.cat([module(image[None], t[None]) for t in tasks])
    assert torch.allclose(restore(load_network(run / "checkpoints" / "last.ckpt"), image, tasks), per_task, atol=1e-5)


def test_a_real_search_checkpoint_derives(tmp_path, shared_cache):
    from cirlab.archs.tasnet import TASNet
    from cirlab.cli.derive import main

    cfg = run_cfg(tmp_path, shared_cache, "tsnet_search_paper", *TINY_NET, "model.net.controller_hidden=8",
                  "model.workload_grid=single", "trainer.max_steps=2")
    train(cfg)
    out = tmp_path / "derived"
    assert main(["--ckpt", str(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"), "--out", str(out),
                 "--grid", "single", "--no-figure"]) == 0
    net = TASNet.load(out / "tasnet.ckpt")
    assert net.shared_maps == 0 and len(net.controllers) == 2 * NB + 3  # TSNet: every map task-specific
