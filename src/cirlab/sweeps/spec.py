"""The study spec: the ``optuna:`` node of a composed ``conf/sweep.yaml``, checked.

A study file ``conf/hparams_search/<name>.yaml`` (``# @package _global_``) declares::

    optuna:
      study_name: my_study              # storage: sqlite:///${paths.log_dir}/sweeps/<name>.db
      objectives:                       # ordered mapping metric -> maximize | minimize
        val/psnr: maximize              # (``directions:`` is accepted as another name)
        model/params_total: minimize
      n_trials: 20                      # COMPLETE (or PRUNED) trials the study must hold
      sampler: {name: nsga2, seed: 1}   # null name: tpe for one objective, nsga2 for several
      pruner: null                      # one objective only: {name: median, n_startup_trials: 5, ...}
      heartbeat_interval: 60            # liveness of trials (seconds), see cirlab.sweeps.storage
      grace_period: 180
      max_retry: 1
      params:                           # training-config key -> distribution
        model.optimizer.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
        data.patch_size: {type: int, low: 32, high: 96, step: 16}
        model.net.nf: {type: categorical, choices: [16, 32, 64]}

A key that the training config lacks is added with a leading ``+`` (``+model.extra: {...}``).
:meth:`StudySpec.from_config` raises ``ValueError``/``TypeError`` naming the offending field;
:meth:`ParamSpec.override` writes a sampled value as a Hydra override that reads back unchanged.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from omegaconf import DictConfig, OmegaConf

from cirlab.sweeps.storage import Liveness

_DIRECTIONS = {"max": "maximize", "maximize": "maximize", "min": "minimize", "minimize": "minimize"}


def normalize_direction(direction: str) -> str:
    """``max``/``maximize`` -> ``maximize``; ``min``/``minimize`` -> ``minimize``."""
    key = str(direction).strip().lower()
    if key not in _DIRECTIONS:
        raise ValueError(f"direction {direction!r} must be maximize (max) or minimize (min)")
    return _DIRECTIONS[key]


def format_override_value(value: Any) -> str:
    """A value as Hydra's override grammar reads it back unchanged (strings quoted when needed)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    reserved = {"true", "false", "null", "nan", "inf", "-inf", "+inf"}
    if re.fullmatch(r"[A-Za-z_][\w\-./]*", text) and text.lower() not in reserved:
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


@dataclass
class ParamSpec:
    """One swept training-config key and its distribution."""

    key: str  # as written in the override, possibly with a leading + (add a new key)
    type: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: list | None = None

    @property
    def name(self) -> str:
        return self.key.lstrip("+")

    @classmethod
    def from_config(cls, key: str, node: Any) -> ParamSpec:
        where = f"optuna.params.{key}"
        if not isinstance(node, dict):
            raise TypeError(f"{where} must be a mapping {{type, low, high, log, step, choices}}, got {node!r}")
        unknown = set(node) - {"type", "low", "high", "log", "step", "choices"}
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {sorted(unknown)}")
        kind = node.get("type")
        if kind == "categorical":
            choices = node.get("choices")
            if not isinstance(choices, list) or not choices:
                raise ValueError(f"{where}: a categorical parameter needs a non-empty list `choices`")
            if any(c is not None and not isinstance(c, (bool, int, float, str)) for c in choices):
                raise ValueError(f"{where}: choices must be numbers, strings, booleans or null")
            return cls(key, kind, choices=choices)
        if kind not in ("float", "int"):
            raise ValueError(f"{where}: type must be float, int or categorical, got {kind!r}")
        number = float if kind == "float" else int
        try:
            low, high = number(node["low"]), number(node["high"])
            step = None if node.get("step") is None else number(node["step"])
        except KeyError as missing:
            raise ValueError(f"{where}: a {kind} parameter needs {missing.args[0]!r}") from None
        except (TypeError, ValueError):
            raise ValueError(f"{where}: low/high/step must be {kind} numbers") from None
        log_scale = bool(node.get("log", False))
        if low > high:
            raise ValueError(f"{where}: low={low} > high={high}")
        if log_scale and (low <= 0 or not (step is None or (kind == "int" and step == 1))):
            raise ValueError(f"{where}: log=true needs low > 0 and no step")
        return cls(key, kind, low=low, high=high, log=log_scale, step=step)

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.type == "categorical":
            return trial.suggest_categorical(self.name, self.choices)
        if self.type == "int":
            return trial.suggest_int(self.name, self.low, self.high, step=self.step or 1, log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)

    def override(self, value: Any) -> str:
        return f"{self.key}={format_override_value(value)}"


