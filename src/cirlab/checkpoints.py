"""Reading and writing cirlab's torch files: checkpoints, standalone networks and caches.

Every ``torch.load`` of the suite is in this module, always with ``weights_only=True`` (no
pickled code runs), and every failure to read becomes one :class:`CheckpointError` naming the
file, what it is not and what was expected. The files cirlab writes:

* a **module checkpoint**: a Lightning checkpoint of a cirlab LightningModule, with the class
  path under ``cirlab_module`` and the network's config (``_target_``) in ``hyper_parameters``;
  its network weights are the ``state_dict`` entries prefixed ``net.``;
* a **standalone TASNet** (``cirlab-derive``): ``{"format": "cirlab.tasnet", "architecture",
  "state_dict", "meta"}``, readable without the search code;
* **caches** of generated evaluation sets: plain containers of tensors.

Class paths recorded by runs made before the package's layout changed (``cirlab.models.*`` for
networks, ``cirlab.modules.*`` for LightningModules) still load through :data:`LEGACY_TARGETS`.
"""

from __future__ import annotations

import importlib
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from cirlab.utils.files import atomic_path

#: Class paths written by earlier layouts -> where the class lives now.
LEGACY_TARGETS: dict[str, str] = {
    "cirlab.models.cresmd.CResMDNet": "cirlab.archs.cresmd.CResMDNet",
    "cirlab.models.hyperres.HyperResNet": "cirlab.archs.hyperres.HyperResNet",
    "cirlab.models.hyperres.MainNet": "cirlab.archs.hyperres.MainNet",
    "cirlab.models.search.TASNetSearchNet": "cirlab.archs.tasnet_search.TASNetSearchNet",
    "cirlab.models.tasnet.TASNet": "cirlab.archs.tasnet.TASNet",
    "cirlab.models.tasnet.naive_shared": "cirlab.archs.tasnet.naive_shared",
    "cirlab.modules.cresmd.CResMD": "cirlab.models.cresmd.CResMD",
    "cirlab.modules.hyperres.HyperRes": "cirlab.models.hyperres.HyperRes",
    "cirlab.modules.hyperres.HyperRes3D": "cirlab.models.hyperres.HyperRes3D",
    "cirlab.modules.tasnet_finetune.TASNetFinetune": "cirlab.models.tasnet_finetune.TASNetFinetune",
    "cirlab.modules.tasnet_search.TASNetSearch": "cirlab.models.tasnet_search.TASNetSearch",
}

#: ``format`` entry of a standalone TASNet file.
TASNET_FORMAT = "cirlab.tasnet"


class CheckpointError(ValueError):
    """A file that is not the checkpoint (or cache) a tool expected; the message says which file."""


def _label(path: Path, key: str | None) -> str:
    return f"{key}={str(path)!r}" if key else str(path)


