"""Evaluation protocols: what a protocol is given, what it returns, and how ``cirlab-eval`` picks one.

A protocol is a config in ``conf/protocol/<name>.yaml`` plus one function. The config names the
function in ``runner`` (a dotted path); everything else in the config is the protocol's own
settings, which the function reads from ``cfg.protocol``::

    # conf/protocol/grid.yaml
    name: grid
    runner: cirlab.evaluation.grid.run_grid
    grid: cresmd27
    ...

Adding a protocol is a new config and a function with the signature of :data:`Runner`:
``runner(cfg, restorers, out_dir) -> ProtocolResult``. ``restorers`` are loaded
(:func:`cirlab.evaluation.restorers.load_restorer`, names unique, in the order given); the
function checks that each model can run the protocol before any work starts (a clear
``ValueError`` naming the model otherwise), writes its own detailed files under ``out_dir``
and returns a :class:`ProtocolResult`, from which :mod:`cirlab.evaluation.compare` writes the
one comparison table and plot of the call.

Test images (:func:`resolve_images`): ``cfg.images`` is a folder of clean images (PNG, BMP,
TIFF, JPEG) or the name of a set in :data:`NAMED_SETS` (looked up under ``paths.data_dir``);
null means the protocol's default.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

#: Names accepted by ``images=``: folder under ``paths.data_dir``.
NAMED_SETS: dict[str, str] = {"cbsd68": "CBSD68", "live1": "LIVE1", "set5": "Set5", "classic5": "Classic5"}


@dataclass
class ProtocolResult:
    """What a protocol hands back for the comparison of its models.

    Attributes:
        protocol: the protocol's name (``grid``, ``levels``, ...).
        metrics: the quality columns, in table order, e.g. ``["psnr", "ssim"]``; the first is the
            plot's y axis.
        quality: ``{model name: {metric: value}}`` (averages over the protocol's images and points).
        flops: ``{model name: FLOPs}`` of the protocol's workload (2 per multiply-add).
        workload: ``{"tasks": T, "height": H, "width": W, "text": description}``: what ``flops``
            restore (``flops / tasks`` is the cost per inference).
        kinds: ``{model name: restorer kind}``.
        higher_is_better: per metric; default True.
        notes: lines for the table's header (image set, channel, conventions).
        files: detailed files the protocol wrote.
        details: anything else worth keeping in ``comparison.json`` (plain JSON values).
    """

    protocol: str
    metrics: list[str]
    quality: dict[str, dict[str, float]]
    flops: dict[str, int]
    workload: dict[str, Any]
    kinds: dict[str, str] = field(default_factory=dict)
    higher_is_better: dict[str, bool] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = list(self.quality)
        if set(names) != set(self.flops):
            raise ValueError(f"protocol {self.protocol!r}: quality for {names} but FLOPs for {list(self.flops)}")
        for name, values in self.quality.items():
            missing = [m for m in self.metrics if m not in values]
            if missing:
                raise ValueError(f"protocol {self.protocol!r}: model {name!r} lacks metric(s) {missing}")
        if int(self.workload.get("tasks", 0)) < 1:
            raise ValueError(f"protocol {self.protocol!r}: workload needs tasks >= 1, got {self.workload}")

    @property
    def models(self) -> list[str]:
        return list(self.quality)

    def per_inference(self, name: str) -> float:
        """FLOPs of one inference: the workload's FLOPs over its task count (TASNet's prefix amortised)."""
        return self.flops[name] / int(self.workload["tasks"])

    def to_json(self) -> dict:
        def clean(value: float) -> float | None:
            return None if isinstance(value, float) and not math.isfinite(value) else value

        return {"protocol": self.protocol, "metrics": self.metrics, "workload": self.workload, "notes": self.notes,
                "models": [{"name": name, "kind": self.kinds.get(name, ""),
                            **{m: clean(float(v)) for m, v in self.quality[name].items()},
                            "flops": int(self.flops[name]), "flops_per_inference": self.per_inference(name)}
                           for name in self.models],
                "files": [str(p) for p in self.files], "details": self.details}


#: ``runner(cfg, restorers, out_dir) -> ProtocolResult``
Runner = Callable[[DictConfig, Sequence[Any], Path], ProtocolResult]


def protocol_name(cfg: DictConfig) -> str:
    protocol = cfg.get("protocol")
    if protocol is None or not protocol.get("name"):
        raise ValueError("protocol: no protocol selected; use protocol=grid, protocol=levels (conf/protocol/)")
    return str(protocol.name)


def get_runner(cfg: DictConfig) -> Runner:
    """The function ``cfg.protocol.runner`` names; a ``ValueError`` naming the key if it cannot be imported."""
    from cirlab.checkpoints import import_target

    name = protocol_name(cfg)
    target = cfg.protocol.get("runner")
    if not target:
        raise ValueError(f"protocol.runner is not set for protocol {name!r} (conf/protocol/{name}.yaml): the dotted "
                         "path of the function that runs it")
    try:
        runner = import_target(str(target))
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(f"protocol.runner={target!r} (protocol {name!r}) cannot be imported: {error}") from None
    if not callable(runner):
        raise ValueError(f"protocol.runner={target!r} is not a function")
    return runner


def resolve_images(cfg: DictConfig, default: str | Path | None, key: str = "images") -> Path:
    """The folder of clean test images: ``cfg.images`` (a folder or a name of :data:`NAMED_SETS`),
    else ``default``. A ``FileNotFoundError`` naming the key and the folder if it is not there."""
    value = cfg.get(key)
    source = key
    if value in (None, ""):
        value, source = default, f"{key} (protocol {protocol_name(cfg)}'s default)"
    if value in (None, ""):
        raise ValueError(f"{key}: no test images; give {key}=<folder of clean images> or one of {sorted(NAMED_SETS)}")
    text = str(value)
    if text.lower() in NAMED_SETS and not Path(text).is_dir():
        folder = Path(cfg.paths.data_dir) / NAMED_SETS[text.lower()]
        if not folder.is_dir():
            raise FileNotFoundError(f"{key}={text}: the named set is looked up as {folder}, which is not a folder "
                                    f"(set paths.data_dir, or give {key}=<folder>)")
        return folder
    folder = Path(text)
    if not folder.is_dir():
        raise FileNotFoundError(f"{source}={text!r}: no such folder of clean images "
                                f"(or use one of the named sets {sorted(NAMED_SETS)})")
    return folder


def workload_size(cfg: DictConfig) -> tuple[int, int]:
    """``protocol.flops_resolution``: [H, W] or ``HxW`` / a name of :data:`cirlab.tasks.RESOLUTIONS`."""
    from cirlab.tasks import HD, parse_resolutions

    value = cfg.protocol.get("flops_resolution")
    if value is None:
        return HD
    if isinstance(value, str):
        return parse_resolutions(value, key="protocol.flops_resolution")[0]
    values = list(value)
    if len(values) != 2 or any(int(v) < 1 for v in values):
        raise ValueError(f"protocol.flops_resolution={values} must be [height, width] with positive sides")
    return int(values[0]), int(values[1])
