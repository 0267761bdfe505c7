"""TASNet search machinery: the gate, the sharing decision, the prefix, the regularisers."""

from __future__ import annotations

import pytest
import torch

from cirlab.archs.tasnet_search import (
    ChannelController,
    TASNetSearchNet,
    agreement,
    disagreement,
    gate,
    sharing_decision,
)
from tasnet_testing import AGREEING_BATCH, MIXED_BATCH, task_dependent_net


def test_gate_forward_is_the_indicator_and_backward_the_sigmoid_derivative():
    z = torch.tensor([-2.0, -0.1, 0.0, 0.3, 5.0], requires_grad=True)
    values = gate(z)
    assert values.tolist() == [0.0, 0.0, 0.0, 1.0, 1.0]
    values.sum().backward()
    sig = torch.sigmoid(z.detach())
    torch.testing.assert_close(z.grad, sig * (1 - sig))


def test_agreement_threshold_of_eq6():
    agnostic = torch.tensor([1.0, 1.0, 0.0, 0.0])
    specific = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 1.0, 0.0]])  # overlaps 2 and 1 -> mean 1.5
    assert bool(agreement(specific, agnostic, gamma=0.7))  # 1.5 > 1.4
    assert not bool(agreement(specific, agnostic, gamma=0.8))  # 1.5 > 1.6 fails


def test_phi_is_the_running_product_of_eta():
    eta = torch.tensor([True, True, False, True, True])
    assert sharing_decision(eta).tolist() == [True, True, False, False, False]
    assert sharing_decision(torch.tensor([False, True])).tolist() == [False, False]
    assert sharing_decision(torch.ones(4, dtype=torch.bool)).all()


def test_controllers_start_with_every_channel_on():
    controller = ChannelController(3, 16, hidden=8, init_bias=3.0)
    assert (gate(controller(torch.rand(5, 3))) == 1).all()


def test_search_net_keeps_the_reference_supernetwork_and_n67_maps():
    net = TASNetSearchNet()
    assert net.num_maps == 67
    assert sum(p.numel() for p in net.supernet.parameters()) == 2_559_759
    assert "supernet.recon_trunk.31.local_scale.weight" in net.state_dict()


def tiny_net(**kwargs) -> TASNetSearchNet:
    torch.manual_seed(0)
    return TASNetSearchNet(nf=8, nb=2, controller_hidden=8, **kwargs)


def test_shared_prefix_does_not_depend_on_the_task_vector():
    net = tiny_net()
    net.train()
    x = torch.rand(2, 3, 16, 16)
    net.search_forward(x, torch.rand(2, 3))  # sets phi (all maps agree at the start: all shared)
    with torch.no_grad():  # make the controllers task-dependent and unshare the tail
        for controller in net.controllers:
            controller.fc2.weight.normal_(std=2.0)
    net.phi[4:] = False
    net.eval()
    same_image = x[:1].expand(2, -1, -1, -1)
    a = net.search_forward(same_image, torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]), keep_maps=True)
    for index in range(4):  # shared maps: identical for both tasks
        torch.testing.assert_close(a.maps[index][0], a.maps[index][1], rtol=0, atol=0)
    assert not torch.allclose(a.output[0], a.output[1])  # the task-specific part does depend on t


def test_training_step_updates_ema_and_decision():
    net = tiny_net(gamma=0.5, ema_momentum=0.5)
    net.train()
    out = net.search_forward(torch.rand(3, 3, 16, 16), torch.rand(3, 3))
    assert bool(net.ema_started) and net.phi.all()
    assert out.output.shape == (3, 3, 16, 16)
    before = net.z_agnostic.clone()
    with torch.no_grad():
        for controller in net.controllers:
            controller.fc2.bias.fill_(-1.0)
    net.search_forward(torch.rand(3, 3, 16, 16), torch.rand(3, 3))
    assert (net.z_agnostic < before).all()  # moved half-way toward the new batch mean


