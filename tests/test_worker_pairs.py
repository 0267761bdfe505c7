"""Training pairs made in the DataLoader workers (``data.pairs_on``): same batches as on the device,
placement resolved from the trainer, bad values named, resumable stream, spawn-safe pair makers."""

from __future__ import annotations

import itertools
import logging
import pickle
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from cirlab.data.datamodule import RestorationDataModule, RestorationPairMaker
from cirlab.data.hyperres import LevelDataModule, LevelPairMaker
from cirlab.data.loading import PairCollate, resolve_pairs_on, stack_crops
from cirlab.data.sampling import PairSampler


@pytest.fixture
def one_thread():
    """The main process at one intra-op thread, as DataLoader workers run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def train_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("worker-pairs") / "train"
    folder.mkdir()
    rng = np.random.default_rng(7)
    for index, (h, w) in enumerate([(90, 110), (120, 80), (70, 70)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"im{index}.png")
    return folder


def restoration(folder, **kwargs) -> RestorationDataModule:
    datamodule = RestorationDataModule(train_dir=str(folder), val_dir=None, patch_size=32, batch_size=6,
                                       batches_per_epoch=50, seed=11, degrade_margin=10,
                                       degradation={"types": ["blur", "noise", "jpeg"]},
                                       sampling={"ground_truth": "relative"}, **kwargs)
    datamodule.setup("fit")
    return datamodule


def levels(folder, task: str, **kwargs) -> LevelDataModule:
    datamodule = LevelDataModule(task=task, levels=[10, 50] if task == "dejpeg" else [2, 3], train_dir=str(folder),
                                 patch_size=24, batch_size=4, batches_per_epoch=50, seed=11, **kwargs)
    datamodule.setup("fit")
    return datamodule


def transferred(datamodule, batch: dict) -> dict:
    """``batch`` through the DataModule's transfer hooks, as Lightning passes it on the CPU."""
    return datamodule.on_after_batch_transfer(datamodule.on_before_batch_transfer(batch, 0), 0)


def training_batches(datamodule, count: int) -> list[dict]:
    """The first ``count`` training batches as the training step sees them (after the transfer hooks)."""
    return [transferred(datamodule, batch) for batch in itertools.islice(datamodule.train_dataloader(), count)]


def assert_same_batches(first: list[dict], second: list[dict]) -> None:
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert list(a) == list(b)  # same keys, same order
        for key in a:
            assert type(a[key]) is type(b[key]) and a[key].dtype == b[key].dtype, key
            assert torch.equal(torch.as_tensor(a[key]), torch.as_tensor(b[key])), key


def test_restoration_pairs_made_in_workers_equal_the_device_pairs(train_folder, one_thread):
    device = restoration(train_folder, num_workers=0, pairs_on="device")
    workers = restoration(train_folder, num_workers=2, pairs_on="workers")
    on_device, in_workers = training_batches(device, 4), training_batches(workers, 4)
    assert (device.pairs_made_on, workers.pairs_made_on) == ("device", "workers")
    assert set(in_workers[0]) == {"input", "target", "task", "levels_in", "levels_gt", "physical_in", "physical_gt",
                                  "id"}
    assert_same_batches(on_device, in_workers)
    # the degradations were drawn: blur, noise and JPEG all occur among the inputs
    physical = torch.cat([b["physical_in"] for b in in_workers])
    assert all(bool((physical[:, i] > 0).any()) for i in range(3))
    # a pair batch passes the transfer hooks unchanged (pairs are made once)
    assert transferred(workers, in_workers[0]) is in_workers[0]


@pytest.mark.parametrize("task", ["dejpeg", "sr"])
def test_level_batches_made_in_workers_equal_the_device_batches(train_folder, one_thread, task):
    device = levels(train_folder, task, num_workers=0, pairs_on="device")
    workers = levels(train_folder, task, num_workers=2, pairs_on="workers")
    assert device.degrade_margin > 0
    on_device, in_workers = training_batches(device, 3), training_batches(workers, 3)
    assert set(in_workers[0]) == {"inputs", "target", "levels", "id"}
    raw = next(iter(workers.train_dataloader()))
    assert list(raw) == ["codes", "id"] and raw["codes"].dtype == np.uint8 and raw["codes"].shape == (3, 4, 3, 24, 24)
    assert in_workers[0]["inputs"].shape == (2, 4, 3, 24, 24)
    assert_same_batches(on_device, in_workers)


