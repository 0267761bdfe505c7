"""Networks as files others can use: ``<name>.safetensors`` (weights) + ``<name>.json`` (how to build it).

The pair holds one plain network of :mod:`cirlab.archs` (CResMDNet, the derived TASNet,
TASNetSearchNet, HyperResNet scalar or 3-D, MainNet) and nothing of training: no optimiser,
no Lightning state, no pickled objects. Reading it back (:func:`load_exported`) needs only
``torch``, ``safetensors``, ``json`` and :mod:`cirlab.archs`; this module imports nothing else
at import time (the checkpoint readers used by :func:`export_checkpoint` are imported inside it).

``<name>.json`` (:data:`FORMAT`, version :data:`FORMAT_VERSION`)::

    {"format": "cirlab.export", "format_version": 1,
     "class": "cirlab.archs.tasnet.TASNet",          # always a class under cirlab.archs
     "args": {"architecture": {...}},                # keyword arguments of the constructor
     "weights": "<name>.safetensors", "sha256": "...",  # the weight file next to it and its digest
     "parameters": 12345, "tensors": 40,             # numel of parameters; entries of the weight file
     "cirlab_version": "0.1.0", "source_checkpoint": "/path/to/last.ckpt", "source_kind": "..."}

For a TASNet ``args.architecture`` is the content of ``architecture.json`` (``cirlab-derive``).
The weight file's tensors are the network's ``state_dict`` (parameters and persistent buffers,
fp32 as trained), loaded with ``strict=True``. Its safetensors header metadata repeats
``format`` and ``class`` so a lone weight file still says what it is.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

#: ``format`` entry of an export's JSON (and of its safetensors metadata).
FORMAT = "cirlab.export"
#: Version of the JSON layout above; a reader refuses newer ones.
FORMAT_VERSION = 1
#: Only classes under this package are built from an export (a JSON cannot name arbitrary code).
ARCHS_PACKAGE = "cirlab.archs."


class ExportError(ValueError):
    """An export file that is missing, damaged, foreign or inconsistent; the message names the file."""


# ----------------------------------------------------------------------------------------- reading
def _json_of(source: str | Path) -> Path:
    """The JSON path of ``source``: either file of a pair, or a folder holding one pair."""
    path = Path(source)
    if path.is_dir():
        found = sorted(path.glob("*.json"))
        found = [p for p in found if p.with_suffix(".safetensors").is_file()]
        if len(found) != 1:
            names = ", ".join(p.name for p in found) or "none"
            raise ExportError(f"{path}: a folder must hold exactly one <name>.json + <name>.safetensors pair "
                              f"(found {len(found)}: {names}); pass the file itself")
        path = found[0]
    if path.suffix not in (".json", ".safetensors"):
        raise ExportError(f"{path}: not a cirlab export (expected <name>.json or <name>.safetensors)")
    json_path = path.with_suffix(".json")
    if not json_path.is_file():
        raise FileNotFoundError(f"{json_path}: no such file (the architecture JSON of the export {path.stem!r})")
    return json_path


def read_export_json(json_path: str | Path) -> dict:
    """The checked description of an export (see the module docstring); :class:`ExportError` names
    the file and the first thing wrong with it."""
    json_path = Path(json_path)
    try:
        meta = json.loads(json_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ExportError(f"{json_path}: not valid JSON ({type(error).__name__}: {error}); expected the "
                          "architecture JSON written by cirlab-export") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ExportError(f"{json_path}: not a cirlab export (format {found!r}, expected {FORMAT!r})")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ExportError(f"{json_path}: format_version {version!r} is not readable by this cirlab "
                          f"(reads up to {FORMAT_VERSION}); update cirlab")
    for key, kind in (("class", str), ("args", dict), ("weights", str)):
        if not isinstance(meta.get(key), kind):
            raise ExportError(f"{json_path}: entry {key!r} is missing or not a {kind.__name__}")
    if not meta["class"].startswith(ARCHS_PACKAGE):
        raise ExportError(f"{json_path}: class {meta['class']!r} is not a network of {ARCHS_PACKAGE.rstrip('.')}; "
                          "an export only builds cirlab's own networks")
    if Path(meta["weights"]).name != meta["weights"]:
        raise ExportError(f"{json_path}: 'weights' must be a file name next to the JSON, got {meta['weights']!r}")
    return meta


def _network_class(name: str, json_path: Path) -> type[nn.Module]:
    module_name, _, class_name = name.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError):
        raise ExportError(f"{json_path}: class {name!r} does not exist in this cirlab") from None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ExportError(f"{json_path}: {name!r} is not a network class")
    return cls


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_weights(weights_path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; :class:`ExportError` naming it when it cannot be read."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights_path = Path(weights_path)
    if not weights_path.is_file():
        raise FileNotFoundError(f"{weights_path}: no such file (the weights of a cirlab export)")
    try:
        return load_file(weights_path, device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise ExportError(f"{weights_path}: cannot be read as safetensors (damaged, truncated or another format; "
                          f"{type(error).__name__}: {str(error)[:200]})") from None


def load_exported(source: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """The network of a cirlab export, built from its JSON and filled from its safetensors, in eval mode.

    ``source``: ``<name>.json``, ``<name>.safetensors`` or a folder with exactly one such pair.
    The weight file must be the one the JSON records (same SHA-256) and hold exactly the
    network's ``state_dict`` entries with their shapes; otherwise :class:`ExportError` names the
    file and the mismatch. Needs only :mod:`cirlab.archs`, ``safetensors`` and ``json``.
    """
    json_path = _json_of(source)
    meta = read_export_json(json_path)
    weights_path = json_path.with_name(meta["weights"])
    if not weights_path.is_file():
        raise FileNotFoundError(f"{weights_path}: no such file (the weights {json_path.name} names)")
    recorded = meta.get("sha256")
    if recorded is not None and recorded != _sha256(weights_path):
        raise ExportError(f"{weights_path}: its SHA-256 differs from the one {json_path.name} records "
                          "(damaged, or the weights of another export)")
    state = read_weights(weights_path)
    cls = _network_class(meta["class"], json_path)
    try:
        net = cls(**meta["args"])
    except (TypeError, ValueError, KeyError) as error:
        raise ExportError(f"{json_path}: 'args' do not build {meta['class']} ({type(error).__name__}: "
                          f"{str(error)[:300]})") from None
    expected = net.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ExportError(f"{weights_path}: does not hold the weights of the network {json_path.name} describes "
                          f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items() if state[k].shape != v.shape]
    if wrong:
        raise ExportError(f"{weights_path}: tensor shapes differ from the network {json_path.name} describes: "
                          f"{wrong[:5]}")
    net.load_state_dict(state, strict=True)
    return net.to(map_location).eval()


# ----------------------------------------------------------------------------------------- writing
def constructor_args(net: nn.Module, config: Mapping | None) -> dict[str, Any]:
    """Keyword arguments that rebuild ``net``'s architecture: a TASNet's architecture dict, or the
    network config (``model.net`` without ``_target_``) of the checkpoint that built it."""
    from cirlab.archs.tasnet import TASNet

    if isinstance(net, TASNet):
        return {"architecture": json.loads(json.dumps(net.architecture))}
    if not config:
        raise ValueError(f"no network config recorded for the {type(net).__name__}; cannot describe its architecture")
    # Hydra's own keys (_target_, _partial_, _convert_, ...) are not constructor arguments
    return {k: v for k, v in json.loads(json.dumps(dict(config))).items() if not k.startswith("_")}


def _class_path(net: nn.Module) -> str:
    cls = type(net)
    return f"{cls.__module__}.{cls.__qualname__}"


def _read_source(ckpt: str | Path) -> tuple[nn.Module, Mapping | None, str]:
    """(network, its config, kind) of any cirlab checkpoint, through :mod:`cirlab.checkpoints`."""
    from cirlab.checkpoints import TASNET_FORMAT, CheckpointError, load_module, read_checkpoint, resolve_target

    checkpoint = read_checkpoint(ckpt, key="--ckpt", what="cirlab checkpoint (module checkpoint or tasnet.ckpt)")
    if checkpoint.get("format") == TASNET_FORMAT:
        from cirlab.archs.tasnet import TASNet

        try:
            return TASNet.from_checkpoint(checkpoint), None, "tasnet"
        except (KeyError, ValueError, RuntimeError, TypeError) as error:
            raise CheckpointError(f"--ckpt={str(ckpt)!r}: a standalone TASNet that cannot be rebuilt "
                                  f"({type(error).__name__})") from None
    if not checkpoint.get("cirlab_module"):
        raise CheckpointError(f"--ckpt={str(ckpt)!r}: neither a standalone TASNet (cirlab-derive) nor a cirlab "
                              "module checkpoint (no 'cirlab_module' entry)")
    module = load_module(ckpt, key="--ckpt")
    config = (checkpoint.get("hyper_parameters") or {}).get("net")
    if isinstance(config, Mapping) and "_target_" in config:
        config = {**config, "_target_": resolve_target(config["_target_"])}
    kind = resolve_target(checkpoint["cirlab_module"]).rsplit(".", 1)[-1]
    return module.net, config, kind


def export_network(net: nn.Module, out: str | Path, name: str, *, config: Mapping | None = None,
                   source: str = "", source_kind: str = "") -> tuple[Path, Path]:
    """Write ``out/<name>.safetensors`` and ``out/<name>.json`` (each atomically, weights first) and
    check that the pair rebuilds ``net`` exactly before returning (json path, weights path)."""
    from safetensors.torch import save_file

    import cirlab
    from cirlab.utils.files import atomic_path

    cls_path = _class_path(net)
    if not cls_path.startswith(ARCHS_PACKAGE):
        raise ValueError(f"only networks of {ARCHS_PACKAGE.rstrip('.')} can be exported, got {cls_path}")
    if config is not None and "_target_" in config and config["_target_"] != cls_path \
            and type(net).__name__ != "TASNet":
        raise ValueError(f"the network config builds {config['_target_']}, but the network is a {cls_path}")
    args = constructor_args(net, config)
    if not name or Path(name).name != name or name.startswith("."):
        raise ValueError(f"--name={name!r} must be a plain file name without folders")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out={str(out)!r} is an existing file; give a folder (it is created if missing)")
    out.mkdir(parents=True, exist_ok=True)
    # contiguous private copies: safetensors refuses tensors that share storage
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in net.state_dict().items()}
    weights_path, json_path = out / f"{name}.safetensors", out / f"{name}.json"
    with atomic_path(weights_path) as tmp:
        save_file(state, str(tmp), metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION),
                                             "class": cls_path})
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "class": cls_path, "args": args,
            "weights": weights_path.name, "sha256": _sha256(weights_path),
            "parameters": sum(p.numel() for p in net.parameters()), "tensors": len(state),
            "cirlab_version": cirlab.__version__, "source_checkpoint": str(source), "source_kind": source_kind}
    with atomic_path(json_path) as tmp:
        Path(tmp).write_text(json.dumps(meta, indent=2) + "\n")
    rebuilt = load_exported(json_path)
    for key, value in rebuilt.state_dict().items():
        if not torch.equal(value, state[key]):
            raise RuntimeError(f"{json_path}: the export does not rebuild the network ({key} differs)")
    return json_path, weights_path


def export_checkpoint(ckpt: str | Path, out: str | Path, name: str | None = None) -> tuple[Path, Path]:
    """Export the network of any cirlab checkpoint (module checkpoint of any kind, or a standalone
    ``tasnet.ckpt``) to ``out/<name>.{safetensors,json}``; ``name`` defaults to the checkpoint's
    stem. Errors name the checkpoint (``--ckpt``) or the option before anything is written."""
    ckpt = Path(ckpt)
    net, config, kind = _read_source(ckpt)
    return export_network(net, out, name or ckpt.stem, config=config, source=str(ckpt.resolve()), source_kind=kind)
