"""Issue 15: no run overwrites another, caches keyed by what they hold, and one clear error for a
damaged or foreign checkpoint in every tool. (Values that pass validation but mean something
else: tests/test_config.py, tests/test_restore.py, tests/test_derive.py.)"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import lightning
import pytest
import torch
from PIL import Image

from cirlab.checkpoints import CheckpointError
from cirlab.data.evalsets import EvalCacheError, EvalSetSpec, build_eval_set
from cirlab.utils.run import OWNER_FILE, RunDirBusy, claim_run_dir, new_run_id, resolve_ckpt_path
from conftest import TINY, compose

# ================================================================ 1. no run overwrites another
# cirlab-train with a fixed clock: Hydra's ${now:} reads hydra.core.utils.datetime, so both jobs
# of a test get the same date and time to the second, as jobs started together by a script do.
# The job then waits for a common start moment so that the two really run at the same time.
SAME_SECOND = """
import datetime, os, sys, time
import hydra.core.utils
fixed = datetime.datetime.fromisoformat(os.environ["CIRLAB_TEST_NOW"])
class Clock(datetime.datetime):
    @classmethod
    def now(cls, tz=None):
        return fixed
hydra.core.utils.datetime = Clock
import lightning
class HoldUntil(lightning.pytorch.Callback):  # keeps a job running until the test lets it go
    def __init__(self, path):
        self.path = path
    def on_train_start(self, trainer, module):
        deadline = time.time() + 300
        while not os.path.exists(self.path) and time.time() < deadline:
            time.sleep(0.1)
from cirlab.cli.train import main
time.sleep(max(0.0, float(os.environ["CIRLAB_TEST_START"]) - time.time()))
sys.argv = ["cirlab-train", *sys.argv[1:]]
main()
"""

JOB = [o for o in TINY if not o.startswith(("data.batches_per_epoch", "trainer.max_steps"))] + [
    "data.batches_per_epoch=2", "trainer.max_steps=2", "data.val_max_images=1", "data.val_grid=single",
    "test=false", "callbacks.task_grid_picture=null", "logger=none"]


def start_job(root: Path, cache: Path, *overrides: str, start: float, now: str = "2026-01-02T03:04:05") -> subprocess.Popen:
    env = {**os.environ, "CIRLAB_TEST_NOW": now, "CIRLAB_TEST_START": str(start), "WANDB_MODE": "offline",
           "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-c", SAME_SECOND, f"paths.root_dir={root}", f"paths.cache_dir={cache}",
                             *JOB, *overrides], env=env, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


@contextlib.contextmanager
def live_process():
    """A process of this host that stays alive for the block (an owner other than this process)."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        yield process
    finally:
        process.kill()
        process.wait()


@pytest.mark.slow
def test_two_jobs_started_in_the_same_second_keep_their_own_run_directories(tmp_path, shared_cache):
    start = time.time() + 6  # both have imported torch and cirlab by then
    jobs = [start_job(tmp_path, shared_cache, f"seed={seed}", start=start) for seed in (11, 22)]
    outputs = [job.communicate(timeout=300)[0] for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0], outputs
    runs = sorted((tmp_path / "logs" / "train" / "runs").iterdir())
    # the old name (to the second) is the same for both; the run id makes two folders
    assert len(runs) == 2 and all(re.fullmatch(r"2026-01-02_03-04-05_[0-9a-f]{6}", r.name) for r in runs), runs
    seeds = set()
    for run in runs:
        config = (run / ".hydra" / "config.yaml").read_text()
        seed = int(re.search(r"^seed: (\d+)$", config, re.M).group(1))
        seeds.add(seed)
        # each folder's results are its own job's: the checkpoint carries the seed of the config beside it
        state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        assert state["global_step"] == 2
        assert json.loads((run / "metrics.json").read_text())["train/l1"] > 0
        assert f"seed={seed}" in (run / ".hydra" / "overrides.yaml").read_text().replace("- ", "").replace("'", "")
        assert not (run / OWNER_FILE).exists()  # released at the end
    assert seeds == {11, 22}
    # resume still finds the newest last.ckpt of the task among the suffixed folders
    cfg = compose("train", [f"paths.root_dir={tmp_path}", *JOB, "ckpt_path=last", f"hydra.run.dir={tmp_path / 'next'}"])
    newest = max(runs, key=lambda r: (r / "checkpoints" / "last.ckpt").stat().st_mtime)
    assert resolve_ckpt_path("last", cfg) == str(newest / "checkpoints" / "last.ckpt")


