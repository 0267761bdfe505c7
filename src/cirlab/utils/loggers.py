"""Experiment loggers whose package is optional: a missing package is a clear error, naming the
`pip install` that fixes it, raised when the logger is built (before the Trainer, data or model
do any work). `conf/logger/mlflow.yaml` -> :func:`make_mlflow_logger`.
"""

from __future__ import annotations

import importlib.util
from typing import Any


class MissingLoggerPackage(ModuleNotFoundError):
    """The logger chosen by `logger=<name>` needs a package that is not installed."""


def require_package(module: str, logger: str, pip_name: str | None = None) -> None:
    """`MissingLoggerPackage` naming `logger=<logger>` and `pip install <pip_name>` when `module`
    cannot be imported here."""
    if importlib.util.find_spec(module) is None:
        raise MissingLoggerPackage(
            f"logger={logger} needs the {module} package, which is not installed: pip install {pip_name or module} "
            "(or choose another logger: logger=csv, logger=tensorboard, logger=wandb, logger=none)", name=module)


def make_mlflow_logger(**kwargs: Any):
    """Lightning's `MLFlowLogger(**kwargs)` (experiment name, tracking URI, run name, tags, ...),
    after checking that mlflow is installed (`MissingLoggerPackage` otherwise)."""
    require_package("mlflow", "mlflow")
    from lightning.pytorch.loggers import MLFlowLogger

    return MLFlowLogger(**kwargs)