def test_sharing_disabled_gives_no_shared_map():
    net = tiny_net(sharing=False)
    net.train()
    net.search_forward(torch.rand(2, 3, 16, 16), torch.rand(2, 3))
    assert net.shared_maps() == 0


def test_gamma_one_never_shares_and_gamma_zero_shares_all_with_any_channel_on():
    for gamma, expected in ((1.0, 0), (0.0, 7)):
        net = tiny_net(gamma=gamma)
        net.train()
        net.search_forward(torch.rand(2, 3, 16, 16), torch.rand(2, 3))
        assert net.shared_maps() == expected


def test_disagreement_counts_only_maps_after_a_shared_one():
    agnostic = [torch.ones(4), torch.ones(4), torch.ones(4)]
    specific = [torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(2, 4)]
    phi = torch.tensor([True, False, False])  # phi_0 = 1, phi_1 = 1, phi_2 = 0 -> maps 1 and 2 count
    assert float(disagreement(specific, agnostic, phi)) == pytest.approx(16 / 24)
    phi = torch.tensor([False, False, False])  # only map 1 (after the input) counts
    assert float(disagreement(specific, agnostic, phi)) == pytest.approx(8 / 24)


def reference_masked_forward(net: TASNetSearchNet, x, task, masks, phi):
    """The search network written plainly: every map multiplied by its mask (M, C)."""
    sn = net.supernet
    f = sn.conv_first(x) * masks[0][:, :, None, None]
    for i, block in enumerate(sn.recon_trunk):
        inner = torch.relu(block.conv1(f)) * masks[1 + 2 * i][:, :, None, None]
        scale = net.agnostic_scale[i].expand(x.shape[0], -1) if phi[2 + 2 * i] else block.local_scale(task)
        f = (f + block.conv2(inner) * scale[:, :, None, None]) * masks[2 + 2 * i][:, :, None, None]
    up = torch.relu(sn.pixel_shuffle(sn.upconv(f))) * masks[-2][:, :, None, None]
    hr = torch.relu(sn.HRconv(up)) * masks[-1][:, :, None, None]
    return x + sn.conv_last(hr) * sn.global_scale(task)[:, :, None, None]


@pytest.mark.parametrize("shared", [0, 3, 7])
def test_folded_shared_masks_equal_multiplied_masks_and_pass_gradients(shared):
    net = tiny_net()
    with torch.no_grad():
        for controller in net.controllers:
            controller.fc2.weight.normal_(std=3.0)
            controller.fc2.bias.normal_(std=1.0)
    net.train()
    x, task = torch.rand(3, 3, 16, 16), torch.rand(3, 3)
    net.search_forward(x, task)  # start the EMA
    net.eval()
    net.phi.zero_()
    net.phi[:shared] = True
    result = net.search_forward(x, task)
    assert any((m == 0).any() for m in result.masks)  # some channels really are off
    expected = reference_masked_forward(net, x, task, [m.detach() for m in result.masks], net.phi.tolist())
    torch.testing.assert_close(result.output, expected, rtol=1e-5, atol=1e-6)
    result.output.sum().backward()
    assert all(c.fc2.weight.grad is not None for c in net.controllers)


# --------------------------------------------------------------------------- the decision's task set
def test_the_batch_rule_decides_on_whichever_tasks_the_last_batch_held():
    """Why the decision moved to a declared task set: with the batch rule two batches at the
    same weights give different architectures."""
    decisions = []
    for tasks in (AGREEING_BATCH, MIXED_BATCH):
        net = task_dependent_net(decision="batch").train()
        net.search_forward(torch.rand(4, 3, 8, 8), tasks)
        decisions.append(net.shared_maps())
    assert decisions[0] == 7 and decisions[1] < 7


