"""Cluster launching: `hydra/launcher=slurm` composed and turned into the sbatch script submitit
would submit, Lightning's SLURM environment placing every rank, the resume of a requeued job,
and a real 2-job multirun through submitit's local mode."""

from __future__ import annotations

import os
import pickle
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import hydra
import pytest
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment

from cirlab.training import requeued_checkpoint
from conftest import TINY, compose

SLURM_OVERRIDES = [
    "hydra/launcher=slurm", "trainer=slurm", "hydra.launcher.nodes=2", "hydra.launcher.gpus_per_node=4",
    "hydra.launcher.partition=gpu", "hydra.launcher.account=proj42", "hydra.launcher.qos=high",
    "hydra.launcher.mem_gb=64", "hydra.launcher.timeout_min=720", "hydra.launcher.constraint=h100",
    "hydra.launcher.setup=[\"module load cuda\"]", "+hydra.launcher.additional_parameters.mail-type=END",
]
# what SLURM sets for rank 5 of a job of 2 nodes x 4 tasks (node1 runs ranks 0-3, node2 ranks 4-7)
SLURM_RANK5 = {"SLURM_NTASKS": "8", "SLURM_NTASKS_PER_NODE": "4", "SLURM_NNODES": "2", "SLURM_PROCID": "5",
               "SLURM_LOCALID": "1", "SLURM_NODEID": "1", "SLURM_JOB_NAME": "cirlab", "SLURM_NODELIST": "node[1-2]",
               "SLURM_JOB_ID": "4242"}


def test_slurm_launcher_composes_and_the_trainer_follows_its_nodes_and_tasks():
    cfg = compose("train", SLURM_OVERRIDES)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.nodes, launcher.gpus_per_node, launcher.tasks_per_node) == (2, 4, 4)  # a task per GPU
    assert (cfg.trainer.num_nodes, cfg.trainer.devices) == (2, 4)
    assert launcher.additional_parameters.signal == "USR1@90"
    # nothing but the launcher decides: one override moves launcher and trainer together
    cfg = compose("train", [*SLURM_OVERRIDES, "hydra.launcher.nodes=3"])
    assert cfg.trainer.num_nodes == 3


def _documented_grid_command() -> list[str]:
    """The overrides of the worked example in docs/cluster.md (the block after its marker)."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "cluster.md").read_text()
    block = text.split("<!-- cluster-grid:", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    words = shlex.split(block.replace("\\\n", " "))
    assert words[:2] == ["cirlab-train", "-m"], words[:3]
    return words[2:]


def test_the_cluster_grid_of_docs_composes_into_12_one_gpu_slurm_jobs():
    from hydra.types import RunMode

    cfg = compose("train", _documented_grid_command())
    assert cfg.hydra.mode == RunMode.MULTIRUN
    params = cfg.hydra.sweeper.params
    assert [len(str(params[key]).split(",")) for key in ("model.lambda1", "model.lambda2", "model.net.gamma")] == [3, 2, 2]
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher") and cfg.hydra.launcher.partition == "gpu"
    assert (cfg.trainer.accelerator, cfg.trainer.devices, cfg.trainer.num_nodes) == ("gpu", 1, 1)
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.max_steps == 200_000  # trainer=gpu's, the recipe's
    assert cfg.hydra.launcher.setup[0].startswith("source ")


@pytest.mark.parametrize("launcher", ["local", "submitit_local"])
def test_local_launchers_compose(launcher):
    cfg = compose("train", [f"hydra/launcher={launcher}"])
    assert cfg.hydra.launcher._target_.endswith("LocalLauncher")


class _Submitted(Exception):
    """Stops submitit where it would run sbatch, carrying the script it wrote."""


def test_sbatch_script_of_a_slurm_multirun(tmp_path, monkeypatch):
    """The real plugin path (launcher instantiated from the config, its launch() building the
    submitit executor and pickling an array of 2 jobs) up to the call of sbatch. This machine has
    no SLURM: the executor's check for `srun` is told yes, and the sbatch call is where it stops."""
    from submitit.slurm.slurm import SlurmExecutor

    def capture(executor, command):
        raise _Submitted(executor._make_submission_file_text(command, "uid"))

    monkeypatch.setattr(SlurmExecutor, "_submit_command", capture)
    monkeypatch.setattr(SlurmExecutor, "affinity", classmethod(lambda cls: 1))
    cfg = compose("train", [*SLURM_OVERRIDES, f"hydra.sweep.dir={tmp_path / 'multirun'}"])
    launcher = hydra.utils.instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=None, config=cfg)
    with pytest.raises(_Submitted) as submitted:
        launcher.launch([["model.optimizer.lr=1e-3"], ["model.optimizer.lr=2e-3"]], initial_job_idx=0)
    script = str(submitted.value)
    lines = script.strip().splitlines()
    for flag in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--cpus-per-task=8", "--partition=gpu",
                 "--account=proj42", "--qos=high", "--mem=64GB", "--time=720", "--constraint=h100",
                 "--signal=USR1@90", "--array=0-1%2", "--mail-type=END"):
        assert f"#SBATCH {flag}" in lines, flag
    assert not any("USR2" in line for line in lines)  # Lightning's signal replaces submitit's
    assert "module load cuda" in lines
    assert lines.index("module load cuda") < next(i for i, line in enumerate(lines) if line.startswith("srun"))
    assert f"#SBATCH --output={tmp_path / 'multirun' / '.submitit'}/%A_%a/%A_%a_0_log.out" in lines
    # each array task runs submitit's job runner on its pickled job (what a requeued job reruns)
    assert lines[-1].endswith(f"-u -m submitit.core._submit {tmp_path / 'multirun' / '.submitit'}/%j")


