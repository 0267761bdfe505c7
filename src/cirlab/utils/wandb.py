"""Weights & Biases without surprises: offline when there are no credentials, always finished,
and the suite's results in the shapes W&B users browse.

* :func:`make_wandb_logger` (``conf/logger/wandb.yaml``): Lightning's ``WandbLogger``, online only
  with credentials for the configured server (``WANDB_BASE_URL`` or ``wandb login --host``), with
  ``define_metric`` summaries (``val/psnr``: max, ``train/l1``: min, ...) set when the run starts.
* :func:`log_per_task_table`: the per-grid-point results of a test as one ``wandb.Table``.
* :func:`log_architecture_artifact`: a derived TASNet's ``architecture.json`` (and picture) as an
  artifact of type ``architecture``.
* :func:`publish_sweep_summary`: a sweep's ``summary.csv`` (as a table) and ``pareto.png`` (as an
  image) in a run of their own in the sweep's W&B group.

Pictures go through :func:`cirlab.figures.publish_figure` (``wandb.Image`` with a caption).
"""

from __future__ import annotations

import configparser
import csv
import logging
import netrc
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.wandb.ai"
#: summaries of the metrics cirlab logs (W&B's default is the last value); ``conf/logger/wandb.yaml``
DEFAULT_SUMMARY_METRICS = {"val/psnr": "max", "val/ssim": "max", "train/l1": "min"}
# Lightning's WandbLogger logs against this step key (WandbLogger.experiment)
STEP_METRIC = "trainer/global_step"


def wandb_base_url() -> str:
    """The W&B server in use: ``WANDB_BASE_URL``, else ``base_url`` of the settings that
    ``wandb login --host`` writes (``$WANDB_CONFIG_DIR/settings``, ``~/.config/wandb/settings``),
    else the public server."""
    if os.environ.get("WANDB_BASE_URL"):
        return os.environ["WANDB_BASE_URL"].rstrip("/")
    config_dir = Path(os.environ.get("WANDB_CONFIG_DIR", Path.home() / ".config" / "wandb"))
    settings = configparser.ConfigParser()
    try:
        settings.read(config_dir / "settings")
        url = settings.get("default", "base_url", fallback="")
    except (configparser.Error, OSError):
        url = ""
    return url.rstrip("/") or DEFAULT_BASE_URL


def has_wandb_credentials() -> bool:
    """True when W&B could log in without prompting: ``WANDB_API_KEY``, or an entry for the
    server in use (:func:`wandb_base_url`, e.g. a self-hosted one) in the netrc file (``NETRC``,
    else ``~/.netrc``), which is where ``wandb login`` stores the key."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlsplit(wandb_base_url()).netloc
    if not host:
        return False
    netrc_path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        auth = netrc.netrc(netrc_path).authenticators(host)
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return auth is not None and bool(auth[2])


def resolve_mode(mode: str) -> str:
    """``auto`` -> ``online`` with credentials, ``offline`` without; other values pass through."""
    if mode not in ("auto", "online", "offline", "disabled"):
        raise ValueError(f"logger.wandb.mode={mode!r} must be auto, online, offline or disabled")
    env_mode = os.environ.get("WANDB_MODE")
    if mode == "auto":
        if env_mode in ("online", "offline", "disabled"):
            return env_mode
        return "online" if has_wandb_credentials() else "offline"
    return mode


def _check_summaries(summary_metrics: Mapping[str, str] | None) -> dict[str, str]:
    summaries = dict(DEFAULT_SUMMARY_METRICS if summary_metrics is None else summary_metrics)
    for name, summary in summaries.items():
        if summary not in ("min", "max", "mean", "last", "first", "none"):
            raise ValueError(f"logger.wandb.summary_metrics.{name}={summary!r} must be min, max, mean, last, first or none")
    return summaries


def _define_summaries(run: Any, summaries: Mapping[str, str]) -> None:
    """``define_metric`` for each summary; the step key stays Lightning's (a definition of its own
    replaces the ``*`` glob Lightning defines)."""
    for name, summary in summaries.items():
        run.define_metric(name, step_metric=STEP_METRIC, step_sync=True, summary=summary)


_LOGGER_CLASS: type | None = None


def _logger_class() -> type:
    """``CirlabWandbLogger``: Lightning's ``WandbLogger`` defining the summaries when its run starts.

    Built on first use (importing Lightning only then) and reachable as
    ``cirlab.utils.wandb.CirlabWandbLogger``, so a logger pickles (DDP spawn) like any other."""
    global _LOGGER_CLASS
    if _LOGGER_CLASS is None:
        from lightning.pytorch.loggers import WandbLogger
        from lightning.pytorch.loggers.logger import rank_zero_experiment

        class CirlabWandbLogger(WandbLogger):
            cirlab_summaries: dict[str, str] = {}

            @property
            @rank_zero_experiment
            def experiment(self):
                created = self._experiment is None
                run = WandbLogger.experiment.fget(self)
                if created and hasattr(run, "define_metric"):
                    _define_summaries(run, self.cirlab_summaries)
                return run

        CirlabWandbLogger.__module__ = __name__
        CirlabWandbLogger.__qualname__ = "CirlabWandbLogger"
        _LOGGER_CLASS = CirlabWandbLogger
    return _LOGGER_CLASS


def __getattr__(name: str) -> Any:
    if name == "CirlabWandbLogger":
        return _logger_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def make_wandb_logger(save_dir: str, mode: str = "auto", tags=None, summary_metrics: Mapping[str, str] | None = None,
                      **kwargs):
    """A Lightning ``WandbLogger`` that never prompts for a login.

    Without credentials the run is written offline under ``save_dir/wandb``; upload it later
    with ``wandb sync <save_dir>/wandb/offline-run-*``. ``summary_metrics``: metric -> W&B summary
    (``max``, ``min``, ...; default :data:`DEFAULT_SUMMARY_METRICS`), defined when the run starts.
    Other keyword arguments go to ``WandbLogger`` (``project``, ``entity``, ``group``, ``name``, ...).
    """
    summaries = _check_summaries(summary_metrics)
    resolved = resolve_mode(mode)
    if resolved == "offline" and mode == "auto":
        log.info("W&B: no credentials for %s found, logging offline to %s/wandb (upload later with `wandb sync`)",
                 wandb_base_url(), save_dir)
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("WANDB_SILENT", "true")
    logger = _logger_class()(save_dir=save_dir, mode=resolved, tags=list(tags) if tags else None, **kwargs)
    logger.cirlab_summaries = summaries
    # Lightning always passes `anonymous` (None unless asked for) to wandb.init, and wandb >= 0.19
    # warns at every run that the setting has no effect; not passing it is the same run, minus the warning
    if logger._wandb_init.get("anonymous") is None:
        logger._wandb_init.pop("anonymous", None)
    return logger


def wandb_loggers(trainer) -> list:
    """The trainer's W&B loggers (none when it has no trainer or logs elsewhere)."""
    from lightning.pytorch.loggers import WandbLogger

    return [logger for logger in getattr(trainer, "loggers", None) or [] if isinstance(logger, WandbLogger)]


