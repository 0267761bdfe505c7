"""Tiny real checkpoints of every cirlab kind, for the evaluation tests (restorers, protocols,
comparison). Each is the file a run writes: a module checkpoint (``state_dict`` with ``net.*``,
``hyper_parameters``, ``cirlab_module``) or a standalone ``tasnet.ckpt``; networks are nf 8, nb 2."""

from __future__ import annotations

from pathlib import Path

import torch

from tasnet_testing import NB, NF, search_state

ADAM = {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-3}
KINDS = ("cresmd", "tsnet_search", "tasnet_search", "tasnet", "tasnet_finetune", "hyperres", "hyperres_dedicated",
         "hyperres_3d")


def save_module(module, path: Path) -> Path:
    """What Lightning's checkpoint holds for loading: weights, hyper-parameters, the module class."""
    import lightning

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                  "pytorch-lightning_version": lightning.__version__}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return path


def make_checkpoint(kind: str, folder: Path, seed: int = 0, task: str = "denoise") -> Path:
    """A tiny checkpoint of ``kind`` (one of :data:`KINDS`) under ``folder``; returns its path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    path = folder / f"{kind}.ckpt"
    if kind == "cresmd":
        from cirlab.models.cresmd import CResMD

        return save_module(CResMD(net={"_target_": "cirlab.archs.cresmd.CResMDNet", "nf": NF, "nb": NB}, optimizer=ADAM),
                           path)
    if kind in ("tsnet_search", "tasnet_search"):
        from cirlab.models.tasnet_search import TASNetSearch

        sharing = kind == "tasnet_search"
        state = search_state(3 if sharing else 0, seed=seed)
        module = TASNetSearch(net={"_target_": "cirlab.archs.tasnet_search.TASNetSearchNet", "nf": NF, "nb": NB,
                                   "controller_hidden": 8, "decision": "batch", "sharing": sharing},
                              optimizer=ADAM, decision_samples=0)
        module.net.load_state_dict(state.state_dict())
        return save_module(module, path)
    if kind in ("tasnet", "tasnet_finetune"):
        from cirlab.derivation import derive

        derived = derive(search_state(3, seed=seed)).save(folder / "tasnet.ckpt")
        if kind == "tasnet":
            return derived
        from cirlab.models.tasnet_finetune import TASNetFinetune

        return save_module(TASNetFinetune(optimizer=ADAM, derived_ckpt=str(derived)), path)
    if kind in ("hyperres", "hyperres_dedicated"):
        from cirlab.models.hyperres import HyperRes

        target = "cirlab.archs.hyperres.MainNet" if kind == "hyperres_dedicated" else "cirlab.archs.hyperres.HyperResNet"
        levels = [25.0] if kind == "hyperres_dedicated" else [15.0, 35.0]
        if task == "dejpeg":
            levels = [30.0] if kind == "hyperres_dedicated" else [10.0, 50.0]
        return save_module(HyperRes(net={"_target_": target, "nf": NF, "nb": NB}, optimizer=ADAM, task=task,
                                    train_levels=levels), path)
    if kind == "hyperres_3d":
        from cirlab.models.hyperres import HyperRes3D

        return save_module(HyperRes3D(net={"_target_": "cirlab.archs.hyperres.HyperResNet", "nf": NF, "nb": NB,
                                           "cond_dim": 3}, optimizer=ADAM), path)
    raise ValueError(f"unknown kind {kind!r}; one of {KINDS}")