def test_trainer_slurm_gives_every_rank_its_place_and_checks_slurm(monkeypatch):
    for key, value in SLURM_RANK5.items():
        monkeypatch.setenv(key, value)
    cfg = compose("train", [*SLURM_OVERRIDES, "trainer.accelerator=cpu"])
    trainer = hydra.utils.instantiate(cfg.trainer)
    assert isinstance(trainer.strategy.cluster_environment, SLURMEnvironment)
    assert trainer.strategy.cluster_environment.auto_requeue  # SIGUSR1: save hpc_ckpt, scontrol requeue
    assert (trainer.global_rank, trainer.local_rank, trainer.node_rank, trainer.world_size) == (5, 1, 1, 8)
    assert trainer.strategy.cluster_environment.main_address == "node1"
    # what fit() does first: the launcher checks SLURM's layout, then runs (SLURM made the processes)
    assert trainer.strategy.launcher.launch(lambda: "rank runs") == "rank runs"
    # a trainer whose devices differ from SLURM's tasks per node is refused there
    cfg = compose("train", ["trainer=gpu", "trainer.accelerator=cpu", "trainer.devices=2", "+trainer.num_nodes=2"])
    trainer = hydra.utils.instantiate(cfg.trainer)
    with pytest.raises(ValueError, match="ntasks-per-node=4"):
        trainer.strategy.launcher.launch(lambda: "rank runs")


def _touch(path: Path, age_s: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    stamp = time.time() - age_s
    os.utime(path, (stamp, stamp))
    return path


def test_requeued_checkpoint_is_the_newest_in_the_own_run_dir_and_only_on_a_restart(tmp_path, monkeypatch):
    for name in ("SUBMITIT_EXECUTOR", "SLURM_RESTART_COUNT"):
        monkeypatch.delenv(name, raising=False)
    last = _touch(tmp_path / "checkpoints" / "last.ckpt", age_s=100)
    assert requeued_checkpoint(tmp_path) is None  # a plain job: ckpt_path decides
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    assert requeued_checkpoint(tmp_path) is None  # first start of a SLURM job
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert requeued_checkpoint(tmp_path) == str(last)
    monkeypatch.delenv("SLURM_RESTART_COUNT")
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    assert requeued_checkpoint(tmp_path) == str(last)
    # Lightning's requeue checkpoint, written when SIGUSR1 came after the last LastCheckpoint save
    hpc = _touch(tmp_path / "hpc_ckpt_1.ckpt", age_s=10)
    assert requeued_checkpoint(tmp_path) == str(hpc)
    _touch(last, age_s=1)  # training went on after resuming, then the node was lost
    assert requeued_checkpoint(tmp_path) == str(last)
    assert requeued_checkpoint(tmp_path / "elsewhere") is None  # a fresh job's run dir has none


# TINY, trimmed to two steps of training and no test stage (as tests/test_sweep.py's multirun)
TINY_JOB = [o for o in TINY if not o.startswith(("logger=", "callbacks.task_grid_picture", "trainer.max_steps",
                                                 "data.batches_per_epoch"))]
TINY_JOB += ["logger=csv", "test=false", "trainer.max_steps=2", "data.batches_per_epoch=2",
             "callbacks.task_grid_picture=null"]


@pytest.mark.slow
def test_two_job_multirun_through_submitit_local_and_a_requeued_job_resumes_in_place(tmp_path, shared_cache):
    sweep = tmp_path / "multirun"
    command = [sys.executable, "-m", "cirlab.cli.train", "-m", "hydra/launcher=local", "trainer=slurm",
               "trainer.accelerator=cpu", "trainer.precision=32-true", "model.optimizer.lr=1e-3,2e-3", f"paths.root_dir={tmp_path}",
               f"paths.cache_dir={shared_cache}", f"hydra.sweep.dir={sweep}", *TINY_JOB]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    for name in ("SUBMITIT_EXECUTOR", "SLURM_RESTART_COUNT"):
        env.pop(name, None)
    done = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=600,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-3000:]
    for job in ("0", "1"):
        assert (sweep / job / "metrics.json").is_file()
        assert (sweep / job / "checkpoints" / "last.ckpt").is_file()
    # two submitit jobs, each its own process with its own job folder, result and log
    job_dirs = sorted(p for p in (sweep / ".submitit").iterdir() if p.is_dir() and p.name.isdigit())  # not "%j"
    assert len(job_dirs) == 2
    results = [pickle.loads(next(d.glob("*_result.pkl")).read_bytes()) for d in job_dirs]
    assert [r[0] for r in results] == ["success", "success"]
    outputs = sorted(str(r[1].hydra_cfg.hydra.runtime.output_dir) for r in results)
    assert outputs == [str(sweep / "0"), str(sweep / "1")]

    # A requeued job reruns its pickled submission (SLURM: the same array task runs
    # `python -m submitit.core._submit <folder>` again). Replay job 0's: it must land in its own
    # run directory, find its last.ckpt there and resume from it.
    first = next(d for d, r in zip(job_dirs, results) if str(r[1].hydra_cfg.hydra.runtime.output_dir) == str(sweep / "0"))
    job_id = first.name
    replay_env = {**env, "SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_JOB_ID": job_id, "SUBMITIT_LOCAL_NTASKS": "1",
                  "SUBMITIT_LOCAL_GLOBALID": "0", "SUBMITIT_LOCAL_LOCALID": "0", "SUBMITIT_LOCAL_NODEID": "0",
                  "SUBMITIT_LOCAL_JOB_NUM_NODES": "1"}
    replay = subprocess.run([sys.executable, "-m", "submitit.core._submit", str(first)], check=False, env=replay_env,
                            capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert replay.returncode == 0, replay.stderr[-3000:]
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir() and not p.name.startswith(".")) == ["0", "1"]
    log = (sweep / "0" / "train.log").read_text()
    assert f"resuming from {sweep / '0' / 'checkpoints' / 'last.ckpt'}" in log
    result = pickle.loads(next(first.glob("*_result.pkl")).read_bytes())
    assert result[0] == "success" and str(result[1].hydra_cfg.hydra.runtime.output_dir) == str(sweep / "0")


