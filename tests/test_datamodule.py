"""The DataModule and its loading: keyed crops, per-rank streams, pairs on the batch's device, cached eval sets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cirlab.data.datamodule import RestorationDataModule
from cirlab.data.evalsets import EvalSetSpec, build_eval_set
from cirlab.data.loading import SEED_STRIDE, CropDataset, ShardSampler, SteppedBatchSampler, mix_seed
from cirlab.data.sampling import DegradationConfig, SamplingConfig
from cirlab.tasks import grid_labels, level_grid


def write_images(folder, sizes, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index, (h, w) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"im{index}.png")
    return folder


def test_cresmd27_grid_is_the_papers_grid():
    levels = level_grid("cresmd27")
    assert levels.shape == (27, 3)
    labels = grid_labels(levels)
    assert labels[0] == "r0.0_s0_qnone" and labels[-1] == "r4.0_s50_q10"
    assert {label.split("_")[1] for label in labels} == {"s0", "s15", "s50"}
    assert {label.split("_")[2] for label in labels} == {"qnone", "q80", "q10"}
    assert len(level_grid("single")) == 7


def test_crop_dataset_is_a_function_of_the_sample_id():
    images = [torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8), torch.randint(0, 256, (3, 64, 33), dtype=torch.uint8)]
    dataset = CropDataset(images, patch_size=16, seed=3)
    assert torch.equal(dataset[12345]["clean"], dataset[12345]["clean"])
    crops = {bytes(dataset[i]["clean"].numpy()) for i in range(50)}
    assert len(crops) > 45  # different ids give different crops
    assert all(dataset[i]["clean"].shape == (3, 16, 16) for i in range(20))


def test_ranks_draw_disjoint_samples_and_resume_continues_the_stream():
    def ids(rank, world, start, repeat=None):
        sampler = SteppedBatchSampler(4, 5, rank, world, lambda: start, repeat=repeat)
        return [i for batch in sampler for i in batch]

    rank0, rank1 = ids(0, 2, 0), ids(1, 2, 0)
    assert len(rank0) == len(rank1) == 20 and not set(rank0) & set(rank1)
    assert ids(0, 1, 0)[12:] == ids(0, 1, 3)  # starting at batch 3 continues the same sequence
    assert ids(0, 1, 7) == ids(0, 1, 0)[:0] + list(range(28, 40))  # next epoch's part
    assert ids(0, 1, 0, repeat=2)[8:16] == ids(0, 1, 0)[:8]  # overfit mode cycles


def test_shards_cover_every_image_once():
    shards = [list(ShardSampler(7, rank, 3)) for rank in range(3)]
    assert sorted(sum(shards, [])) == list(range(7))


def test_seed_mixing():
    assert SEED_STRIDE == 1_000_003
    assert mix_seed(2, torch.tensor(5)) == 2 * 1_000_003 + 5


def test_training_batches_become_deterministic_pairs(tmp_path):
    folder = write_images(tmp_path / "train", [(80, 96), (70, 70)])
    datamodule = RestorationDataModule(train_dir=str(folder), val_dir=None, patch_size=32, batch_size=6,
                                       batches_per_epoch=4, num_workers=0, seed=5)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    first = datamodule.on_after_batch_transfer(dict(batch), 0)
    again = datamodule.on_after_batch_transfer(dict(batch), 0)
    assert set(first) >= {"input", "target", "task", "physical_in", "physical_gt", "levels_in", "levels_gt"}
    assert first["input"].shape == first["target"].shape == (6, 3, 32, 32)
    assert torch.equal(first["input"], again["input"]) and torch.equal(first["task"], again["task"])
    assert torch.allclose(first["task"], first["levels_in"] - first["levels_gt"])
    assert (first["levels_gt"] <= first["levels_in"] + 1e-6).all()


def test_bad_datamodule_settings_name_their_key():
    with pytest.raises(ValueError, match="data.patch_size"):
        RestorationDataModule(train_dir=None, val_dir=None, patch_size=33)
    with pytest.raises(ValueError, match="data.batch_size"):
        RestorationDataModule(train_dir=None, val_dir=None, batch_size=0)
    with pytest.raises(ValueError, match="data.on_bad"):
        RestorationDataModule(train_dir=None, val_dir=None, on_bad="ignore")
    with pytest.raises(ValueError, match="p_binary"):
        RestorationDataModule(train_dir=None, val_dir=None, sampling={"p_binary": 2.0})
    with pytest.raises(ValueError, match="sampling"):
        RestorationDataModule(train_dir=None, val_dir=None, sampling={"p_binnary": 0.5})
    with pytest.raises(ValueError, match="degradation must be a DegradationConfig"):
        RestorationDataModule(train_dir=None, val_dir=None, degradation=["noise"])


def test_typed_settings_from_mappings_instances_and_the_hydra_config(train_cfg):
    from hydra.utils import instantiate

    noise = DegradationConfig(types=["noise"])
    datamodule = RestorationDataModule(train_dir=None, val_dir=None, degradation=noise, sampling={"p_binary": 0.0})
    assert datamodule.degradation is noise and datamodule.sampling == SamplingConfig(p_binary=0.0)
    assert RestorationDataModule(train_dir=None, val_dir=None).sampling == SamplingConfig()
    # the data config converts the typed groups to their dataclasses (_convert_: object)
    cfg = train_cfg("degradation=noise_only", "sampling=absolute", "data.train_dir=null", "data.val_dir=null",
                    "data.test_dir=null", "data.embedded_root=null")
    datamodule = instantiate(cfg.data)
    assert datamodule.degradation == DegradationConfig(types=["noise"])
    assert type(datamodule.sampling) is SamplingConfig and datamodule.sampling.ground_truth == "absolute"


def test_eval_set_is_deterministic_cached_and_even_sized(tmp_path):
    folder = write_images(tmp_path / "val", [(41, 50), (32, 33)])
    spec = EvalSetSpec(folder=str(folder), grid="cresmd27", seed=1)
    first = build_eval_set(spec, tmp_path / "cache", progress=False)
    cached = list((tmp_path / "cache").glob("*.pt"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    second = build_eval_set(spec, tmp_path / "cache", progress=False)
    assert cached[0].stat().st_mtime_ns == stamp  # reused, not regenerated
    fresh = build_eval_set(spec, None, progress=False)  # same inputs without any cache
    for a, b, c in zip(first["inputs"], second["inputs"], fresh["inputs"]):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert [tuple(x.shape[-2:]) for x in first["clean"]] == [(40, 50), (32, 32)]
    assert first["inputs"][0].shape == (27, 3, 40, 50)
    assert torch.equal(first["inputs"][0][0], first["clean"][0])  # grid point 0 is the clean image
    build_eval_set(EvalSetSpec(folder=str(folder), grid="cresmd27", seed=1, crop=16), tmp_path / "cache", progress=False)
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2  # another setting, another file
