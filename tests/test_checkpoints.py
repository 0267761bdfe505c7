"""Every checkpoint read goes through cirlab.checkpoints: clear errors, and old class paths still load."""

from __future__ import annotations

import lightning
import pytest
import torch

from cirlab.archs.cresmd import CResMDNet
from cirlab.checkpoints import (
    CheckpointError,
    load_module,
    load_network,
    net_state_dict,
    read_checkpoint,
    resolve_target,
)
from cirlab.models.cresmd import CResMD

NET = {"_target_": "cirlab.archs.cresmd.CResMDNet", "nf": 8, "nb": 1}
OPTIMIZER = {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-3}


def module_checkpoint(module: CResMD, cirlab_module: str, net_target: str) -> dict:
    """What Lightning's save_checkpoint writes for a cirlab module, with the given class paths."""
    hparams = dict(module.hparams)
    hparams["net"] = {**hparams["net"], "_target_": net_target}
    return {"state_dict": module.state_dict(), "hyper_parameters": hparams, "cirlab_module": cirlab_module,
            "pytorch-lightning_version": lightning.__version__, "epoch": 0, "global_step": 0}


@pytest.fixture
def module() -> CResMD:
    torch.manual_seed(0)
    return CResMD(net=NET, optimizer=OPTIMIZER)


def test_a_checkpoint_written_with_the_old_layouts_class_paths_still_loads(module, tmp_path):
    path = tmp_path / "old.ckpt"
    torch.save(module_checkpoint(module, "cirlab.modules.cresmd.CResMD", "cirlab.models.cresmd.CResMDNet"), path)
    loaded = load_module(path)
    assert type(loaded) is CResMD and type(loaded.net) is CResMDNet
    assert loaded.hparams.net["_target_"] == "cirlab.archs.cresmd.CResMDNet"
    for key, value in module.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert isinstance(load_network(path), CResMDNet)


def test_new_class_paths_load_unchanged(module, tmp_path):
    path = tmp_path / "new.ckpt"
    torch.save(module_checkpoint(module, "cirlab.models.cresmd.CResMD", "cirlab.archs.cresmd.CResMDNet"), path)
    assert type(load_module(path)) is CResMD
    assert resolve_target("cirlab.archs.cresmd.CResMDNet") == "cirlab.archs.cresmd.CResMDNet"


def test_net_state_dict_strips_the_module_prefix(module):
    weights = net_state_dict({"state_dict": module.state_dict()})
    assert set(weights) == set(module.net.state_dict())
    plain = module.net.state_dict()
    assert net_state_dict(plain).keys() == plain.keys()  # a bare state dict passes through


@pytest.mark.parametrize("content, expected", [
    (b"", "empty"),
    (b"\x00\x01garbage that is no zip and no pickle" * 10, "cannot be read"),
    (None, "cannot be read"),  # a truncated real checkpoint
])
def test_a_damaged_file_gets_one_clear_error_naming_it(module, tmp_path, content, expected):
    path = tmp_path / "damaged.ckpt"
    if content is None:
        torch.save(module_checkpoint(module, "cirlab.models.cresmd.CResMD", NET["_target_"]), path)
        content = path.read_bytes()[: path.stat().st_size // 2]
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        load_module(path)
    message = str(info.value)
    assert str(path) in message and expected in message
    assert "weights_only=False" not in message  # torch's advice must never reach a user


def test_foreign_content_names_what_the_file_holds(tmp_path):
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor)
    with pytest.raises(CheckpointError, match="holds a Tensor"):
        read_checkpoint(tensor)
    plain = tmp_path / "plain.pt"
    torch.save({"weights": torch.zeros(3)}, plain)
    with pytest.raises(CheckpointError, match="no 'cirlab_module' entry"):
        load_module(plain)
    with pytest.raises(CheckpointError, match="neither a derived TASNet checkpoint nor a cirlab module"):
        load_network(plain)


def test_a_missing_file_names_the_config_key(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model\.init_ckpt=.*nowhere\.ckpt"):
        read_checkpoint(tmp_path / "nowhere.ckpt", key="model.init_ckpt")


def test_a_module_checkpoint_that_cannot_be_rebuilt_is_named(module, tmp_path):
    no_weights = {k: v for k, v in module_checkpoint(module, "cirlab.models.cresmd.CResMD", NET["_target_"]).items()
                  if k != "state_dict"}
    torch.save(no_weights, tmp_path / "no_weights.ckpt")
    with pytest.raises(CheckpointError, match="holds no state_dict"):
        load_module(tmp_path / "no_weights.ckpt")
    wider = module_checkpoint(module, "cirlab.models.cresmd.CResMD", NET["_target_"])
    wider["hyper_parameters"]["net"] = {**wider["hyper_parameters"]["net"], "nf": 16}  # weights are nf=8
    torch.save(wider, tmp_path / "wider.ckpt")
    with pytest.raises(CheckpointError, match=r"wider\.ckpt.*cannot be rebuilt"):
        load_module(tmp_path / "wider.ckpt")
    unknown = module_checkpoint(module, "cirlab.models.gone.Gone", NET["_target_"])
    torch.save(unknown, tmp_path / "unknown.ckpt")
    with pytest.raises(CheckpointError, match="cirlab.models.gone.Gone"):
        load_module(tmp_path / "unknown.ckpt")


def test_a_resume_checkpoint_must_be_a_full_training_state_of_the_configured_module(module, tmp_path):
    from cirlab.checkpoints import check_resume_checkpoint

    state = {**module_checkpoint(module, "cirlab.modules.cresmd.CResMD", NET["_target_"]), "optimizer_states": [],
             "loops": {}}
    torch.save(state, tmp_path / "old_layout.ckpt")  # an old class path still resumes its module
    assert check_resume_checkpoint(tmp_path / "old_layout.ckpt", "cirlab.models.cresmd.CResMD")["loops"] == {}
    with pytest.raises(CheckpointError, match="this run trains cirlab.models.hyperres.HyperRes"):
        check_resume_checkpoint(tmp_path / "old_layout.ckpt", "cirlab.models.hyperres.HyperRes")
    torch.save({k: v for k, v in state.items() if k != "cirlab_module"}, tmp_path / "foreign.ckpt")
    with pytest.raises(CheckpointError, match="not written by a cirlab module"):
        check_resume_checkpoint(tmp_path / "foreign.ckpt")