@pytest.mark.slow
def test_sigusr1_saves_requeues_and_the_restarted_job_resumes_from_the_hpc_checkpoint(tmp_path, shared_cache):
    """Lightning's half of preemption, with SLURM's variables set by hand for one task: SIGUSR1
    during training saves hpc_ckpt_1.ckpt in the run directory and calls `scontrol requeue
    <job>`; started again (SLURM_RESTART_COUNT=1) in that run directory, the job resumes from it.
    This machine has no SLURM: `scontrol` is a script that records its arguments, and the test
    kills the first start as SLURM would after requeueing it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol_calls.txt"
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
    scontrol.chmod(0o755)
    run_dir = tmp_path / "run"
    slurm = dict(SLURM_RANK5)
    slurm.update(SLURM_NTASKS="1", SLURM_NTASKS_PER_NODE="1", SLURM_NNODES="1", SLURM_PROCID="0", SLURM_LOCALID="0",
                 SLURM_NODEID="0", SLURM_NODELIST="localhost", SLURM_JOB_ID="777")
    env = {**os.environ, **slurm, "PATH": f"{bin_dir}:{os.environ['PATH']}", "WANDB_MODE": "disabled"}
    for name in ("SUBMITIT_EXECUTOR", "SLURM_RESTART_COUNT", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        env.pop(name, None)
    common = [sys.executable, "-m", "cirlab.cli.train", "trainer=cpu", f"paths.root_dir={tmp_path}",
              f"paths.cache_dir={shared_cache}", f"hydra.run.dir={run_dir}", *TINY_JOB,
              "data.batches_per_epoch=1000", "callbacks.last_checkpoint.every_n_train_steps=5"]
    first = subprocess.Popen([*common, "trainer.max_steps=100000"], env=env, stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        last = run_dir / "checkpoints" / "last.ckpt"
        deadline = time.time() + 300
        while not last.is_file() and first.poll() is None and time.time() < deadline:
            time.sleep(0.5)
        assert last.is_file(), "training did not start"
        first.send_signal(signal.SIGUSR1)  # SLURM, 90 s before the end
        hpc = run_dir / "hpc_ckpt_1.ckpt"
        while not (calls.is_file() and hpc.is_file()) and first.poll() is None and time.time() < deadline:
            time.sleep(0.5)
    finally:
        first.kill()  # SLURM ends the requeued job's first start
        _, err = first.communicate(timeout=60)
    assert calls.read_text().split() == ["requeue", "777"], err[-3000:]
    assert torch.load(hpc, map_location="cpu", weights_only=True)["global_step"] >= 5
    # training went on until the kill: last.ckpt may have been saved after hpc_ckpt_1; the newer wins
    newest = max((hpc, last), key=lambda path: path.stat().st_mtime)
    resumed = torch.load(newest, map_location="cpu", weights_only=True)["global_step"]

    second = subprocess.run([*common, f"trainer.max_steps={resumed + 2}"], env={**env, "SLURM_RESTART_COUNT": "1"},
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600, check=False)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resuming from {newest}" in (run_dir / "train.log").read_text()
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == resumed + 2
