"""Every training module under 2-process DDP on CPU (gloo, ``trainer=ddp_sim``): CResMD,
TASNetSearch, TASNetFinetune, HyperRes and HyperRes3D each train a few steps on two ranks, and the
validation PSNR the two ranks report equals a one-process validation of the same checkpoint on the
same data (the DataModules shard evaluation sets without padding, so every image is scored once).
The TASNet search takes one sharing decision for all ranks: both ranks record z^a, eta and phi
after every step and end with the same state."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from cirlab.data.image_cache import decoded_cache_key
from cirlab.data.image_files import list_images
from cirlab.training import train
from conftest import compose

pytestmark = pytest.mark.slow

EMBEDDED = ["data.embedded_root=${paths.cache_dir}/embedded", "data.train_dir=${paths.cache_dir}/embedded/train",
            "data.val_dir=${paths.cache_dir}/embedded/heldout", "data.test_dir=${paths.cache_dir}/embedded/heldout"]
# two ranks, two steps, one validation at the end; no pictures, no test stage unless asked.
# logger=none: Lightning's CSVLogger cannot be reused from fit to test under ddp_spawn (its header
# is rebuilt in the spawned workers); W&B and real `ddp` are unaffected.
DDP = ["trainer=ddp_sim", "trainer.max_steps=2", "data.batches_per_epoch=2", "logger=none", "test=false",
       "data.num_workers=0", "data.batch_size=2", "data.patch_size=32", "data.val_max_images=3",
       "callbacks.progress_bar.refresh_rate=0", "callbacks.task_grid_picture=null", *EMBEDDED]
GRID = ["data.val_crop=32", "data.test_crop=32", "data.val_grid=[[0,0,0],[0.5,0.5,0.5],[1,0,0.3]]"]


class RecordDecisions(L.Callback):
    """Test helper: each rank saves the search's decision after every training step, and its final
    network state, to ``<folder>/rank<k>.pt``."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.steps: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        net = pl_module.net
        self.steps.append({name: getattr(net, name).detach().clone() for name in ("z_agnostic", "eta", "phi", "agreement")})

    def on_train_end(self, trainer, pl_module) -> None:
        state = {key: value.detach().clone() for key, value in pl_module.net.state_dict().items()}
        torch.save({"steps": self.steps, "state": state}, Path(self.folder) / f"rank{trainer.global_rank}.pt")


def run(tmp_path: Path, cache: Path, *overrides: str):
    base = [f"paths.root_dir={tmp_path}", f"paths.cache_dir={cache}", f"hydra.run.dir={tmp_path / 'run'}"]
    cfg = compose("train", [*base, *DDP, *overrides])
    return cfg, train(cfg)


def validate_in_one_process(cfg) -> dict:
    """``trainer.validate`` of the run's last checkpoint on one CPU process, on the run's data config."""
    import hydra

    from cirlab.checkpoints import load_module

    module = load_module(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt")
    # default_root_dir: the search writes its architecture under it (the working directory otherwise)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, use_distributed_sampler=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=Path(cfg.paths.output_dir) / "one_process")
    return trainer.validate(module, datamodule=hydra.utils.instantiate(cfg.data), verbose=False)[0]


def assert_validation_equals_one_process(cfg, metrics: dict) -> None:
    single = validate_in_one_process(cfg)
    assert metrics["val/psnr"] == pytest.approx(single["val/psnr"], abs=1e-4), (metrics["val/psnr"], single["val/psnr"])
    assert metrics["val/ssim"] == pytest.approx(single["val/ssim"], abs=1e-5)


def test_cresmd_trains_validates_and_tests_under_gloo(tmp_path, shared_cache):
    cfg, metrics = run(tmp_path, shared_cache, "model=cresmd_tiny", "test=true", *GRID)
    assert metrics["train/l1"] > 0 and "test/psnr" in metrics
    assert (Path(cfg.paths.output_dir) / "test_per_task.csv").is_file()  # written by rank 0
    # the ranks trained from the node's one decoded copy of the training images
    train_images = list_images(Path(shared_cache) / "embedded" / "train")
    assert (Path(shared_cache) / "decoded" / f"decoded-{decoded_cache_key(train_images, 'strict')}.u8").is_file()
    assert_validation_equals_one_process(cfg, metrics)


def test_tasnet_search_takes_one_sharing_decision_on_every_rank(tmp_path, shared_cache):
    """With ``decision=batch`` each rank's own batch would give it its own z^a, eta and phi (init_bias
    0 starts each channel's gate near its threshold); summed over ranks, the decision is one. (The
    declared rule sums the same statistics over the declared set; the ranks agree on it even
    unsummed, so this test would not tell.)"""
    record = tmp_path / "ranks"
    record.mkdir()
    cfg, metrics = run(tmp_path, shared_cache, "model=tasnet_search_tiny", *GRID, "model.workload_grid=single",
                       "model.net.decision=batch", "model.net.init_bias=0.0", "model.net.ema_momentum=0.5",
                       "model.decision_samples=16", "model.controller_lr=0.1", "trainer.max_steps=3",
                       "data.batches_per_epoch=3", f"+callbacks.record_decisions._target_={__name__}.RecordDecisions",
                       f"+callbacks.record_decisions.folder={record}")
    ranks = [torch.load(record / f"rank{k}.pt", weights_only=True) for k in (0, 1)]
    assert len(ranks[0]["steps"]) == len(ranks[1]["steps"]) == 3
    for step, (a, b) in enumerate(zip(ranks[0]["steps"], ranks[1]["steps"])):
        for name in a:
            assert torch.equal(a[name], b[name]), f"step {step}: {name} differs between the ranks"
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key]), key
    phi = ranks[0]["state"]["phi"]
    assert metrics["search/shared_maps"] == int(phi.sum())
    assert_validation_equals_one_process(cfg, metrics)


def test_tasnet_finetune_under_gloo(tmp_path, shared_cache):
    from cirlab.derivation import derive
    from tasnet_testing import search_state

    derived = derive(search_state(3, seed=7)).save(tmp_path / "tasnet.ckpt")
    cfg, metrics = run(tmp_path, shared_cache, "experiment=tasnet_finetune_small", f"model.derived_ckpt={derived}", *GRID)
    assert metrics["train/l1"] > 0 and metrics["model/shared_maps"] == 3
    assert_validation_equals_one_process(cfg, metrics)


@pytest.mark.parametrize("experiment", ["hyperres_denoise", "hyperres_3d"])
def test_hyperres_under_gloo(tmp_path, shared_cache, experiment):
    size = ["data.val_crop=48", "data.test_crop=48", "data.val_grid=[[0,0,0],[0.5,0.5,0.5],[1,0,0.3]]"] \
        if experiment == "hyperres_3d" else ["data.val_crop=40", "data.test_crop=40", "callbacks.level_picture=null"]
    cfg, metrics = run(tmp_path, shared_cache, f"experiment={experiment}", "model.net.nf=8", "model.net.nb=1", *size)
    assert metrics["train/l1"] > 0
    assert_validation_equals_one_process(cfg, metrics)