def test_declared_decision_depends_on_the_weights_not_on_the_batch():
    net = task_dependent_net().train()
    states = []
    for tasks in (AGREEING_BATCH, MIXED_BATCH, torch.rand(16, 3)):
        net.search_forward(torch.rand(tasks.shape[0], 3, 8, 8), tasks)
        states.append((net.phi.clone(), net.eta.clone(), net.z_agnostic.clone()))
    for phi, eta, z in states[1:]:
        assert torch.equal(phi, states[0][0]) and torch.equal(eta, states[0][1]) and torch.equal(z, states[0][2])
    # z^a is eq. 5 over the declared set, and eta is eq. 6 over that set
    declared = [c(net.decision_tasks) for c in net.controllers]
    torch.testing.assert_close(net.z_agnostic, torch.stack([z.mean(dim=0) for z in declared]))
    expected = torch.stack([agreement((z > 0).float(), (z.mean(dim=0) > 0).float(), net.gamma) for z in declared])
    assert torch.equal(net.eta, expected) and torch.equal(net.phi, sharing_decision(expected))
    assert 0 < net.shared_maps() < 7  # these controllers: a shared prefix and a task-specific rest


def test_declared_z_agnostic_carries_the_gradient_to_every_controller_through_the_declared_set():
    net = task_dependent_net().train()
    net.set_decision_tasks(torch.rand(40, 3))
    result = net.search_forward(torch.rand(2, 3, 8, 8), torch.rand(2, 3))
    torch.stack([ga.sum() for ga in result.gates_agnostic]).sum().backward()
    assert all(c.fc2.weight.grad is not None and c.fc2.weight.grad.abs().sum() > 0 for c in net.controllers)


def test_decide_recomputes_the_decision_from_the_weights():
    net = task_dependent_net().train()
    net.search_forward(torch.rand(2, 3, 8, 8), torch.rand(2, 3))
    expected = net.phi.clone(), net.z_agnostic.clone()
    net.phi.fill_(True)
    net.z_agnostic.zero_()
    net.decide()
    assert torch.equal(net.phi, expected[0]) and torch.equal(net.z_agnostic, expected[1])
    with pytest.raises(ValueError, match="decision='batch'"):
        tiny_net(decision="batch").decide()


def test_decision_settings_name_the_key():
    with pytest.raises(ValueError, match="model.net.decision='last'"):
        tiny_net(decision="last")
    with pytest.raises(ValueError, match=r"decision tasks must be \(K >= 1, 3\)"):
        tiny_net().set_decision_tasks(torch.zeros(0, 3))


def test_a_declared_set_of_another_size_survives_a_reload():
    net = task_dependent_net()
    net.set_decision_tasks(torch.rand(50, 3))
    fresh = tiny_net()
    fresh.load_state_dict(net.state_dict(), strict=True)
    assert torch.equal(fresh.decision_tasks, net.decision_tasks)


def test_during_the_warm_up_nothing_is_shared_but_agreement_is_still_measured():
    net = task_dependent_net()
    net.sharing_on.fill_(False)
    net.search_forward(torch.rand(4, 3, 8, 8), AGREEING_BATCH)
    assert net.shared_maps() == 0 and net.eta.any() and (net.agreement > 0).any()
    net.sharing_on.fill_(True)
    net.search_forward(torch.rand(4, 3, 8, 8), AGREEING_BATCH)
    assert net.shared_maps() > 0
    fresh = tiny_net()  # a state dict from before the warm-up existed loads with sharing on
    state = {k: v for k, v in net.state_dict().items() if k != "sharing_on"}
    net.sharing_on.fill_(False)
    fresh.load_state_dict(state, strict=True)
    assert bool(fresh.sharing_on)


def test_a_map_no_task_selects_ends_the_prefix():
    """Eq. 6 is strict: a map whose task-agnostic selection is empty has eta = 0 (0 > gamma * 0
    is false) even when no task selects a channel either; in the embedded searches such a map
    (an inner map switched off by R1 during the warm-up) is where the shared prefix ends."""
    empty = torch.zeros(4)
    assert not bool(agreement(torch.zeros(3, 4), empty, gamma=0.0))
    eta = torch.tensor([True, True, bool(agreement(torch.zeros(3, 4), empty, gamma=0.5)), True])
    assert sharing_decision(eta).tolist() == [True, True, False, False]