@pytest.mark.slow
def test_a_job_sent_into_a_folder_a_live_job_owns_is_refused_before_hydra_writes_there(tmp_path, shared_cache):
    run_dir, go = tmp_path / "shared-run", tmp_path / "go"
    first = start_job(tmp_path, shared_cache, f"hydra.run.dir={run_dir}", "seed=11", "+callbacks.hold._target_=__main__.HoldUntil",
                      f"+callbacks.hold.path={go}", start=0)
    owner = run_dir / OWNER_FILE
    deadline = time.time() + 120
    while not owner.exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert owner.exists(), first.communicate()[0]
    assert json.loads(owner.read_text())["pid"] == first.pid
    second = start_job(tmp_path, shared_cache, f"hydra.run.dir={run_dir}", "seed=22", start=0)
    second_out = second.communicate(timeout=300)[0]
    go.touch()  # the first job may finish now
    first_out = first.communicate(timeout=300)[0]
    assert second.returncode != 0 and first.returncode == 0, (first_out, second_out)
    assert f"run directory {run_dir} is in use by another job" in second_out and f"pid {first.pid}" in second_out
    # nothing of the refused job reached the folder: its config, log and results are the first job's
    assert "seed: 11" in (run_dir / ".hydra" / "config.yaml").read_text()
    assert "seed=22" not in (run_dir / ".hydra" / "overrides.yaml").read_text()
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    assert not owner.exists()


