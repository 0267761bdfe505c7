"""Small pieces every entry point uses: building callbacks/loggers, resume paths, safe writes."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
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
    """``None`` -> start fresh; ``last`` -> newest ``last.ckpt`` of this task's runs; else a file."""
    if not ckpt_path:
        return None
    if ckpt_path != "last":
        if not Path(ckpt_path).is_file():
            raise FileNotFoundError(f"ckpt_path={ckpt_path!r}: no such checkpoint file")
        return str(ckpt_path)
    own = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    if own.is_file():
        return str(own)
    task_dir = Path(cfg.paths.log_dir) / cfg.task_name
    candidates = sorted(task_dir.glob("**/checkpoints/last*.ckpt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise FileNotFoundError(f"ckpt_path=last: no last.ckpt under {task_dir} (or {own.parent})")
    log.info("resuming from %s", candidates[-1])
    return str(candidates[-1])


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