def test_workers_without_worker_processes_make_the_pairs_at_fetch_time(train_folder, one_thread):
    device = restoration(train_folder, num_workers=0, pairs_on="device")
    fetched = restoration(train_folder, num_workers=0, pairs_on="workers")
    raw = next(iter(fetched.train_dataloader()))
    assert "clean" not in raw and fetched.pairs_made_on == "workers"
    # what a worker sends is compact: uint8 codes, levels and ids, as numpy arrays pickled through its pipe
    assert list(raw) == ["codes", "levels", "id"] and all(isinstance(v, np.ndarray) for v in raw.values())
    assert raw["codes"].dtype == np.uint8 and raw["codes"].shape == (12, 3, 32, 32) and raw["levels"].shape == (12, 3)
    assert raw["id"].tolist() == list(range(6))
    tensors = fetched.on_before_batch_transfer(raw, 0)
    assert all(isinstance(v, torch.Tensor) for v in tensors.values()) and tensors["codes"].dtype == torch.uint8
    assert_same_batches(training_batches(device, 2), training_batches(fetched, 2))


def test_auto_makes_pairs_in_workers_only_for_a_cpu_trainer_with_workers(train_folder):
    import lightning as L

    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    for cls, build in ((RestorationDataModule, restoration), (LevelDataModule, lambda f, **kw: levels(f, "sr", **kw))):
        with_workers, without = build(train_folder, num_workers=2), build(train_folder, num_workers=0)
        assert with_workers.pairs_on == "auto"
        for datamodule in (with_workers, without):
            datamodule.trainer = trainer
        assert isinstance(with_workers.train_dataloader().collate_fn, PairCollate), cls
        assert not isinstance(without.train_dataloader().collate_fn, PairCollate), cls
        assert (with_workers.pairs_made_on, without.pairs_made_on) == ("workers", "device")
    # the rule itself, for devices this machine may not have
    assert resolve_pairs_on("auto", 2, "cpu") == "workers"
    assert resolve_pairs_on("auto", 0, "cpu") == "device"
    assert resolve_pairs_on("auto", 4, "cuda") == "device"
    assert resolve_pairs_on("workers", 4, "cuda") == "workers"
    assert resolve_pairs_on("device", 4, "cpu") == "device"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (a GPU trainer)")
