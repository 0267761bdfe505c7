"""Small pieces every entry point uses: building callbacks/loggers, resume paths, safe writes,
and the run-directory rules.

Run directories: Hydra names them ``<date>_<time>_<run id>`` (``conf/hydra/default.yaml``), where
the run id (:func:`new_run_id`, resolver ``${cirlab.run_id:}``) is random, so jobs started in the
same second get different folders. A job also *claims* its folder (:func:`claim_run_dir`): an
owner file, created exclusively, records its host and pid; a second job aimed at a folder that a
live job owns stops with an error naming both (explicit ``hydra.run.dir=...`` or a stale
resume). A folder whose owner is gone (killed job on this host, or the same SLURM job requeued)
is taken over.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import hydra
from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig

from cirlab.utils.files import atomic_path

log = logging.getLogger(__name__)


def _instantiate_group(group: DictConfig | None, kind: str) -> list:
    objects = []
    if not group:
        return objects
    if not isinstance(group, Mapping) and not isinstance(group, DictConfig):
        raise ValueError(f"{kind} config must be a mapping of named entries with _target_")
    for name, entry in group.items():
        if entry is None:  # disabled from the command line, e.g. callbacks.task_grid_picture=null
            continue
        if "_target_" not in entry:
            raise ValueError(f"{kind}.{name} has no _target_")
        objects.append(hydra.utils.instantiate(entry))
    return objects


def instantiate_node(node: DictConfig, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate(node)``, but a constructor's input error (``ValueError``, which
    includes :class:`cirlab.checkpoints.CheckpointError`, or ``FileNotFoundError``) reaches the
    user as itself, naming its key or file, not wrapped in Hydra's ``InstantiationException``."""
    from hydra.errors import InstantiationException

    try:
        return hydra.utils.instantiate(node, **kwargs)
    except InstantiationException as error:
        cause = error.__cause__
        while isinstance(cause, InstantiationException):
            cause = cause.__cause__
        if isinstance(cause, (ValueError, FileNotFoundError)):
            raise cause from None
        raise


def instantiate_callbacks(group: DictConfig | None) -> list:
    return _instantiate_group(group, "callbacks")


def instantiate_loggers(group: DictConfig | None) -> list:
    return _instantiate_group(group, "logger")


def job_config(cfg: DictConfig) -> dict:
    """The job's resolved config as plain data (without Hydra's own node, if present)."""
    from omegaconf import OmegaConf

    return {key: OmegaConf.to_container(cfg[key], resolve=True) if OmegaConf.is_config(cfg[key]) else cfg[key]
            for key in cfg.keys() if key != "hydra"}


