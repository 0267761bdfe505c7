"""The console and the job log: every message once, the composed config as a tree at start.

Lightning installs a ``StreamHandler`` of its own on the ``lightning`` logger (always) and on
``lightning.pytorch`` / ``lightning.fabric`` (when the root logger had no handler when it was
imported). Under Hydra, whose job logging puts a console and a file handler on the root logger,
that printed every Lightning INFO line twice (once by Lightning, once by Hydra's console) when
Lightning was imported after Hydra had set up logging, and kept Lightning's lines out of the job's
``.log`` file when it was imported before. :func:`route_library_logs` removes those handlers so
Lightning's records reach Hydra's handlers once, console and file alike. It also drops Lightning's
one advertisement record ("Tip: ... litlogger"), logged at every ``Trainer`` start; nothing else is
filtered.

:class:`ConsoleSetup` is the Hydra callback (``conf/hydra/default.yaml``) that does both when a job
starts: route the logs, print the config tree.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from typing import Any, TextIO

from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig, OmegaConf

#: loggers Lightning gives handlers of their own (old package names included)
LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric")
#: the logger Lightning's ``rank_zero_info`` writes through (its advertisement comes from there)
_RANK_ZERO_LOGGER = "lightning.pytorch.utilities.rank_zero"
#: top-level groups printed first, in this order (Lightning's template order); the rest follow
TREE_ORDER = ("data", "model", "callbacks", "logger", "trainer", "paths")


class _DropAdvertisement(logging.Filter):
    """Drops Lightning's "Tip: ... try installing litlogger" record (not a diagnostic)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.msg if isinstance(record.msg, str) else ""
        return not ("Tip:" in message and "litlogger" in message)


def route_library_logs() -> None:
    """Send Lightning's log records through the root logger's handlers only (idempotent).

    With no handler on the root logger (a plain script, no Hydra), Lightning's own handlers stay,
    so its messages are still shown; the advertisement filter is installed either way.
    """
    import lightning.pytorch  # noqa: F401  (installs Lightning's handlers now, so they can be removed)

    rank_zero = logging.getLogger(_RANK_ZERO_LOGGER)
    if not any(isinstance(f, _DropAdvertisement) for f in rank_zero.filters):
        rank_zero.addFilter(_DropAdvertisement())
    if not logging.getLogger().handlers:
        return
    for name in LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            # Lightning's are plain StreamHandlers; anything else (a file a user attached) stays
            if type(handler) is logging.StreamHandler:
                logger.removeHandler(handler)
        logger.propagate = True


def config_tree(cfg: DictConfig, order: Iterable[str] = TREE_ORDER, resolve: bool = True):
    """A ``rich.tree.Tree`` of ``cfg`` (without Hydra's own node): one branch per top-level key,
    its YAML inside. Interpolations are resolved where they can be (unresolvable ones stay as written)."""
    from rich.syntax import Syntax
    from rich.tree import Tree

    keys = [key for key in cfg.keys() if key != "hydra"]
    ordered = [key for key in order if key in keys] + [key for key in keys if key not in order]
    def yaml(node: Any) -> str:
        try:
            text = OmegaConf.to_yaml(node, resolve=resolve)
        except Exception:  # noqa: BLE001  (an interpolation that needs a running job: show it unresolved)
            text = OmegaConf.to_yaml(node)
        return text.rstrip("\n")

    def syntax(text: str):
        return Syntax(text, "yaml", theme="ansi_dark", background_color="default")

    tree = Tree("config", guide_style="dim")
    scalars = []
    for key in ordered:
        node = cfg._get_node(key)
        if OmegaConf.is_config(node) and not OmegaConf.is_missing(cfg, key) and cfg[key] is not None:
            tree.add(str(key), guide_style="dim").add(syntax(yaml(cfg[key]) or "{}"))
        else:
            scalars.append(key)
    if scalars:  # seed, task_name, ckpt_path, ...: one branch, as YAML
        tree.add("(top level)", guide_style="dim").add(syntax(yaml(OmegaConf.masked_copy(cfg, scalars))))
    return tree


def print_config_tree(cfg: DictConfig, stream: TextIO | None = None, order: Iterable[str] = TREE_ORDER) -> None:
    """Print :func:`config_tree` to ``stream`` (stdout). On a terminal in colour; otherwise plain
    text without escape codes (rich decides from ``isatty``), never wrapped below 120 columns."""
    from rich.console import Console

    stream = stream if stream is not None else sys.stdout
    terminal = stream.isatty() if hasattr(stream, "isatty") else False
    console = Console(file=stream, width=None if terminal else 120, soft_wrap=not terminal)
    console.print(config_tree(cfg, order))
    stream.flush()


class ConsoleSetup(HydraCallback):
    """Hydra callback: when a job starts (after Hydra set up its logging), route Lightning's logs
    through Hydra's handlers and print the job's composed config as a tree (on rank 0).

    Args:
        print_config: print the tree (``hydra.callbacks.console.print_config=false`` turns it off).
    """

    def __init__(self, print_config: bool = True) -> None:
        self.print_config = print_config

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        route_library_logs()
        # DDP started by Lightning or SLURM runs this job once per rank: one tree is enough
        from lightning.pytorch.utilities.rank_zero import rank_zero_only

        if self.print_config and getattr(rank_zero_only, "rank", 0) == 0:
            print_config_tree(config)