def hydra_node(config_name: str):
    """Hydra's own node as ``cirlab-train`` composes it (run and sweep folders unresolved)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from cirlab.config import CONFIG_DIR, register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return hydra_compose(config_name=config_name, return_hydra_config=True).hydra


@pytest.mark.parametrize("config_name", ["train", "eval", "pipeline"])
def test_the_run_directory_names_carry_a_run_id_and_multirun_folders_too(config_name):
    first, second = hydra_node(config_name), hydra_node(config_name)
    for node in ("run", "sweep"):
        a, b = str(first[node].dir), str(second[node].dir)
        assert re.search(r"/\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_[0-9a-f]{6}$", a), a
        assert a != b  # two jobs composed in the same second differ
        assert str(first[node].dir) == a  # one job reads one value (cached like ${now:})
    assert first.callbacks.run_dir_claim._target_ == "cirlab.utils.run.RunDirClaim"
    assert len({new_run_id() for _ in range(1000)}) > 990


def test_a_claim_refuses_a_live_owner_and_takes_over_from_an_ended_one(tmp_path):
    folder = tmp_path / "run"
    with live_process() as sleeper:
        folder.mkdir()
        (folder / OWNER_FILE).write_text(json.dumps({"host": os.uname().nodename, "pid": sleeper.pid,
                                                     "started": "then"}))
        with pytest.raises(RunDirBusy, match=f"in use by another job .*pid {sleeper.pid}.*delete .*{OWNER_FILE}"):
            with claim_run_dir(folder):
                pass
    # the owner has ended: the folder is taken over, and released at the end
    with claim_run_dir(folder):
        assert json.loads((folder / OWNER_FILE).read_text())["pid"] == os.getpid()
    # a live process that got the pid of an ended owner is not that owner (start time differs)
    with live_process() as reused:
        (folder / OWNER_FILE).write_text(json.dumps({"host": os.uname().nodename, "pid": reused.pid,
                                                     "pid_start": "1", "started": "long ago"}))
        with claim_run_dir(folder):
            pass
    with claim_run_dir(folder):
        assert json.loads((folder / OWNER_FILE).read_text())["pid"] == os.getpid()
        with claim_run_dir(folder):  # a driver running a job in a folder it owns
            pass
        assert (folder / OWNER_FILE).exists()
    assert not (folder / OWNER_FILE).exists()
    # a job on another host cannot be checked from here: refused, with what to do
    (folder / OWNER_FILE).write_text(json.dumps({"host": "elsewhere.example", "pid": 1, "started": "then"}))
    with pytest.raises(RunDirBusy, match="host elsewhere.example"):
        with claim_run_dir(folder):
            pass


def test_the_hydra_callback_stops_a_job_aimed_at_a_live_jobs_folder(tmp_path):
    from omegaconf import OmegaConf

    from cirlab.utils.run import RunDirClaim

    folder = tmp_path / "run"
    config = OmegaConf.create({"hydra": {"run": {"dir": str(folder)}, "sweep": {"dir": str(tmp_path / "multi")}}})
    holder = RunDirClaim()
    holder.on_run_start(config)  # this process owns it now
    # another live process owns the multirun folder: a SystemExit, which Hydra does not swallow
    with live_process() as sleeper:
        (tmp_path / "multi").mkdir()
        (tmp_path / "multi" / OWNER_FILE).write_text(json.dumps({"host": os.uname().nodename, "pid": sleeper.pid}))
        with pytest.raises(SystemExit, match="in use by another job"):
            RunDirClaim().on_multirun_start(config)
    assert json.loads((folder / OWNER_FILE).read_text())["pid"] == os.getpid()
    import pickle

    copy = pickle.loads(pickle.dumps(holder))  # submitit pickles Hydra's callbacks with each job
    copy.on_run_end(config)  # a copy does not hold the claim: it cannot release it
    assert (folder / OWNER_FILE).exists()
    holder.on_run_end(config)
    assert not (folder / OWNER_FILE).exists()


def test_resuming_last_skips_the_checkpoints_of_jobs_still_running(tmp_path):
    from cirlab.checkpoints import save_torch_file

    runs = tmp_path / "logs" / "train" / "runs"
    older, running = runs / "2026-01-02_03-04-05_aaaaaa", runs / "2026-01-02_03-04-05_bbbbbb"
    for index, run in enumerate((older, running)):
        save_torch_file({**cresmd_checkpoint(), "global_step": index}, run / "checkpoints" / "last.ckpt")
        os.utime(run / "checkpoints" / "last.ckpt", (1000 + index, 1000 + index))  # `running` is the newest
    cfg = compose("train", [f"paths.root_dir={tmp_path}", "model=cresmd_tiny", f"hydra.run.dir={tmp_path / 'next'}"])
    assert resolve_ckpt_path("last", cfg) == str(running / "checkpoints" / "last.ckpt")
    with live_process() as sleeper:
        (running / OWNER_FILE).write_text(json.dumps({"host": os.uname().nodename, "pid": sleeper.pid}))
        assert resolve_ckpt_path("last", cfg) == str(older / "checkpoints" / "last.ckpt")
    assert resolve_ckpt_path("last", cfg) == str(running / "checkpoints" / "last.ckpt")  # it has ended


def test_ranks_other_than_zero_do_not_claim(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    with claim_run_dir(tmp_path / "run"):
        assert not (tmp_path / "run" / OWNER_FILE).exists()


def test_run_training_refuses_a_folder_owned_by_a_live_job(train_cfg, tmp_path):
    from cirlab.training import train

    cfg = train_cfg("debug=fast_dev_run")
    folder = Path(cfg.paths.output_dir)
    folder.mkdir(parents=True)
    with live_process() as sleeper:
        (folder / OWNER_FILE).write_text(json.dumps({"host": os.uname().nodename, "pid": sleeper.pid}))
        with pytest.raises(RunDirBusy, match=str(folder)):
            train(cfg)
        assert sorted(p.name for p in folder.iterdir()) == [OWNER_FILE]  # nothing written


# ================================================================ 2. caches keyed by what they hold
def write_uncompressed(path: Path, seed: int, size=(24, 20)) -> None:
    """A PNG whose byte size depends only on its size (no compression), content from ``seed``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    array = torch.randint(0, 256, (size[0], size[1], 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    Image.fromarray(array.numpy()).save(path, compress_level=0)


def test_two_folders_with_same_names_sizes_and_mtimes_get_their_own_cache(tmp_path, caplog):
    for folder, seed in (("setA", 1), ("setB", 2)):
        for i, name in enumerate(("a.png", "b.png")):
            write_uncompressed(tmp_path / folder / "val" / name, seed * 10 + i)
    for name in ("a.png", "b.png"):
        a, b = tmp_path / "setA" / "val" / name, tmp_path / "setB" / "val" / name
        assert a.stat().st_size == b.stat().st_size and a.read_bytes() != b.read_bytes()
        os.utime(b, ns=(a.stat().st_atime_ns, a.stat().st_mtime_ns))
    cache = tmp_path / "cache"
    first = build_eval_set(EvalSetSpec(folder=str(tmp_path / "setA" / "val"), grid="single"), cache, progress=False)
    second = build_eval_set(EvalSetSpec(folder=str(tmp_path / "setB" / "val"), grid="single"), cache, progress=False)
    fresh = build_eval_set(EvalSetSpec(folder=str(tmp_path / "setB" / "val"), grid="single"), None, progress=False)
    assert len(list(cache.glob("*.pt"))) == 2
    assert not torch.equal(first["clean"][0], second["clean"][0])
    assert all(torch.equal(x, y) for x, y in zip(second["clean"], fresh["clean"]))
    assert all(torch.equal(x, y) for x, y in zip(second["inputs"], fresh["inputs"]))
    # a second run reuses the cache and says so, naming the file and the folder it came from
    with caplog.at_level(logging.INFO, logger="cirlab.data.evalsets"):
        again = build_eval_set(EvalSetSpec(folder=str(tmp_path / "setB" / "val"), grid="single"), cache, progress=False)
    assert all(torch.equal(x, y) for x, y in zip(again["inputs"], fresh["inputs"]))
    reuse = [r.getMessage() for r in caplog.records if "reusing" in r.getMessage()]
    assert len(reuse) == 1 and str(tmp_path / "setB" / "val") in reuse[0] and str(cache) in reuse[0]


def test_hyperres_level_sets_of_two_look_alike_folders_get_their_own_cache(tmp_path):
    from cirlab.data.hyperres import LevelSetSpec, build_level_set

    for folder, seed in (("setA", 1), ("setB", 2)):
        write_uncompressed(tmp_path / folder / "val" / "a.png", seed)
    a, b = tmp_path / "setA" / "val" / "a.png", tmp_path / "setB" / "val" / "a.png"
    os.utime(b, ns=(a.stat().st_atime_ns, a.stat().st_mtime_ns))
    cache = tmp_path / "cache"

    def level_set(folder, cache_dir):
        return build_level_set(LevelSetSpec(folder=str(tmp_path / folder / "val"), task="denoise", levels=[15]),
                               cache_dir, progress=False)

    level_set("setA", cache)
    second = level_set("setB", cache)
    assert len(list(cache.glob("*.pt"))) == 2
    assert torch.equal(second["clean"][0], level_set("setB", None)["clean"][0])
    assert torch.equal(level_set("setB", cache)["inputs"][0], second["inputs"][0])  # reused, same pixels


def test_a_file_changed_in_place_with_its_old_size_and_mtime_is_not_served_from_the_cache(tmp_path):
    image = tmp_path / "val" / "a.png"
    write_uncompressed(image, 1)
    stamp = image.stat()
    spec = EvalSetSpec(folder=str(image.parent), grid="single")
    build_eval_set(spec, tmp_path / "cache", progress=False)
    write_uncompressed(image, 2)
    os.utime(image, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert image.stat().st_size == stamp.st_size
    changed = build_eval_set(spec, tmp_path / "cache", progress=False)
    assert torch.equal(changed["clean"][0], build_eval_set(spec, None, progress=False)["clean"][0])


def test_the_decoded_image_store_is_rebuilt_for_a_file_rewritten_with_its_old_size_and_mtime(tmp_path):
    from cirlab.data.image_cache import DecodedImageCache
    from cirlab.data.image_files import load_image

    image = tmp_path / "train" / "a.png"
    write_uncompressed(image, 1)
    stamp = image.stat()
    first = DecodedImageCache.from_paths([image], store_dir=tmp_path / "store")[0].clone()
    time.sleep(0.05)  # past the file system's timestamp granularity
    write_uncompressed(image, 2)  # in place: same inode, same size
    os.utime(image, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))  # as cp -p or rsync -t leave it
    second = DecodedImageCache.from_paths([image], store_dir=tmp_path / "store")[0]
    assert torch.equal(second, load_image(image)) and not torch.equal(second, first)
    assert len(list((tmp_path / "store").glob("decoded-*.u8"))) == 2


def test_a_damaged_cache_file_is_named_with_what_to_delete(tmp_path):
    image = tmp_path / "val" / "a.png"
    write_uncompressed(image, 1)
    spec = EvalSetSpec(folder=str(image.parent), grid="single")
    build_eval_set(spec, tmp_path / "cache", progress=False)
    (cached,) = (tmp_path / "cache").glob("*.pt")
    cached.write_bytes(cached.read_bytes()[: cached.stat().st_size // 3])
    with pytest.raises(EvalCacheError) as info:
        build_eval_set(spec, tmp_path / "cache", progress=False)
    assert f"rm '{cached}'" in str(info.value) and "weights_only" not in str(info.value)


# ================================================================ 3. damaged or foreign checkpoints
NET = {"_target_": "cirlab.archs.cresmd.CResMDNet", "nf": 8, "nb": 1}
KINDS = ["missing", "empty", "truncated", "random", "tensor", "plain_dict"]


def cresmd_checkpoint() -> dict:
    """What cirlab-train writes for a CResMD: a full Lightning training state."""
    from cirlab.models.cresmd import CResMD

    module = CResMD(net=NET, optimizer={"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-3})
    return {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
            "cirlab_module": "cirlab.models.cresmd.CResMD", "pytorch-lightning_version": lightning.__version__,
            "epoch": 0, "global_step": 0, "optimizer_states": [], "lr_schedulers": [], "loops": {}, "callbacks": {}}


def damaged(kind: str, folder: Path) -> Path:
    path = folder / f"{kind}.ckpt"
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        torch.save(cresmd_checkpoint(), path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "random":
        path.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                       dtype=torch.uint8).numpy().tobytes())
    elif kind == "tensor":
        torch.save(torch.zeros(3, 3), path)
    elif kind == "plain_dict":
        torch.save({"weights": torch.zeros(3)}, path)
    return path


def assert_one_clear_error(message: str, path: Path) -> None:
    assert str(path) in message, message
    for raw in ("weights_only=False", "Traceback", "EOFError:", "KeyError:", "AttributeError:", "Errno"):
        assert raw not in message, message


def expect_error(call, path: Path) -> str:
    """The error of ``call``: cirlab's own (CheckpointError is a ValueError), naming ``path``."""
    with pytest.raises((CheckpointError, ValueError, FileNotFoundError)) as info:
        call()
    assert_one_clear_error(str(info.value), path)
    return str(info.value)


@pytest.fixture
def image_file(tmp_path) -> Path:
    path = tmp_path / "in" / "photo.png"
    write_uncompressed(path, 3, (16, 16))
    return path


@pytest.mark.parametrize("kind", KINDS)
def test_train_resume_names_a_damaged_checkpoint_before_anything_is_built(train_cfg, tmp_path, kind):
    from cirlab.training import train

    path = damaged(kind, tmp_path / "bad")
    cfg = train_cfg(f"ckpt_path={path}")
    expect_error(lambda: train(cfg), path)
    assert not (Path(cfg.paths.output_dir) / "checkpoints").exists()


def test_train_resume_names_a_checkpoint_of_another_kind(train_cfg, tmp_path):
    from cirlab.training import train

    search = {**cresmd_checkpoint(), "cirlab_module": "cirlab.models.tasnet_search.TASNetSearch"}
    torch.save(search, tmp_path / "search.ckpt")
    message = expect_error(lambda: train(train_cfg(f"ckpt_path={tmp_path / 'search.ckpt'}")), tmp_path / "search.ckpt")
    assert "written by cirlab.models.tasnet_search.TASNetSearch" in message and "cirlab.models.cresmd.CResMD" in message
    torch.save({"format": "cirlab.tasnet", "architecture": {}, "state_dict": {}}, tmp_path / "tasnet.ckpt")
    message = expect_error(lambda: train(train_cfg(f"ckpt_path={tmp_path / 'tasnet.ckpt'}")), tmp_path / "tasnet.ckpt")
    assert "standalone TASNet" in message and "model.derived_ckpt" in message
    weights_only = {k: v for k, v in cresmd_checkpoint().items() if k not in ("optimizer_states", "loops")}
    torch.save(weights_only, tmp_path / "weights.ckpt")
    message = expect_error(lambda: train(train_cfg(f"ckpt_path={tmp_path / 'weights.ckpt'}")), tmp_path / "weights.ckpt")
    assert "'optimizer_states', 'loops'" in message


@pytest.mark.parametrize("kind", KINDS)
def test_eval_names_a_damaged_checkpoint(tmp_path, shared_cache, kind):
    from cirlab.evaluation.grid import evaluate

    path = damaged(kind, tmp_path / "bad")
    cfg = compose("eval", [f"ckpt_path={path}", "data=embedded", f"paths.root_dir={tmp_path}",
                           f"paths.cache_dir={shared_cache}", f"hydra.run.dir={tmp_path / 'eval'}"])
    expect_error(lambda: evaluate(cfg), path)


@pytest.mark.parametrize("kind", KINDS + ["cresmd"])
def test_derive_names_a_damaged_or_foreign_checkpoint(tmp_path, capsys, kind):
    from cirlab.cli.derive import main

    if kind == "cresmd":
        path = tmp_path / "cresmd.ckpt"
        torch.save(cresmd_checkpoint(), path)
    else:
        path = damaged(kind, tmp_path / "bad")
    assert main(["--ckpt", str(path), "--out", str(tmp_path / "out"), "--no-figure"]) == 2
    message = capsys.readouterr().err
    assert_one_clear_error(message, path)
    assert message.startswith("cirlab-derive: ") and not (tmp_path / "out").exists()
    if kind == "cresmd":
        assert "not a TASNet search checkpoint" in message and "CResMDNet" in message


@pytest.mark.parametrize("kind", KINDS)
def test_restore_names_a_damaged_checkpoint(tmp_path, capsys, image_file, kind):
    from cirlab.cli.restore import main

    path = damaged(kind, tmp_path / "bad")
    assert main(["--ckpt", str(path), "--image", str(image_file), "--grid", "single", "--out", str(tmp_path / "out"),
                 "--device", "cpu"]) == 2
    message = capsys.readouterr().err
    assert_one_clear_error(message, path)
    assert message.startswith("cirlab-restore: --ckpt=") and not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("model, key", [("tasnet_search_tiny", "model.init_ckpt"),
                                        ("tasnet_finetune_small", "model.derived_ckpt")])
def test_init_and_derived_checkpoints_are_named_when_damaged(train_cfg, tmp_path, kind, model, key):
    from cirlab.training import train

    path = damaged(kind, tmp_path / "bad")
    message = expect_error(lambda: train(train_cfg(f"model={model}", f"{key}={path}")), path)
    assert key in message


@pytest.mark.parametrize("kind", KINDS)
def test_hyperres_eval_names_a_damaged_checkpoint(tmp_path, capsys, image_file, kind):
    from cirlab.cli.hyperres_eval import run

    path = damaged(kind, tmp_path / "bad")
    with pytest.raises(SystemExit) as info:
        run(["--task", "denoise", "--model", f"mine={path}", "--data", str(image_file.parent), "--device", "cpu",
             "--out", str(tmp_path / "out")])
    assert info.value.code == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert_one_clear_error(message, path)
    assert "--model" in message and not (tmp_path / "out").exists()


def test_the_user_of_cirlab_train_sees_one_line_naming_the_file(tmp_path, shared_cache):
    path = damaged("random", tmp_path / "bad")
    result = subprocess.run([sys.executable, "-m", "cirlab.cli.train", f"paths.root_dir={tmp_path}",
                             f"paths.cache_dir={shared_cache}", *TINY, f"ckpt_path={path}"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=300,
                            env={**os.environ, "WANDB_MODE": "offline"})
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()
    error = next(line for line in reversed(last) if "CheckpointError" in line)
    assert f"ckpt_path='{path}': cannot be read" in error and "weights_only=False" not in result.stderr


# ================================================================ 5. images too small or too large to evaluate
def test_an_image_too_small_for_ssim_is_refused_by_name_before_anything_is_generated(tmp_path):
    from cirlab.data.image_files import ImageFolderError

    write_uncompressed(tmp_path / "val" / "fine.png", 1, (12, 12))
    for name, size in (("dot.png", (1, 1)), ("six.png", (6, 6)), ("eleven.png", (11, 11))):
        write_uncompressed(tmp_path / "val" / name, 2, size)
    with pytest.raises(ImageFolderError) as info:
        build_eval_set(EvalSetSpec(folder=str(tmp_path / "val"), grid="single"), tmp_path / "cache", progress=False)
    message = str(info.value)
    # 11x11 is cropped to even sides (10x10) and then no 11x11 SSIM window fits
    for name in ("dot.png", "six.png", "eleven.png"):
        assert str(tmp_path / "val" / name) in message and "SSIM window" in message, message
    assert "fine.png" not in message and "1x1 (HxW)" in message and "6x6 (HxW)" in message
    assert not (tmp_path / "cache").exists()  # nothing was generated or cached
    # the smallest usable image passes
    (tmp_path / "val" / "dot.png").unlink(), (tmp_path / "val" / "six.png").unlink(), (tmp_path / "val" / "eleven.png").unlink()
    assert build_eval_set(EvalSetSpec(folder=str(tmp_path / "val"), grid="single"), None, progress=False)["clean"][0].shape == (3, 12, 12)


def test_an_image_over_the_pixel_limit_is_refused_with_its_size_and_the_limit_unless_cropped(tmp_path):
    from cirlab.data.evalsets import MAX_EVAL_PIXELS
    from cirlab.data.image_files import ImageFolderError

    assert MAX_EVAL_PIXELS == 2048 * 2048
    write_uncompressed(tmp_path / "test" / "big.png", 1, (40, 30))
    spec = EvalSetSpec(folder=str(tmp_path / "test"), grid="cresmd27", max_pixels=1000, config_key="data.test_dir")
    with pytest.raises(ImageFolderError) as info:
        build_eval_set(spec, None, progress=False)
    message = str(info.value)
    assert str(tmp_path / "test" / "big.png") in message and "40x30 (HxW)" in message
    assert "1000 pixels" in message and "27 degraded copies" in message and "data.test_crop" in message
    cropped = build_eval_set(EvalSetSpec(folder=str(tmp_path / "test"), grid="single", max_pixels=1000, crop=24),
                             None, progress=False)
    assert cropped["inputs"][0].shape[1:] == (3, 24, 24)


def test_cirlab_eval_refuses_a_6x6_test_image_before_the_model_runs(tmp_path, monkeypatch):
    from cirlab.data.image_files import ImageFolderError
    from cirlab.evaluation import grid
    from cirlab.evaluation.grid import evaluate

    torch.save(cresmd_checkpoint(), tmp_path / "model.ckpt")
    write_uncompressed(tmp_path / "images" / "tiny.png", 1, (6, 6))
    ran = []
    monkeypatch.setattr(grid, "score_grid", lambda *a, **k: ran.append(1))  # records whether scoring was reached
    cfg = compose("eval", [f"ckpt_path={tmp_path / 'model.ckpt'}", f"data.test_dir={tmp_path / 'images'}",
                           f"paths.root_dir={tmp_path}", f"paths.cache_dir={tmp_path / 'cache'}",
                           f"hydra.run.dir={tmp_path / 'eval'}"])
    with pytest.raises(ImageFolderError) as info:
        evaluate(cfg)
    assert str(tmp_path / "images" / "tiny.png") in str(info.value) and "6x6" in str(info.value)
    assert not ran


# ================================================================ 7. the last log line names the picture
def test_the_last_log_lines_of_a_training_run_name_the_picture_not_the_checkpoint(train_cfg, caplog):
    from fnmatch import fnmatchcase

    from cirlab.models.cresmd import CResMD
    from cirlab.training import train

    cfg = train_cfg("trainer.max_steps=2", "data.batches_per_epoch=2", "data.val_max_images=1",
                    "data.test_max_images=1")
    with caplog.at_level(logging.INFO, logger="cirlab.training"):
        metrics = train(cfg)
    # 8. the metric names the sweep driver checks objectives against cover what a real run returns
    declared = CResMD.logged_metrics()
    assert [k for k in metrics if not any(fnmatchcase(k, p) for p in declared)] == []
    assert {"val/psnr", "test/psnr", "model/params_total", "test_grid/psnr/r0.0_s50_qnone"} <= set(metrics)
    lines = [r.getMessage() for r in caplog.records if "outputs at several task vectors" in r.getMessage()]
    assert len(lines) == 1, lines
    picture = Path(lines[0].split(": ", 1)[1])
    assert picture.suffix == ".png" and picture.parent.name == "pictures" and picture.is_file(), lines[0]


def test_hyperres_level_sets_refuse_images_too_small_for_ssim_before_any_work(tmp_path):
    from cirlab.data.hyperres import LevelSetSpec, build_level_set
    from cirlab.data.image_files import ImageFolderError

    write_uncompressed(tmp_path / "val" / "tiny.png", 1, size=(6, 6))
    write_uncompressed(tmp_path / "val" / "fine.png", 2, size=(32, 32))
    with pytest.raises(ImageFolderError, match="tiny.png.*6x6"):
        build_level_set(LevelSetSpec(folder=str(tmp_path / "val"), task="denoise", levels=[15]), tmp_path / "cache",
                        progress=False)
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").glob("*.pt"))