def metrics_to_floats(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {key: float(value) for key, value in metrics.items()}


def resolve_ckpt_path(ckpt_path: str | None, cfg: DictConfig) -> str | None:
    """``None`` -> start fresh; ``last`` -> newest ``last.ckpt`` of this task's runs; else a file.

    The file is checked before training starts (:func:`cirlab.checkpoints.check_resume_checkpoint`):
    a missing, damaged or foreign file, or a checkpoint of another module than ``model._target_``,
    fails here with ``ckpt_path`` and the file in the message."""
    from cirlab.checkpoints import check_resume_checkpoint

    if not ckpt_path:
        return None
    expected = cfg.model.get("_target_") if "model" in cfg else None
    if ckpt_path != "last":
        check_resume_checkpoint(ckpt_path, expected)
        return str(ckpt_path)
    own = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    if own.is_file():
        check_resume_checkpoint(own, expected, key="ckpt_path=last")
        return str(own)
    task_dir = Path(cfg.paths.log_dir) / cfg.task_name
    candidates = sorted(task_dir.glob("**/checkpoints/last*.ckpt"), key=lambda p: p.stat().st_mtime)
    # the newest last.ckpt of a job still running is that job's, not an interrupted one to resume
    running = [c for c in candidates if _owned_by_live_job(c.parent.parent)]
    if running:
        log.info("ckpt_path=last: skipping %d checkpoint(s) of jobs still running (%s)", len(running),
                 ", ".join(str(c.parent.parent) for c in running))
        candidates = [c for c in candidates if c not in running]
    if not candidates:
        busy = f" other than those of jobs still running ({len(running)})" if running else ""
        raise FileNotFoundError(f"ckpt_path=last: no last.ckpt under {task_dir}{busy} (or {own.parent})")
    log.info("resuming from %s", candidates[-1])
    check_resume_checkpoint(candidates[-1], expected, key="ckpt_path=last")
    return str(candidates[-1])


# ------------------------------------------------------------------------------ run directories
#: Name of the owner file a job keeps in its run directory while it runs.
OWNER_FILE = ".cirlab-owner.json"


class RunDirBusy(RuntimeError):
    """A run directory is owned by another job that is still running."""


def new_run_id() -> str:
    """Six random hex digits: the suffix that makes run directories of one second unique.

    Random rather than a pid: array jobs on different hosts of a cluster share pids. With 2^24
    values, 100 jobs started in one second collide with probability ~3e-4; the exclusive claim
    (:func:`claim_run_dir`) stops the rare collision instead of letting it overwrite."""
    return secrets.token_hex(3)


def register_run_id_resolver() -> None:
    """``${cirlab.run_id:}``, cached like Hydra's ``${now:}`` so every read in a job (and the jobs of
    one multirun, which copy the launcher's cache) sees the same value (idempotent)."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("cirlab.run_id"):
        OmegaConf.register_new_resolver("cirlab.run_id", new_run_id, use_cache=True)


def _is_rank_zero() -> bool:
    """True in the process that owns the run: not a DDP child (``LOCAL_RANK``/``RANK`` > 0) nor a
    secondary SLURM task. Other ranks write into the folder their rank 0 claimed."""
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        value = os.environ.get(key)
        if value is not None:
            try:
                return int(value) == 0
            except ValueError:
                return True
    return True


def _this_owner() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _process_start(os.getpid()),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "slurm_job": _slurm_job()}


def _process_start(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux ``/proc``), or None: with
    the pid it tells a live owner from an unrelated process that got the pid of a dead one."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2:].split()  # after "pid (command) "; the command may hold spaces
    return fields[19] if len(fields) > 19 else None


def _slurm_job() -> str | None:
    job = os.environ.get("SLURM_JOB_ID")
    task = os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{job}_{task}" if job and task else job


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _owner_state(record: dict[str, Any]) -> str:
    """``"self"``, ``"live"`` or ``"gone"`` for the owner recorded in a run directory."""
    here = socket.gethostname()
    if record.get("host") == here and record.get("pid") == os.getpid():
        return "self"
    if record.get("slurm_job") and record.get("slurm_job") == _slurm_job():
        return "gone"  # the same SLURM job, requeued: its earlier attempt has ended
    if record.get("host") == here:
        pid = record.get("pid")
        if not (isinstance(pid, int) and _pid_alive(pid)):
            return "gone"
        recorded, current = record.get("pid_start"), _process_start(pid)
        return "gone" if recorded and current and recorded != current else "live"  # a reused pid
    return "live"  # another host: it cannot be checked from here, so assume it runs


def _read_owner(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _owned_by_live_job(run_dir: Path) -> bool:
    """Whether another job that is (or may be) running owns ``run_dir``."""
    record = _read_owner(Path(run_dir) / OWNER_FILE)
    return bool(record) and _owner_state(record) == "live"


@contextlib.contextmanager
def claim_run_dir(run_dir: str | Path) -> Iterator[Path]:
    """Own ``run_dir`` for the duration of the ``with`` block.

    The owner file is linked into place (``os.link`` fails if it exists, also over NFS), so two
    jobs never both own a folder. A folder owned by this process is entered again without a new
    claim; one whose owner has ended is taken over; one owned by a live job (or by a job on
    another host, which cannot be checked) raises :class:`RunDirBusy` before anything is written.
    Processes other than rank 0 (DDP children, secondary SLURM tasks) do not claim."""
    run_dir = Path(run_dir)
    if not _is_rank_zero():
        yield run_dir
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    owner = run_dir / OWNER_FILE
    record = _this_owner()
    claimed = False
    for _ in range(20):
        tmp = run_dir / f".{OWNER_FILE}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        tmp.write_text(json.dumps(record) + "\n")
        try:
            os.link(tmp, owner)
            claimed = True
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
        if claimed:
            break
        existing = _read_owner(owner)
        if existing is None:  # released meanwhile: try again
            continue
        state = _owner_state(existing) if existing else "gone"
        if state == "self":
            yield run_dir  # nested claim (a driver running a job in a folder it owns)
            return
        if state == "live":
            raise RunDirBusy(
                f"run directory {run_dir} is in use by another job (host {existing.get('host')}, pid "
                f"{existing.get('pid')}, started {existing.get('started')}): choose another hydra.run.dir, or, if "
                f"that job is no longer running, delete {owner} and start again")
        # the owner has ended: move its record aside (one taker wins the rename), then claim again
        with contextlib.suppress(FileNotFoundError):
            stale = run_dir / f".{OWNER_FILE}.stale.{secrets.token_hex(4)}"
            os.rename(owner, stale)
            log.info("taking over %s from an ended job (host %s, pid %s)", run_dir, existing.get("host"),
                     existing.get("pid"))
            stale.unlink(missing_ok=True)
    if not claimed:
        raise RunDirBusy(f"could not claim run directory {run_dir} (owner file {owner} keeps changing)")
    try:
        yield run_dir
    finally:
        if (_read_owner(owner) or {}).get("pid") == os.getpid():
            owner.unlink(missing_ok=True)


class RunDirClaim(HydraCallback):
    """Hydra callback (``conf/hydra/default.yaml``): claim the run directory (``hydra.run.dir``) or
    the multirun folder (``hydra.sweep.dir``) before Hydra writes ``.hydra/`` or the job log into it,
    and release it when the run ends. The jobs of a multirun have their own numbered sub-folders
    of the claimed folder; :func:`cirlab.training.run_training` claims each of those too."""

    def __init__(self) -> None:
        self._claim: contextlib.AbstractContextManager | None = None

    def __getstate__(self) -> dict[str, Any]:
        # submitit pickles Hydra's callbacks with each job: the claim stays with this process
        return {**self.__dict__, "_claim": None}

    def _enter(self, folder: str) -> None:
        claim = claim_run_dir(folder)
        try:
            claim.__enter__()
        except RunDirBusy as error:
            # Hydra turns a callback's exceptions into warnings and carries on; SystemExit stops the
            # job before Hydra writes .hydra/ or the job log into the other job's folder
            raise SystemExit(f"Error: {error}") from None
        self._claim = claim

    def _exit(self) -> None:
        if self._claim is not None:
            claim, self._claim = self._claim, None
            claim.__exit__(None, None, None)

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._enter(str(config.hydra.run.dir))

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._exit()

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._enter(str(config.hydra.sweep.dir))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._exit()


def write_text_atomically(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomically(path: Path, data: Any) -> None:
    write_text_atomically(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"


def attach_log_file(path: Path) -> logging.Handler:
    """Copy the root logger into ``path`` (Hydra's job-log format) until :func:`detach_log_file`;
    for drivers that run several jobs in one process (sweeps, the pipeline)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logging.getLogger().addHandler(handler)
    return handler


def detach_log_file(handler: logging.Handler) -> None:
    logging.getLogger().removeHandler(handler)
    handler.close()


def write_job_files(cfg: DictConfig, overrides: list[str], run_dir: Path) -> None:
    """What Hydra writes for a job: the composed config (without Hydra's node) and the overrides."""
    from omegaconf import OmegaConf

    job = OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"])
    write_text_atomically(run_dir / ".hydra" / "config.yaml", OmegaConf.to_yaml(job))
    write_text_atomically(run_dir / ".hydra" / "overrides.yaml", OmegaConf.to_yaml(OmegaConf.create(list(overrides))))
