"""Weights & Biases without surprises: offline when there are no credentials, always finished."""

from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path

log = logging.getLogger(__name__)


def has_wandb_credentials() -> bool:
    """True when W&B could log in without prompting (API key in env or in ~/.netrc)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc_path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        auth = netrc.netrc(netrc_path).authenticators("api.wandb.ai")
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return auth is not None


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


def make_wandb_logger(save_dir: str, mode: str = "auto", tags=None, **kwargs):
    """A Lightning ``WandbLogger`` that never prompts for a login.

    Without credentials the run is written offline under ``save_dir/wandb``; upload it later
    with ``wandb sync <save_dir>/wandb/offline-run-*``.
    """
    from lightning.pytorch.loggers import WandbLogger

    resolved = resolve_mode(mode)
    if resolved == "offline" and mode == "auto":
        log.info("W&B: no credentials found, logging offline to %s/wandb (upload later with `wandb sync`)", save_dir)
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("WANDB_SILENT", "true")
    return WandbLogger(save_dir=save_dir, mode=resolved, tags=list(tags) if tags else None, **kwargs)


def finish_wandb() -> None:
    """End the current W&B run, if any (each job of a multirun must get its own run)."""
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()