def log_per_task_table(trainer, result, key: str = "test/per_task") -> int:
    """Log a :class:`cirlab.reports.PerTaskResult` as one ``wandb.Table`` (a row per grid point:
    label, physical levels r, sigma, q, then each metric) to every W&B logger of ``trainer``.
    Returns how many loggers took it. Call on rank 0."""
    loggers = wandb_loggers(trainer)
    if not loggers:
        return 0
    rows = result.rows()
    columns = list(rows[0]) if rows else ["label"]
    data = [[row[column] for column in columns] for row in rows]
    for logger in loggers:
        logger.log_table(key=key, columns=columns, data=data, step=trainer.global_step)
    return len(loggers)


def log_architecture_artifact(logger, folder: str | Path, name: str = "tasnet-architecture"):
    """Log ``architecture.json`` (and ``architecture.png`` when present) of a derived TASNet in
    ``folder`` as a W&B artifact of type ``architecture``, its summary as metadata; return the
    artifact. None (nothing logged) without that file or without a real run (a disabled or
    non-zero-rank logger)."""
    import json

    path = Path(folder) / "architecture.json"
    if not path.is_file():
        return None
    import wandb

    run = logger.experiment
    if not isinstance(run, wandb.Run):
        return None

    summary = json.loads(path.read_text())
    metadata = {key: value for key, value in summary.items() if isinstance(value, (int, float, str, bool))}
    artifact = wandb.Artifact(name=name, type="architecture", metadata=metadata,
                              description=f"derived TASNet architecture from {Path(folder).resolve()}")
    artifact.add_file(str(path))
    if (Path(folder) / "architecture.png").is_file():
        artifact.add_file(str(Path(folder) / "architecture.png"))
    run.log_artifact(artifact)
    return artifact


def _wandb_entry(logger_cfg: Mapping | None) -> Mapping | None:
    for entry in (logger_cfg or {}).values():
        if entry is not None and "wandb" in str(entry.get("_target_", "")).lower():
            return entry
    return None


def publish_sweep_summary(logger_cfg: Mapping | None, folder: str | Path, group: str | None = None):
    """Send a written sweep summary (``folder/summary.csv`` and ``pareto.png``) to W&B, in a run of
    its own (``job_type="sweep-summary"``) in ``group``, the W&B group of the sweep's trials
    (default: the W&B logger's ``group``).

    ``logger_cfg`` is the jobs' ``logger`` config; without a W&B entry (or with mode ``disabled``)
    nothing is sent and None is returned. Returns the (finished) run. Runs offline without
    credentials, as the trials do.
    """
    entry = _wandb_entry(logger_cfg)
    folder = Path(folder)
    summary_csv = folder / "summary.csv"
    if entry is None or not summary_csv.is_file():
        return None
    group = group or entry.get("group") or folder.name
    mode = resolve_mode(str(entry.get("mode", "auto")))
    if mode == "disabled":
        return None
    import wandb

    with open(summary_csv, newline="") as handle:
        rows = list(csv.reader(handle))
    os.environ.setdefault("WANDB_SILENT", "true")
    run = wandb.init(project=entry.get("project"), entity=entry.get("entity"), group=group,
                     job_type="sweep-summary", name=f"{group}-summary", dir=str(folder), mode=mode,
                     reinit="finish_previous")
    try:
        record: dict[str, Any] = {"sweep/summary": wandb.Table(columns=rows[0], data=rows[1:]) if rows else None}
        if (folder / "pareto.png").is_file():
            record["sweep/pareto"] = wandb.Image(str(folder / "pareto.png"),
                                                 caption=f"{group}: Pareto front of {max(len(rows) - 1, 0)} trials")
        run.log({key: value for key, value in record.items() if value is not None})
        run.summary["sweep/trials"] = max(len(rows) - 1, 0)
        return run
    finally:
        run.finish()


def finish_wandb() -> None:
    """End the current W&B run, if any (each job of a multirun must get its own run)."""
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()
