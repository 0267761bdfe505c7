"""Derivation of a TASNet from a search state: equal outputs, physically smaller shared convs,
a standalone checkpoint that reloads without the supernetwork code, the cirlab-derive command."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from cirlab.archs.tasnet import TASNet, naive_shared
from cirlab.cli.derive import main
from cirlab.derivation import derive, derive_checkpoint
from cirlab.tasks import level_grid
from tasnet_testing import (
    AGREEING_BATCH,
    MIXED_BATCH,
    N_MAPS,
    NB,
    NF,
    fake_search_checkpoint,
    search_state,
    task_dependent_net,
)

# (shared maps, whole shared map off, whole task-specific map off): every cut of the prefix
# (inside a block, at a block output, in the tail, all, none) and empty maps on both sides.
STATES = [(s, None, None) for s in range(N_MAPS + 1)] + [
    (0, None, 0), (0, None, 3), (1, 0, 6), (2, 1, 2), (3, 2, 3), (4, 0, 5), (5, 3, 6), (6, 5, None), (7, 4, None),
]


@pytest.mark.parametrize(("shared", "empty_shared", "empty_specific"), STATES)
def test_derived_network_equals_the_masked_search_network(shared, empty_shared, empty_specific):
    search = search_state(shared, seed=shared, empty_shared=empty_shared, empty_specific=empty_specific)
    net = derive(search)
    x, task = torch.rand(6, 3, 13, 18), torch.rand(6, 3)  # odd height
    task[0] = 0.0
    with torch.no_grad():
        result = search.search_forward(x, task)
        expected = result.output
        sliced = net(x, task)  # eval: per-group sliced execution
        net.train()
        masked = net(x, task)  # training: full width times the masks
        net.eval()
        restored = net.restore(x[0], task)
        expected_one = search.search_forward(x[:1].expand(6, -1, -1, -1), task).output
    assert torch.allclose(sliced, expected, atol=1e-5, rtol=0)
    assert torch.allclose(masked, expected, atol=1e-5, rtol=0)
    assert torch.allclose(restored, expected_one, atol=1e-5, rtol=0)
    # the derived state is what the search applied: the same channels per map and task
    state = net.mask_state(task)
    for applied, derived in zip(result.masks, state.masks):
        assert torch.equal(applied.bool(), derived)
    # some channels are off, and differ across tasks where a controller decides
    specific = [m for k, m in enumerate(state.masks) if k >= shared]
    assert not all(bool(m.all()) for m in state.masks)
    if specific and empty_specific is None:
        assert any(not bool((m == m[:1]).all()) for m in specific)


@pytest.mark.parametrize("shared", [0, 3])
def test_masked_training_execution_has_the_gradients_of_the_sliced_one(shared):
    net = derive(search_state(shared, seed=20 + shared))
    x, task, target = torch.rand(4, 3, 14, 14), torch.rand(4, 3), torch.rand(4, 3, 14, 14)
    grads = {}
    for execution in ("sliced", "masked"):
        net.zero_grad()
        net.execution = execution
        torch.nn.functional.l1_loss(net(x, task), target).backward()
        grads[execution] = {k: p.grad.clone() for k, p in net.named_parameters() if p.grad is not None}
    assert grads["sliced"].keys() == grads["masked"].keys() and not any(k.startswith("controllers") for k in grads["sliced"])
    for key, grad in grads["sliced"].items():
        assert torch.allclose(grads["masked"][key], grad, atol=1e-5), key


def test_shared_prefix_is_physically_sliced_and_controllers_only_where_task_specific():
    search = search_state(4, seed=3)
    net = derive(search)
    kept = [torch.nonzero(search.z_agnostic[k] > 0).flatten().tolist() for k in range(4)]
    assert net.conv_first.weight.shape == (len(kept[0]), 3, 3, 3)
    assert net.recon_trunk[0].conv1.weight.shape == (len(kept[1]), len(kept[0]), 3, 3)
    assert net.recon_trunk[0].conv2.weight.shape == (len(kept[2]), len(kept[1]), 3, 3)
    assert net.recon_trunk[0].local_scale is None and net.recon_trunk[0].agnostic_scale.shape == (len(kept[2]),)
    assert net.recon_trunk[1].conv1.weight.shape == (len(kept[3]), len(kept[2]), 3, 3)
    # first task-specific conv: full output width, input sliced to the shared map
    assert net.recon_trunk[1].conv2.weight.shape == (NF, len(kept[3]), 3, 3)
    assert net.recon_trunk[1].local_scale.weight.shape == (NF, 3)
    assert sorted(net.controllers.keys()) == [str(k) for k in range(4, N_MAPS)]
    assert [m["channels"] for m in net.architecture["maps"][:4]] == kept
    assert all(m["selection"] == "controller" for m in net.architecture["maps"][4:])
    params = sum(p.numel() for p in net.parameters())
    assert params < sum(p.numel() for p in search.parameters())


def test_derivation_needs_a_prefix_phi_and_a_started_ema():
    search = search_state(3)
    search.ema_started.fill_(False)
    with pytest.raises(ValueError, match="z_agnostic"):
        derive(search)
    search = search_state(3)
    search.phi[1] = False
    with pytest.raises(ValueError, match="prefix"):
        derive(search)


def test_derived_checkpoint_reloads_standalone_and_gives_identical_output(tmp_path):
    search = search_state(3, seed=5, empty_specific=5)
    fake_search_checkpoint(search, tmp_path / "search.ckpt")
    result = derive_checkpoint(tmp_path / "search.ckpt", tmp_path / "derived", grid="single", height=64, width=96)
    raw = torch.load(result.ckpt_path, map_location="cpu", weights_only=True)  # plain containers only
    assert raw["format"] == "cirlab.tasnet" and raw["meta"]["derived_from"].endswith("search.ckpt")
    x, task = torch.rand(4, 3, 20, 22), torch.rand(4, 3)
    with torch.no_grad():
        expected = search.search_forward(x, task).output
        reloaded = TASNet.load(result.ckpt_path)
        assert torch.allclose(reloaded(x, task), result.net(x, task), atol=1e-6, rtol=0)  # kernels may round differently
        assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), result.net.state_dict().values()))
        assert torch.allclose(reloaded(x, task), expected, atol=1e-5, rtol=0)
    arch = json.loads(result.json_path.read_text())
    assert arch["shared_maps"] == 3 and len(arch["maps"]) == N_MAPS
    summary = arch["summary"]
    assert summary["tasks"] == 7 and summary["maps"][5]["channels_max"] == 0  # the switched-off map
    assert summary["flops_total"] == result.net.flops(level_grid("single"), 64, 96)
    assert 0 < summary["flops_ratio"] < 1
    # the JSON alone rebuilds the same network (fresh weights, same shapes)
    rebuilt = TASNet.from_json(result.json_path)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in reloaded.state_dict().items()}
    assert result.figure_path.stat().st_size > 5_000


def test_loading_a_derived_checkpoint_does_not_touch_the_search_code(tmp_path):
    net = derive(search_state(2, seed=1))
    path = net.save(tmp_path / "tasnet.ckpt")
    code = ("import sys, torch; from cirlab.archs.tasnet import TASNet; net = TASNet.load(sys.argv[1]); "
            "net(torch.rand(1, 3, 8, 8), torch.rand(1, 3)); "
            "assert not any(m.startswith(('cirlab.archs.tasnet_search', 'cirlab.models', 'reference_executors', "
            "'tasnet_testing')) "
            "for m in sys.modules), sorted(m for m in sys.modules if m.startswith('cirlab'))")
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]


def test_cirlab_derive_command(tmp_path, capsys):
    fake_search_checkpoint(search_state(2, seed=2), tmp_path / "search.ckpt")
    assert main(["--ckpt", str(tmp_path / "search.ckpt"), "--out", str(tmp_path / "out"), "--no-figure"]) == 0
    printed = capsys.readouterr().out
    assert "2/7 maps shared" in printed and "tasnet.ckpt" in printed
    assert (tmp_path / "out" / "tasnet.ckpt").is_file() and (tmp_path / "out" / "architecture.json").is_file()
    assert main(["--ckpt", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path / "x")]) == 2
    assert main(["--ckpt", str(tmp_path / "out" / "tasnet.ckpt"), "--out", str(tmp_path / "x")]) == 2
    assert "already a derived" in capsys.readouterr().err


def test_cresmd_as_a_tasnet_and_naive_sharing():
    from cirlab.archs.cresmd import CResMDNet

    torch.manual_seed(0)
    cresmd = CResMDNet(nf=NF, nb=NB).eval()
    x, task = torch.rand(3, 3, 15, 16), torch.rand(3, 3)
    with torch.no_grad():
        assert torch.allclose(TASNet.from_cresmd(cresmd)(x, task), cresmd(x, task), atol=1e-6)
        shared = TASNet.from_cresmd(cresmd, shared_maps=4)
        out = shared.restore(x[0], task)
    # shared prefix: the block outputs inside it use local_scale(0.5), not the task's
    assert shared.recon_trunk[0].local_scale is None and shared.recon_trunk[1].local_scale is not None
    assert out.shape == (3, 3, 15, 16)
    for fraction, maps in ((0.31, 2), (0.62, 5), (0.99, 7)):  # nb=2: 8 convolutions
        assert naive_shared(nf=NF, nb=NB, shared_fraction=fraction).shared_maps == maps
    for fraction, maps in ((0.31, 21), (0.62, 42), (0.99, 67)):  # the reference depth (68 convolutions)
        net = naive_shared(nf=2, nb=32, shared_fraction=fraction)
        assert net.shared_maps == maps and len(net.controllers) == 0


def test_architecture_validation_names_the_problem():
    net = derive(search_state(2))
    arch = json.loads(json.dumps(net.architecture))
    arch["maps"][3]["shared"] = True
    with pytest.raises(ValueError, match="maps\\[3\\]"):
        TASNet(arch)
    arch = json.loads(json.dumps(net.architecture))
    arch["maps"][0]["channels"] = [3, 1]
    with pytest.raises(ValueError, match="sorted"):
        TASNet(arch)
    with pytest.raises(ValueError, match="format"):
        TASNet({**net.architecture, "format": "other"})


# --------------------------------------------------------------------------- the frozen decision
def test_two_derivations_from_one_search_state_with_different_last_batches_give_one_architecture():
    """The decision is frozen over the declared task set, not over whichever tasks the last
    training batch held (with the batch rule these two batches share 7 and 2 maps)."""
    architectures = []
    for tasks in (AGREEING_BATCH, MIXED_BATCH):
        search = task_dependent_net()  # the same weights each time
        search.search_forward(torch.rand(4, 3, 8, 8), tasks)  # a last training step on this batch
        architectures.append(derive(search.eval()).architecture)
    assert architectures[0] == architectures[1]
    assert 0 < sum(m["shared"] for m in architectures[0]["maps"]) < N_MAPS


def test_the_derived_network_computes_what_the_search_network_computes_with_the_frozen_decision():
    search = task_dependent_net()
    search.search_forward(torch.rand(4, 3, 8, 8), AGREEING_BATCH)  # stored decision: every map shared
    net = derive(search.eval())  # recomputed over the declared set and stored back
    assert net.shared_maps == int(search.phi.sum()) < N_MAPS
    x, task = torch.rand(3, 3, 12, 10), torch.rand(3, 3)
    with torch.no_grad():
        torch.testing.assert_close(net(x, task), search.search_forward(x, task).output, atol=1e-5, rtol=0)


def test_checkpoint_derivation_uses_the_declared_set_it_carries(tmp_path):
    search = task_dependent_net()
    search.set_decision_tasks(torch.tensor([[0.25, 0.25, 0.25]]))  # a set of one task: everything agrees
    search.search_forward(torch.rand(4, 3, 8, 8), MIXED_BATCH)
    search.phi.zero_()  # whatever was stored last
    fake_search_checkpoint(search, tmp_path / "search.ckpt")
    result = derive_checkpoint(tmp_path / "search.ckpt", tmp_path / "out", grid="single", height=16, width=16,
                               figure=False)
    arch = json.loads(result.json_path.read_text())
    assert arch["shared_maps"] == N_MAPS
    assert arch["decision"]["rule"] == "declared" and arch["decision"]["tasks"] == 1
    assert arch["decision"]["agreement"]["conv_first"] == 1.0


def test_a_search_checkpoint_from_before_declared_sets_keeps_its_stored_decision(tmp_path):
    search = search_state(3, seed=4)
    fake_search_checkpoint(search, tmp_path / "search.ckpt")
    raw = torch.load(tmp_path / "search.ckpt", weights_only=True)
    del raw["state_dict"]["net.decision_tasks"], raw["hyper_parameters"]["net"]["decision"]
    torch.save(raw, tmp_path / "old.ckpt")
    result = derive_checkpoint(tmp_path / "old.ckpt", tmp_path / "out", grid="single", height=16, width=16,
                               figure=False)
    assert result.net.shared_maps == 3
    assert json.loads(result.json_path.read_text())["decision"]["rule"] == "batch"


def test_tasnet_a_takes_the_architecture_of_the_search_and_the_weights_of_another_cresmd(tmp_path):
    from cirlab.archs.cresmd import CResMDNet

    search = search_state(3, seed=6)
    fake_search_checkpoint(search, tmp_path / "search.ckpt")
    torch.manual_seed(9)
    absolute = CResMDNet(nf=NF, nb=NB)
    torch.save({"state_dict": {f"net.{k}": v for k, v in absolute.state_dict().items()}}, tmp_path / "abs.ckpt")
    tasnet = derive_checkpoint(tmp_path / "search.ckpt", tmp_path / "t", grid="single", height=16, width=16, figure=False)
    tasnet_a = derive_checkpoint(tmp_path / "search.ckpt", tmp_path / "a", grid="single", height=16, width=16,
                                 figure=False, weights=tmp_path / "abs.ckpt")
    assert tasnet_a.net.architecture == tasnet.net.architecture
    kept = tasnet.net.architecture["maps"][0]["channels"]
    assert torch.equal(tasnet_a.net.state_dict()["conv_first.weight"], absolute.conv_first.weight[kept])
    assert torch.equal(tasnet_a.net.state_dict()["recon_trunk.1.conv2.weight"], absolute.recon_trunk[1].conv2.weight)
    with torch.no_grad():
        scale = absolute.recon_trunk[0].local_scale(torch.full((1, 3), 0.5))[0]
    rows = tasnet.net.architecture["maps"][2]["channels"]
    torch.testing.assert_close(tasnet_a.net.state_dict()["recon_trunk.0.agnostic_scale"], scale[rows])
    assert json.loads(tasnet_a.json_path.read_text())["weights_from"].endswith("abs.ckpt")
    assert main(["--ckpt", str(tmp_path / "search.ckpt"), "--out", str(tmp_path / "x"), "--no-figure",
                 "--weights", str(tmp_path / "search.ckpt")]) == 2  # not a CResMD: says so


# --------------------------------------------------------------------------- Table 4's naive sharing
def test_naive_variants_have_the_papers_flops_fractions():
    """TASNet Table 4: 132.0 / 69.5 / 7.0 G of CResMD's 189.1 G (27-point workload): the first 24,
    48 and 67 maps at nb = 32; counting 31 / 62% of the 68 convolutions would give 0.733 / 0.453."""
    from cirlab.archs.flops import cresmd_flops
    from cirlab.archs.tasnet import TABLE4_FLOPS, naive_flops_fraction, table4_shared_maps

    paper = {0.31: 132.0 / 189.1, 0.62: 69.5 / 189.1, 0.99: 7.0 / 189.1}
    assert TABLE4_FLOPS == pytest.approx(paper)
    tasks = level_grid("cresmd27")
    for label, maps in ((0.31, 24), (0.62, 48), (0.99, 67)):
        assert table4_shared_maps(64, 32, label) == maps
        net = naive_shared(nf=64, nb=32, flops_fraction=paper[label])
        fraction = net.flops(tasks, 720, 1280) / cresmd_flops(64, 32, 720, 1280, tasks=27)
        assert net.shared_maps == maps and fraction == pytest.approx(naive_flops_fraction(64, 32, maps))
        assert abs(fraction - paper[label]) < 0.006  # 0.693, 0.373, 0.037
    assert naive_flops_fraction(64, 32, 21) == pytest.approx(0.733, abs=1e-3)  # the layer-count reading of 31%
    with pytest.raises(ValueError, match="give one of flops_fraction, shared_maps, shared_fraction"):
        naive_shared(nf=NF, nb=NB, shared_fraction=0.3, flops_fraction=0.5)
    with pytest.raises(ValueError, match="Table 4's naive-sharing variants"):
        table4_shared_maps(64, 32, 0.5)


def test_the_paper_experiments_and_the_benchmark_build_the_same_naive_variants():
    from cirlab.bench.cost import build_models
    from conftest import compose

    for label, maps in (("31", 24), ("62", 48), ("99", 67)):
        cfg = compose("train", [f"experiment=cresmd_shared{label}_paper"])
        net = naive_shared(**{k: v for k, v in cfg.model.net.items() if k != "_target_"})
        assert net.shared_maps == maps and cfg.sampling.ground_truth == "absolute"
    models, notes = build_models(nf=64, nb=32)
    assert [models[f"CResMD-{label}%shared"].shared_maps for label in (31, 62, 99)] == [24, 48, 67]
    assert any("24, 48, 67 of 67 maps" in note for note in notes)


@pytest.mark.parametrize(("args", "flag"), [
    (["--height", "0"], "--height=0"),
    (["--width", "-5"], "--width=-5"),
    (["--grid", "nope"], "--grid='nope'"),
    (["OUT_IS_A_FILE"], "is an existing file"),
])
def test_bad_derive_options_are_named_before_the_checkpoint_is_read(tmp_path, capsys, args, flag):
    fake_search_checkpoint(search_state(2, seed=2), tmp_path / "search.ckpt")
    out = tmp_path / "out"
    if args == ["OUT_IS_A_FILE"]:
        args = []
        out.write_text("keep")
    assert main(["--ckpt", str(tmp_path / "search.ckpt"), "--out", str(out), "--no-figure", *args]) == 2
    assert flag in capsys.readouterr().err
    assert not out.exists() or out.read_text() == "keep"


def test_a_decision_without_tasnets_shape_is_named(tmp_path, caplog):
    """Every map shared, or a prefix cut by a map pruned away for every task, is recorded in the
    decision summary and warned about; a prefix cut by the tasks' disagreement is not."""
    import logging

    from cirlab.archs.flops import searchable_maps
    from cirlab.derivation import decision_summary, warn_about_shape

    names = [spec.name for spec in searchable_maps(NB, NF)]
    disagreeing = task_dependent_net()
    disagreeing.decide()
    end = decision_summary(disagreeing)["prefix_end"]
    assert end is not None and end["empty"] is False and 0 < end["agreement"] <= disagreeing.gamma
    assert warn_about_shape(decision_summary(disagreeing)) == []

    agreeing = task_dependent_net()
    with torch.no_grad():
        for controller in agreeing.controllers:  # every channel on for every task
            controller.fc2.weight.zero_()
            controller.fc2.bias.fill_(3.0)
        agreeing.controllers[3].fc2.bias.fill_(-1.0)  # map 3 switched off for every task
    agreeing.decide()
    summary = decision_summary(agreeing)
    assert summary["prefix_end"] == {"map": names[3], "agreement": 0.0, "empty": True}
    assert "comes from pruning" in " ".join(warn_about_shape(summary))

    with torch.no_grad():
        agreeing.controllers[3].fc2.bias.fill_(3.0)
    fake_search_checkpoint(agreeing, tmp_path / "search.ckpt")
    with caplog.at_level(logging.WARNING, logger="cirlab.derivation"):
        derive_checkpoint(tmp_path / "search.ckpt", tmp_path / "derived", figure=False)
    assert json.loads((tmp_path / "derived" / "architecture.json").read_text())["decision"]["prefix_end"] is None
    assert "shared every map" in caplog.text
