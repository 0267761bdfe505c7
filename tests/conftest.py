"""Shared test fixtures.

Tests that need the project's reference images read them from ``../shared/data`` beside the
repository (override with ``CIRLAB_SHARED_DATA``). On a fresh clone without that folder those
tests skip with a reason; everything else runs on images that ship with scikit-image.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CIRLAB_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def shared_data_path(*parts: str) -> Path:
    """Path inside the shared data folder, or skip the calling test with the reason."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs {path} (the project's shared test data, absent on this clone)")
    return path


@pytest.fixture
def cbsd68_dir() -> Path:
    return shared_data_path("test", "CBSD68")


@pytest.fixture
def iqa_dir() -> Path:
    return shared_data_path("iqa")


# --------------------------------------------------------------------------- Hydra configs
CONFIG_DIR = REPO_ROOT / "conf"

# A tiny, fast, offline training setup: embedded photos, tiny CResMD, small crops.
TINY = [
    "model=cresmd_tiny",
    "logger=csv",
    "data.batch_size=4",
    "data.patch_size=32",
    "data.num_workers=0",
    "data.batches_per_epoch=3",
    "data.val_crop=48",
    "data.test_crop=48",
    "trainer.max_steps=3",
    "callbacks.task_grid_picture.crop=48",
    "callbacks.progress_bar.refresh_rate=0",
]


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory) -> Path:
    """One cache folder per test session, so the embedded photos are written only once."""
    return tmp_path_factory.mktemp("cirlab-cache")


_JOB_DIRS: list[Path] = []  # the session's folder for run directories of composed configs


@pytest.fixture(scope="session", autouse=True)
def _job_dir_root(tmp_path_factory):
    """Run directories of :func:`compose` go under pytest's temporary folder, which pytest
    prunes (keeping the last three sessions), not straight into the system's temp folder."""
    _JOB_DIRS.append(tmp_path_factory.mktemp("cirlab-jobs"))
    yield
    _JOB_DIRS.clear()


@pytest.fixture(autouse=True)
def _process_state_restored():
    """Building a Trainer for a cluster layout sets process-wide state: Lightning's
    ``rank_zero_only.rank`` (a test that places rank 5 of 8 left every later logger silent) and,
    when a launcher runs, torch's thread count and ``OMP_NUM_THREADS``. Each test gets them back
    as they were, so one test's layout cannot leak into the next."""
    import torch
    from lightning.fabric.utilities import rank_zero as fabric_rank_zero
    from lightning.pytorch.utilities import rank_zero as pytorch_rank_zero
    from lightning_utilities.core import rank_zero as utilities_rank_zero

    holders = {id(m.rank_zero_only): m.rank_zero_only
               for m in (fabric_rank_zero, pytorch_rank_zero, utilities_rank_zero)}.values()
    ranks = [(holder, getattr(holder, "rank", None)) for holder in holders]
    threads, omp = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    yield
    for holder, rank in ranks:
        if rank is None:
            if hasattr(holder, "rank"):
                delattr(holder, "rank")
        else:
            holder.rank = rank
    torch.set_num_threads(threads)
    if omp is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = omp


def compose(config_name: str, overrides: list[str]):
    """Compose a config of the real tree as one job (Hydra's own node included, so ${hydra:...}
    resolves); the run directory is the last ``hydra.run.dir=`` override, else a fresh folder
    under the session's temporary folder."""
    import tempfile

    from cirlab.config import compose_job

    run_dirs = [o.split("=", 1)[1] for o in overrides if o.startswith("hydra.run.dir=")]
    run_dir = run_dirs[-1] if run_dirs else tempfile.mkdtemp(prefix="job-", dir=_JOB_DIRS[-1] if _JOB_DIRS else None)
    return compose_job(config_name, overrides, run_dir)


@pytest.fixture
def train_cfg(tmp_path, shared_cache):
    """Factory: the training config with TINY settings, a temporary run dir and the shared cache."""

    def make(*overrides: str, config_name: str = "train"):
        base = [f"paths.root_dir={tmp_path}", f"paths.cache_dir={shared_cache}", f"hydra.run.dir={tmp_path / 'run'}"]
        extra = TINY if config_name == "train" else []
        return compose(config_name, [*base, *extra, *overrides])

    return make