@dataclass
class StudySpec:
    """The ``optuna:`` node of a composed sweep config, checked."""

    study_name: str
    storage: str
    sweep_dir: Path
    objectives: list[tuple[str, str]]
    n_trials: int
    params: list[ParamSpec]
    sampler: dict = field(default_factory=dict)
    pruner: dict | None = None
    max_consecutive_failures: int = 3
    liveness: Liveness = field(default_factory=Liveness)

    @classmethod
    def from_config(cls, cfg: DictConfig) -> StudySpec:
        node = cfg.get("optuna")
        if node is None or OmegaConf.is_missing(node, "study_name"):
            raise ValueError("no study: pass hparams_search=<study> naming a file of conf/hparams_search/ "
                             "with an `optuna:` node (study_name, objectives, n_trials, params)")
        spec = OmegaConf.to_container(node, resolve=True)
        name = str(spec["study_name"])
        if not re.fullmatch(r"[\w.\-]+", name):
            raise ValueError(f"optuna.study_name={name!r}: use letters, digits, '_', '-' or '.' (it names files)")
        if ("objectives" in spec) == ("directions" in spec):
            raise ValueError("optuna: give exactly one of `objectives` or `directions` "
                             "(an ordered mapping metric -> maximize|minimize)")
        raw_objectives = spec.get("objectives", spec.get("directions"))
        if not isinstance(raw_objectives, dict) or not raw_objectives:
            raise ValueError("optuna.objectives must be a non-empty mapping metric -> maximize|minimize")
        objectives = [(str(metric), normalize_direction(d)) for metric, d in raw_objectives.items()]
        if not isinstance(spec.get("params"), dict) or not spec["params"]:
            raise ValueError("optuna.params must be a non-empty mapping training-config key -> distribution")
        params = [ParamSpec.from_config(str(key), value) for key, value in spec["params"].items()]
        pruner = spec.get("pruner")
        if pruner is not None:
            if len(objectives) > 1:
                raise ValueError("optuna.pruner: Optuna does not support pruning for multi-objective studies; "
                                 "set optuna.pruner=null or keep one objective")
            if not isinstance(pruner, dict) or pruner.get("name") != "median":
                raise ValueError(f"optuna.pruner must be null or {{name: median, ...}}, got {pruner!r}")
        if "fail_running_on_start" in spec:
            raise ValueError("optuna.fail_running_on_start was removed: trials of a driver that died are found by "
                             "their heartbeat (optuna.heartbeat_interval, optuna.grace_period, optuna.max_retry), "
                             "so several drivers can share a study; delete the key")
        n_trials = int(spec.get("n_trials", 0))
        if n_trials < 1:
            raise ValueError(f"optuna.n_trials must be >= 1, got {spec.get('n_trials')!r}")
        return cls(
            study_name=name,
            storage=str(spec["storage"]),
            sweep_dir=Path(spec.get("sweep_dir") or Path(cfg.paths.log_dir) / "sweeps" / name),
            objectives=objectives,
            n_trials=n_trials,
            params=params,
            sampler=dict(spec.get("sampler") or {}),
            pruner=pruner,
            max_consecutive_failures=int(spec.get("max_consecutive_failures", 3)),
            liveness=Liveness(**{key: int(spec[key]) for key in ("heartbeat_interval", "grace_period", "max_retry")
                                 if spec.get(key) is not None}),
        )

    def make_sampler(self, seed_offset: int = 0) -> optuna.samplers.BaseSampler:
        options = dict(self.sampler)
        name = options.pop("name", None) or ("tpe" if len(self.objectives) == 1 else "nsga2")
        classes = {"tpe": optuna.samplers.TPESampler, "nsga2": optuna.samplers.NSGAIISampler,
                   "random": optuna.samplers.RandomSampler}
        if name not in classes:
            raise ValueError(f"optuna.sampler.name={name!r} must be one of {sorted(classes)} (or null)")
        seed = options.pop("seed", None)
        return classes[name](seed=None if seed is None else int(seed) + seed_offset, **options)

    def make_pruner(self) -> optuna.pruners.BasePruner:
        if self.pruner is None:
            return optuna.pruners.NopPruner()
        options = {k: v for k, v in self.pruner.items() if k != "name"}
        return optuna.pruners.MedianPruner(**options)


def check_objectives(spec: StudySpec, train_cfg: DictConfig) -> None:
    """Refuse, before the first trial, an objective that no trial of ``train_cfg`` can produce.

    The metrics a run can return are those its module class declares (``logged_metrics()`` of
    :class:`~cirlab.models.restoration.RestorationModule`: keys, or ``fnmatch`` patterns for
    grid/level labels), less ``test/*`` and ``test_grid/*`` when the config has ``test: false``.
    A module that declares nothing is not checked (its metrics stay known only after a run).

    Raises:
        ValueError: naming ``optuna.objectives.<key>`` and listing the valid names.
    """
    from fnmatch import fnmatchcase

    from hydra.utils import get_class

    target = OmegaConf.select(train_cfg, "model._target_", default=None)
    if not target:
        return
    module = get_class(str(target))
    declared = getattr(module, "logged_metrics", None)
    if declared is None:
        return
    valid = list(declared())
    if not train_cfg.get("test", True):
        valid = [k for k in valid if not k.startswith(("test/", "test_grid/"))]
    for metric, _ in spec.objectives:
        if not any(fnmatchcase(metric, pattern) for pattern in valid):
            test_only = not train_cfg.get("test", True) and metric.startswith(("test/", "test_grid/"))
            why = "trials run with test=false, so no test metric is produced" if test_only else \
                f"{target} logs no such metric"
            raise ValueError(f"optuna.objectives.{metric}: {why}; valid names (* stands for a grid or level "
                             f"label): {', '.join(valid)}")