def test_a_gpu_trainer_keeps_pairs_on_the_device_unless_told(train_folder, caplog):
    import lightning as L

    trainer = L.Trainer(accelerator="gpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    auto, forced = restoration(train_folder, num_workers=2), restoration(train_folder, num_workers=2, pairs_on="workers")
    auto.trainer = forced.trainer = trainer
    auto.train_dataloader()
    assert auto.pairs_made_on == "device"
    with caplog.at_level(logging.INFO, logger="cirlab.data.loading"):
        forced.train_dataloader()
        forced.train_dataloader()
    assert forced.pairs_made_on == "workers"
    assert sum("made on the CPU" in r.getMessage() for r in caplog.records) == 1  # logged once


@pytest.mark.parametrize("bad", ["gpu", "Workers", None, 1])
def test_a_bad_pairs_on_names_its_key(bad):
    with pytest.raises(ValueError, match="data.pairs_on"):
        RestorationDataModule(train_dir=None, val_dir=None, pairs_on=bad)
    with pytest.raises(ValueError, match="data.pairs_on"):
        LevelDataModule(task="sr", pairs_on=bad)


def test_a_resumed_loader_continues_the_pair_stream(train_folder, one_thread):
    straight = training_batches(restoration(train_folder, num_workers=2, pairs_on="workers"), 5)
    datamodule = restoration(train_folder, num_workers=2, pairs_on="workers")
    loader = datamodule.train_dataloader()
    assert loader.state_dict() == {"next_batch": 0}  # no trainer: nothing trained yet
    loader.load_state_dict({"next_batch": 2})
    resumed = [transferred(datamodule, b) for b in itertools.islice(loader, 3)]
    assert_same_batches(straight[2:], resumed)
    assert [int(b["id"][0]) for b in resumed] == [12, 18, 24]  # batch b starts at id b * batch_size


def test_pair_makers_are_small_and_picklable(train_folder, one_thread):
    """Spawned workers receive the collate function by pickling: it carries the pair maker, never the
    DataModule (which holds the trainer)."""
    for datamodule, cls in ((restoration(train_folder, num_workers=1, pairs_on="workers"), RestorationPairMaker),
                            (levels(train_folder, "dejpeg", num_workers=1, pairs_on="workers"), LevelPairMaker)):
        collate = datamodule.train_dataloader().collate_fn
        maker = collate.make_pairs.__self__  # the pair maker's `codes` method
        assert isinstance(maker, cls) and collate.make_pairs == maker.codes
        assert not any(isinstance(v, (RestorationDataModule, LevelDataModule)) for v in vars(maker).values())
        copy = pickle.loads(pickle.dumps(collate))
        samples = [datamodule.train_dataloader().dataset[i] for i in range(datamodule.batch_size)]
        assert_same_batches([collate(samples)], [copy(samples)])


@pytest.mark.slow  # starting a spawned worker imports torch again (about 5 s)
def test_spawned_workers_make_the_same_pairs(train_folder, one_thread):
    device = restoration(train_folder, num_workers=0, pairs_on="device")
    spawned = restoration(train_folder, num_workers=1, pairs_on="workers")
    loader = spawned.train_dataloader()
    loader.multiprocessing_context = "spawn"
    assert_same_batches(training_batches(device, 2),
                        [transferred(spawned, b) for b in itertools.islice(loader, 2)])


@pytest.mark.slow  # three short training runs with worker processes
def test_a_run_resumed_with_pairs_in_workers_trains_as_the_straight_run(train_cfg, tmp_path):
    """Lightning's fit with the pair-making collate: the loader's position in the checkpoint still
    resumes the stream exactly (same weights as an uninterrupted run)."""
    from cirlab.training import train

    common = ["data.num_workers=2", "data.pairs_on=workers", "data.batches_per_epoch=3", "test=false",
              "callbacks.last_checkpoint.every_n_train_steps=2", "callbacks.task_grid_picture=null"]
    train(train_cfg(*common, "trainer.max_steps=5", f"hydra.run.dir={tmp_path / 'straight'}"))
    train(train_cfg(*common, "trainer.max_steps=4", f"hydra.run.dir={tmp_path / 'resumed'}"))
    train(train_cfg(*common, "trainer.max_steps=5", "ckpt_path=last", f"hydra.run.dir={tmp_path / 'resumed'}"))
    a, b = (torch.load(tmp_path / run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
            for run in ("straight", "resumed"))
    assert a["global_step"] == b["global_step"] == 5
    for key, value in a["state_dict"].items():  # same data stream => same weights
        torch.testing.assert_close(b["state_dict"][key], value, rtol=0, atol=1e-6, msg=key)


def test_the_pair_step_never_reads_the_id_tensor_back_from_the_device(train_folder, one_thread):
    """The generator's seed comes from ``first_id``, a host int the loader's collate sets: on a GPU,
    reading ``id[0]`` would wait for every queued kernel. Ids on the meta device (no values: any
    read raises) stand in for device tensors; the pairs equal those made from the plain batch."""
    for datamodule in (restoration(train_folder, num_workers=0, pairs_on="device"),
                       levels(train_folder, "dejpeg", num_workers=0, pairs_on="device")):
        crops = next(iter(datamodule.train_dataloader()))
        assert crops["first_id"] == int(crops["id"][0]) and isinstance(crops["first_id"], int)
        expected = datamodule.on_after_batch_transfer(dict(crops), 0)
        on_meta = dict(crops, id=crops["id"].to("meta"))
        pairs = datamodule.on_after_batch_transfer(on_meta, 0)
        assert pairs["id"].device.type == "meta" and "first_id" not in pairs
        for key, value in expected.items():
            if key != "id":
                assert torch.equal(pairs[key], value), key


def _pairs_and_threads(samples: list[dict]) -> tuple[dict, list[str]]:
    """Collate of a test loader: the pair batch made where it runs and the names of that process's threads."""
    maker = RestorationPairMaker(PairSampler(), seed=3, patch_size=32, margin=10)
    return maker.codes(stack_crops(samples)), [thread.name for thread in threading.enumerate()]


def test_workers_draw_the_noise_without_a_helper_thread(train_folder, one_thread):
    """In the main process the noise field is drawn on a helper thread while the crops blur; a worker draws
    it inline (the workers already keep the cores busy). The pairs are the same either way."""
    from torch.utils.data import DataLoader

    dataset = restoration(train_folder, num_workers=0, pairs_on="device").train_dataloader().dataset
    samples = [dataset[i] for i in range(6)]
    in_main, names = _pairs_and_threads(samples)
    assert bool((in_main["levels"][:, 1] > 0).any())  # some image has noise: a field was drawn
    assert any(name.startswith("cirlab-noise") for name in names), names
    loader = DataLoader([dataset[i] for i in range(6)], batch_size=6, num_workers=1, collate_fn=_pairs_and_threads)
    in_worker, names = next(iter(loader))
    assert not any(name.startswith("cirlab-noise") for name in names), names
    for key in in_main:
        assert torch.equal(torch.as_tensor(in_main[key]), torch.as_tensor(in_worker[key])), key
