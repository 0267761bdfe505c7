"""Hydra set-up: where the config tree lives, typed schemas, and checks run right after composing.

The ``degradation`` and ``sampling`` groups are typed by the dataclasses of
``cirlab.data.pair_config`` (registered here as ``<group>/schema``): a misspelt key fails when the
config is composed, and ``validate_config`` instantiates the dataclasses so an out-of-range
value fails before anything is built, with the offending key in the message.
:func:`check_values` adds the values that Hydra's types let through but that mean something
else than the user meant (a negative ``val_max_images`` used as a slice, ``max_steps=0``, a
negative learning rate): each is an error naming its key.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from cirlab.utils.run import register_run_id_resolver

# ${cirlab.run_id:} of conf/hydra/default.yaml must resolve wherever a config is composed
register_run_id_resolver()

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
    from cirlab.data.pair_config import DegradationConfig, SamplingConfig

    store = ConfigStore.instance()
    store.store(group="degradation", name="schema", node=DegradationConfig)
    store.store(group="sampling", name="schema", node=SamplingConfig)
    _registered = True


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _bad(key: str, value: Any, requirement: str) -> ValueError:
    return ValueError(f"{key}={value!r}: {requirement}")


def _optimizer_values(node: Any, prefix: str) -> list[tuple[str, Any, str]]:
    """Learning rates and optimiser constants anywhere under ``node`` that torch would reject
    later without the key (or, for ``lr=0``, accept and never train)."""
    problems = []
    if not isinstance(node, dict):
        return problems
    for name, value in node.items():
        key = f"{prefix}.{name}"
        if isinstance(value, dict):
            problems += _optimizer_values(value, key)
        elif (name == "lr" or name.endswith("_lr")) and not (_is_number(value) and value > 0):
            problems.append((key, value, "a learning rate must be a number > 0"))
        elif name in ("weight_decay", "momentum") and not (_is_number(value) and value >= 0):
            problems.append((key, value, "must be a number >= 0"))
        elif name == "eps" and not (_is_number(value) and value > 0):
            problems.append((key, value, "must be a number > 0"))
        elif name == "betas" and not (isinstance(value, list) and len(value) == 2
                                      and all(_is_number(b) and 0 <= b < 1 for b in value)):
            problems.append((key, value, "must be two numbers in [0, 1)"))
    return problems


def check_values(cfg: DictConfig) -> None:
    """Raise ``ValueError`` naming the key of the first value that would mean something else than
    it says (see the module docstring). Keys absent from ``cfg`` are not checked."""
    def get(key: str) -> Any:
        return OmegaConf.select(cfg, key, default=None, throw_on_missing=False)

    def plain(key: str) -> Any:
        node = get(key)
        return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node

    for stage in ("val", "test"):
        key = f"data.{stage}_max_images"
        value = get(key)
        if value is not None and not (_is_int(value) and value >= 1):
            raise _bad(key, value, "must be an integer >= 1 (the first N images), or null for all; "
                                   "0 would score nothing and a negative N would drop images from the end")
        key = f"data.{stage}_crop"
        value = get(key)
        if value is not None and not (_is_int(value) and value >= 1):
            raise _bad(key, value, "must be an integer >= 1 (side of the centre crop in pixels), or null for whole images")
    if get("data.pairs_on") is not None or get("data.degrade_margin") is not None:
        from cirlab.data.loading import check_margin, check_pairs_on  # imports torch: only when there is data

        if get("data.pairs_on") is not None:
            check_pairs_on(get("data.pairs_on"), "data.pairs_on")
        if get("data.degrade_margin") is not None:
            check_margin(get("data.degrade_margin"), "data.degrade_margin")
    seed = get("seed")
    if seed is not None and not (_is_int(seed) and 0 <= seed < 2**32):
        raise _bad("seed", seed, "must be an integer in [0, 2^32)")
    for key, value, requirement in _optimizer_values(plain("model") or {}, "model"):
        raise _bad(key, value, requirement)
    if "trainer" in cfg and cfg.get("train", True):
        steps = get("trainer.max_steps")
        if steps is not None and not (_is_int(steps) and (steps == -1 or steps >= 1)):
            raise _bad("trainer.max_steps", steps, "must be an integer >= 1, or -1 for no step limit (then "
                                                  "trainer.max_epochs limits training); 0 would train nothing")
        epochs = get("trainer.max_epochs")
        if epochs is not None and not (_is_int(epochs) and (epochs == -1 or epochs >= 1)):
            raise _bad("trainer.max_epochs", epochs, "must be an integer >= 1, or -1 / null for no epoch limit")
        if steps == -1 and epochs == -1 and not get("trainer.max_time") and not get("trainer.fast_dev_run"):
            raise ValueError("trainer.max_steps=-1 with trainer.max_epochs=-1 would train forever: set one of them")
        for key in ("trainer.check_val_every_n_epoch", "trainer.log_every_n_steps"):
            value = get(key)
            if value is not None and not (_is_int(value) and value >= 1):
                raise _bad(key, value, "must be an integer >= 1")
    gamma = get("model.scheduler.gamma")
    if gamma is not None and not (_is_number(gamma) and gamma > 0):
        raise _bad("model.scheduler.gamma", gamma, "the learning-rate factor must be a number > 0 (a negative one "
                                                   "would make the learning rate negative at the first milestone)")
    milestones = plain("model.scheduler.milestones")
    if milestones is not None and not (isinstance(milestones, list) and all(_is_int(m) and m >= 1 for m in milestones)
                                       and milestones == sorted(milestones)):
        raise _bad("model.scheduler.milestones", milestones, "must be increasing step counts >= 1")
    every = get("callbacks.last_checkpoint.every_n_train_steps")
    if every is not None and not (_is_int(every) and every >= 1):
        raise _bad("callbacks.last_checkpoint.every_n_train_steps", every, "must be an integer >= 1, or null")
    _check_task_grid_picture(plain("callbacks.task_grid_picture"))


def _check_task_grid_picture(node: Any) -> None:
    """The picture callback's crop, input levels (within the trained ranges) and fractions of
    them (in [0, 1]: beyond it the task vectors leave the space the network was trained on)."""
    if not isinstance(node, dict) or not str(node.get("_target_", "")).endswith("TaskGridPicture"):
        return
    key = "callbacks.task_grid_picture"
    crop = node.get("crop")
    if crop is not None and not (_is_int(crop) and crop >= 1):
        raise _bad(f"{key}.crop", crop, "must be an integer >= 1 (pixels)")
    fractions = node.get("fractions")
    if fractions is not None and not (isinstance(fractions, list) and fractions
                                      and all(_is_number(f) and 0 <= f <= 1 for f in fractions)):
        raise _bad(f"{key}.fractions", fractions, "must be numbers in [0, 1] (fractions of the input level removed)")
    levels = node.get("input_levels")
    if levels is not None:
        import torch

        from cirlab.tasks import validate_physical

        if not (isinstance(levels, list) and len(levels) == 3 and all(_is_number(v) for v in levels)):
            raise _bad(f"{key}.input_levels", levels, "must be three numbers [r, sigma, q]")
        validate_physical(torch.tensor([levels], dtype=torch.float64), name=f"{key}.input_levels")


def validate_config(cfg: DictConfig) -> None:
    """Fail fast on bad values: typed groups are built (running their range checks), then
    :func:`check_values`."""
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
    check_values(cfg)


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
