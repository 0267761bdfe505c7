"""Hydra set-up: where the config tree lives, typed schemas, and checks run right after composing.

The ``degradation`` and ``sampling`` groups are typed by the dataclasses of
``cirlab.data.sampling`` (registered here as ``<group>/schema``): a misspelt key fails when the
config is composed, and ``validate_config`` instantiates the dataclasses so an out-of-range
value fails before anything is built, with the offending key in the message.
"""

from __future__ import annotations

import os
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

# Wheels carry the tree as cirlab/conf (package-dir in pyproject.toml); editable installs and
# source checkouts find it at the repository root; set CIRLAB_CONFIG_DIR to use another copy.
_PACKAGED_CONF = Path(__file__).resolve().parent / "conf"
CONFIG_DIR = os.environ.get("CIRLAB_CONFIG_DIR") or str(
    _PACKAGED_CONF if _PACKAGED_CONF.is_dir() else Path(__file__).resolve().parents[2] / "conf"
)

_registered = False


def register_configs() -> None:
    """Register the structured-config schemas (idempotent)."""
    global _registered
    if _registered:
        return
    from cirlab.data.sampling import DegradationConfig, SamplingConfig

    store = ConfigStore.instance()
    store.store(group="degradation", name="schema", node=DegradationConfig)
    store.store(group="sampling", name="schema", node=SamplingConfig)
    _registered = True


def validate_config(cfg: DictConfig) -> None:
    """Fail fast on bad values: typed groups are built (running their range checks)."""
    if not Path(CONFIG_DIR).is_dir():
        raise FileNotFoundError(f"config tree not found at {CONFIG_DIR}; set CIRLAB_CONFIG_DIR")
    for group in ("degradation", "sampling"):
        if group in cfg:
            try:
                OmegaConf.to_object(cfg[group])
            except ValueError as error:
                message = str(error)
                raise ValueError(message if message.startswith(group) else f"{group}: {message}") from None
    keys = [key for key in cfg.keys() if key != "hydra"]
    missing = {key for key in keys if OmegaConf.is_missing(cfg, key)}
    for key in keys:
        if key not in missing and OmegaConf.is_config(cfg[key]):
            missing |= {f"{key}.{sub}" for sub in OmegaConf.missing_keys(cfg[key])}
    if missing:
        raise ValueError(f"missing mandatory config value(s): {', '.join(sorted(missing))}")


def compose_job(config_name: str, overrides: list[str], run_dir: str | Path) -> DictConfig:
    """Compose ``config_name`` of the real tree with ``overrides``, as a job running in ``run_dir``.

    What ``@hydra.main`` would set up for one job, without starting an app: Hydra's own node is
    included (``return_hydra_config=True``), ``hydra.run.dir`` and ``hydra.runtime.output_dir``
    are ``run_dir`` (so ``${hydra:runtime.output_dir}``, hence ``paths.output_dir``, resolve to
    it) and the result is installed as the current ``HydraConfig``. Used by drivers that run
    many jobs in one process (``cirlab.sweeps.driver``). Nothing is written to ``run_dir``.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3", job_name=config_name):
        cfg = compose(config_name=config_name, overrides=list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.run.dir = str(run_dir)
        cfg.hydra.runtime.output_dir = str(run_dir)
    HydraConfig.instance().set_config(cfg)
    return cfg