def read_torch_file(path: str | Path, *, what: str = "cirlab checkpoint", key: str | None = None,
                    map_location: str | torch.device = "cpu", mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` with one clear error for a missing, empty, damaged
    or foreign file. ``what`` names the expected content and ``key`` the config key or option
    that gave the path; both go into the message."""
    path = Path(path)
    label = _label(path, key)
    if not path.is_file():
        raise FileNotFoundError(f"{label}: no such file (expected a {what})")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{label}: the file is empty (0 bytes), not a {what}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except (pickle.UnpicklingError, EOFError, OSError, RuntimeError, ValueError, AttributeError, KeyError,
            TypeError, IndexError) as error:
        # torch's own message suggests weights_only=False, which must never be followed for a
        # file of unknown origin: name the file and the cause instead.
        reason = type(error).__name__
        raise CheckpointError(f"{label}: cannot be read as a {what} (damaged, truncated or written by another "
                              f"program; {reason}). Expected a file written by cirlab.") from None


def read_checkpoint(path: str | Path, *, key: str | None = None, what: str = "cirlab checkpoint") -> dict:
    """A checkpoint file as a dict (see :func:`read_torch_file`); a tensor or list is an error."""
    checkpoint = read_torch_file(path, what=what, key=key)
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{_label(Path(path), key)}: holds a {type(checkpoint).__name__}, not a {what} "
                              "(a dict with a state_dict)")
    return checkpoint


def save_torch_file(payload: Any, path: str | Path) -> Path:
    """``torch.save`` through a temporary file: ``path`` is either the old file or the whole new one."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def net_state_dict(checkpoint: Mapping, *, path: str | Path = "", key: str | None = None) -> dict[str, torch.Tensor]:
    """The network weights of a checkpoint: a module checkpoint's ``net.*`` entries without the
    prefix, a standalone network's ``state_dict``, or a plain state dict as it is."""
    state = checkpoint.get("state_dict", checkpoint)
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{_label(Path(path), key)}: has no state_dict of tensors")
    weights = {k[len("net."):]: v for k, v in state.items() if k.startswith("net.")}
    return weights or dict(state)


def resolve_target(target: str) -> str:
    """The current class path of a ``_target_`` or ``cirlab_module`` entry (old layouts aliased)."""
    return LEGACY_TARGETS.get(target, target)


def _resolve_targets(node: Any) -> Any:
    if isinstance(node, Mapping):
        return {k: (resolve_target(v) if k == "_target_" and isinstance(v, str) else _resolve_targets(v))
                for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve_targets(v) for v in node]
    return node


def import_target(target: str) -> Any:
    """The object a (possibly legacy) dotted class path names."""
    module_name, _, name = resolve_target(target).rpartition(".")
    return getattr(importlib.import_module(module_name), name)


def load_module(ckpt_path: str | Path, *, key: str = "ckpt_path", **overrides):
    """Any cirlab LightningModule from its checkpoint (the class is recorded in the file), on CPU.

    ``overrides`` replace constructor arguments (e.g. ``test_iqa=True``). Class paths of earlier
    layouts are mapped through :data:`LEGACY_TARGETS`, in the module path and in the network
    configs of the hyper-parameters alike."""
    checkpoint = read_checkpoint(ckpt_path, key=key, what="cirlab module checkpoint")
    qualified = checkpoint.get("cirlab_module")
    if not qualified:
        kind = "a standalone TASNet (load it with load_network)" if checkpoint.get("format") == TASNET_FORMAT else \
            "not written by a cirlab LightningModule (no 'cirlab_module' entry)"
        raise CheckpointError(f"{_label(Path(ckpt_path), key)} is {kind}")
    label = _label(Path(ckpt_path), key)
    if not isinstance(checkpoint.get("state_dict"), Mapping):
        raise CheckpointError(f"{label}: names {qualified} but holds no state_dict (damaged, or not written by "
                              "Lightning); expected a cirlab module checkpoint")
    try:
        cls = import_target(qualified)
    except (ImportError, AttributeError, ValueError):
        raise CheckpointError(f"{label}: written by module {qualified!r}, which this cirlab does not have") from None
    hparams = checkpoint.get("hyper_parameters") or {}
    resolved = _resolve_targets(hparams)
    changed = {k: v for k, v in resolved.items() if v != hparams.get(k)}
    try:
        return cls.load_from_checkpoint(Path(ckpt_path), map_location="cpu", weights_only=True, **changed,
                                        **overrides)
    except (KeyError, RuntimeError, TypeError) as error:
        # e.g. a missing Lightning entry, weights of another shape, hyper-parameters the class rejects
        raise CheckpointError(f"{label}: a {qualified} checkpoint that cannot be rebuilt ({type(error).__name__}: "
                              f"{str(error).splitlines()[0][:300] if str(error) else ''}); expected one written by "
                              "cirlab-train with this version of cirlab") from None


#: Entries every resumable Lightning checkpoint holds.
RESUME_ENTRIES = ("state_dict", "pytorch-lightning_version", "optimizer_states", "loops")


def check_resume_checkpoint(path: str | Path, expected_module: str | None = None, *,
                            key: str = "ckpt_path") -> dict:
    """Check, before training starts, that ``path`` is a checkpoint ``trainer.fit`` can resume:
    readable (:func:`read_checkpoint`), a full Lightning training state (:data:`RESUME_ENTRIES`),
    written by a cirlab module and, if ``expected_module`` (a ``_target_``) is given, by that
    module's class. Returns the checkpoint; raises :class:`CheckpointError` (or ``FileNotFoundError``)
    naming ``key``, the file, what it is and what resuming expects."""
    what = "Lightning training checkpoint (checkpoints/last.ckpt of a cirlab-train run)"
    checkpoint = read_checkpoint(path, key=key, what=what)
    label = _label(Path(path), key)
    if checkpoint.get("format") == TASNET_FORMAT:
        raise CheckpointError(f"{label} is a standalone TASNet (cirlab-derive), not a {what}; to fine-tune it, "
                              "pass it as model.derived_ckpt with model=tasnet_finetune")
    missing = [entry for entry in RESUME_ENTRIES if entry not in checkpoint]
    if missing:
        raise CheckpointError(f"{label}: not a {what}: it has no {', '.join(repr(m) for m in missing)} entr"
                              f"{'y' if len(missing) == 1 else 'ies'}")
    written_by = checkpoint.get("cirlab_module")
    if not written_by:
        raise CheckpointError(f"{label}: a Lightning checkpoint not written by a cirlab module (no 'cirlab_module' "
                              f"entry); expected a {what}")
    if expected_module and resolve_target(written_by) != resolve_target(expected_module):
        raise CheckpointError(f"{label} was written by {written_by}, but this run trains {expected_module} "
                              "(model=...): resume it with the model config that wrote it")
    return checkpoint


def load_network(source, map_location: str | torch.device = "cpu", *, key: str = "--ckpt") -> torch.nn.Module:
    """A restorable network (TASNet or CResMDNet) from a standalone TASNet file (``cirlab-derive``),
    a cirlab module checkpoint whose ``net`` is one of them (``TASNetFinetune``, ``CResMD``), a
    LightningModule, or the network itself. A network read from a file is put in eval mode; a
    module passed in is left as it is."""
    from cirlab.archs.cresmd import CResMDNet
    from cirlab.archs.tasnet import TASNet

    if isinstance(source, torch.nn.Module):
        net = getattr(source, "net", source)
        loaded = False
    else:
        loaded = True
        checkpoint = read_checkpoint(source, key=key, what="TASNet or cirlab module checkpoint")
        if checkpoint.get("format") == TASNET_FORMAT:
            net = TASNet.from_checkpoint(checkpoint)
            net = net.to(map_location)
        elif checkpoint.get("cirlab_module"):
            net = load_module(source, key=key).net.to(map_location)
        else:
            raise CheckpointError(f"{_label(Path(source), key)} is neither a derived TASNet checkpoint nor a cirlab "
                                  "module checkpoint")
    if not isinstance(net, (TASNet, CResMDNet)):
        hint = " (a search network: run cirlab-derive first)" if type(net).__name__ == "TASNetSearchNet" else ""
        raise ValueError(f"restore needs a TASNet or a CResMDNet, got {type(net).__name__}{hint}")
    return net.eval() if loaded else net


def best_checkpoint_recorded_in(checkpoint_path: str | Path) -> str:
    """The best checkpoint that a Lightning checkpoint's ModelCheckpoint state points to ("" if none
    or if that file is gone)."""
    state = read_checkpoint(checkpoint_path)
    for name, value in (state.get("callbacks") or {}).items():
        path = value.get("best_model_path") if isinstance(value, dict) else None
        if str(name).startswith("ModelCheckpoint") and path and Path(path).is_file():
            return str(path)
    return ""
