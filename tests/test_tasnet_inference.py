"""TASNet's inference fast path: in-place execution and folded block scales give the autograd
path's numbers, the sliced-weight / group cache is used under no_grad in eval mode only and is
never stale (new weights by load_state_dict, optimiser steps, mode switches, device/dtype moves),
the grouped pixel shuffle equals F.pixel_shuffle."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from cirlab.archs.tasnet import TASNet
from cirlab.archs.tasnet_runtime import pixel_shuffle_grouped
from cirlab.archs.tasnet_spec import make_architecture
from cirlab.derivation import derive
from tasnet_testing import search_state

TASKS = torch.tensor([[0.0, 0.0, 0.0], [0.25, 0.3, 0.0], [1.0, 1.0, 0.0], [0.0, 0.3, 1.0], [1.0, 0.0, 0.24]])


def tasnet(shared: int = 3, seed: int = 0) -> TASNet:
    return derive(search_state(shared, seed=seed)).eval()


def reference(net: TASNet, image: torch.Tensor, tasks: torch.Tensor) -> torch.Tensor:
    """The plain path (autograd on: no in-place arithmetic, no folding, no cache)."""
    with torch.enable_grad():
        return net.restore(image, tasks).detach()


@pytest.mark.parametrize("shared", [0, 1, 2, 3, 5, 6, 7])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_fast_path_equals_the_autograd_path(shared, layout):
    net = tasnet(shared, seed=30 + shared)
    image = torch.rand(1, 3, 22, 31).contiguous(memory_format=layout)
    expected = reference(net, image, TASKS)
    with torch.no_grad():
        batched = net.restore(image, TASKS)
        one_by_one = net.restore(image, TASKS, max_batch=1)  # batch 1: scales folded into weights
        again = net.restore(image, TASKS)  # from the cache
    for out in (batched, one_by_one, again):
        assert torch.allclose(out, expected, atol=1e-5, rtol=0)
    with torch.inference_mode():
        assert torch.allclose(net.restore(image, TASKS), expected, atol=1e-5, rtol=0)


def test_cache_only_in_eval_without_autograd():
    net = tasnet(2, seed=1)
    image = torch.rand(3, 16, 20)
    reference(net, image, TASKS)
    assert not net.runtime.cache
    net.train()
    with torch.no_grad():
        net.execution = "sliced"
        net(image[None].expand(len(TASKS), -1, -1, -1), TASKS)
    assert not net.runtime.cache
    net.eval()
    with torch.no_grad():
        net.restore(image, TASKS)
    assert any(key[0] == "groups" for key in net.runtime.cache)
    assert any(isinstance(key[0], int) for key in net.runtime.cache)  # sliced conv weights


def test_cache_follows_load_state_dict():
    net = tasnet(3, seed=2)
    other = copy.deepcopy(net)
    with torch.no_grad():
        for name, p in other.named_parameters():
            if not name.startswith("controllers"):
                p.copy_(torch.randn_like(p) * p.std().nan_to_num(0.1))
    image = torch.rand(3, 18, 18)
    with torch.no_grad():
        before = net.restore(image, TASKS)
        net.load_state_dict(other.state_dict())
        after = net.restore(image, TASKS)
    assert not torch.allclose(before, after, atol=1e-3)
    assert torch.allclose(after, reference(other, image, TASKS), atol=1e-5, rtol=0)


@pytest.mark.parametrize("optimiser", ["sgd", "adamw_fused"])
def test_cache_follows_fine_tuning_steps(optimiser):
    """Validation (eval, no_grad) between training steps on the same module sees the new weights,
    also with a fused optimiser, which does not bump the parameters' version counters."""
    net = tasnet(3, seed=4)
    image, target = torch.rand(1, 3, 16, 16), torch.rand(len(TASKS), 3, 16, 16)
    params = [p for n, p in net.named_parameters() if not n.startswith("controllers")]
    opt = (torch.optim.SGD(params, lr=0.5) if optimiser == "sgd"
           else torch.optim.AdamW(params, lr=0.05, fused=True))
    for _ in range(2):
        net.train()
        loss = F.l1_loss(net(image.expand(len(TASKS), -1, -1, -1), TASKS), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        net.eval()
        with torch.no_grad():
            cached = net.restore(image, TASKS)
        assert torch.allclose(cached, reference(net, image, TASKS), atol=1e-5, rtol=0)


def test_in_place_weight_edits_and_moves():
    net = tasnet(3, seed=5)
    image = torch.rand(3, 16, 16)
    specific = net.recon_trunk[1].conv2  # a task-specific conv (map 4)
    with torch.no_grad():
        net.restore(image, TASKS)
        specific.weight.mul_(-2.0)  # in place: the version counter moves
        assert torch.allclose(net.restore(image, TASKS), reference(net, image, TASKS), atol=1e-5, rtol=0)
        specific.weight.data.mul_(0.5)  # behind autograd's back: needs clear_cache()
        net.clear_cache()
        assert torch.allclose(net.restore(image, TASKS), reference(net, image, TASKS), atol=1e-5, rtol=0)
        assert net.runtime.cache
        net.to("cpu")  # .to / .cuda / .half make new parameter tensors: the cache goes
        assert not net.runtime.cache


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_grouped_pixel_shuffle(layout):
    x = torch.rand(2, 4 * 5, 6, 7)
    grouped = x.view(2, 5, 4, 6, 7).transpose(1, 2).reshape(2, 20, 6, 7)  # channel (ij, c) <- (c, ij)
    out = pixel_shuffle_grouped(grouped.contiguous(memory_format=layout))
    assert torch.equal(out, F.pixel_shuffle(x, 2))


def test_cache_is_bounded(monkeypatch):
    import cirlab.archs.tasnet_runtime as runtime_module

    net = tasnet(2, seed=6)
    image = torch.rand(3, 12, 12)
    with torch.no_grad():
        net.restore(image, TASKS)
    full = net.runtime.cache_bytes
    assert full > 0
    monkeypatch.setattr(runtime_module, "SLICE_CACHE_BYTES", full // 2)
    net.clear_cache()
    with torch.no_grad():
        out = net.restore(image, TASKS)
    assert net.runtime.cache_bytes <= full // 2
    assert torch.allclose(out, reference(net, image, TASKS), atol=1e-5, rtol=0)


def test_a_double_precision_network_restores_in_double():
    net = tasnet(2, seed=5)
    image = torch.rand(1, 3, 16, 20)
    expected = reference(net, image, TASKS)
    net = net.double()
    with torch.no_grad():
        out = net.restore(image.double(), TASKS.double())
    assert out.dtype == torch.float64
    assert torch.allclose(out.float(), expected, atol=1e-5, rtol=0)


class _ConvLayouts(torch.overrides.TorchFunctionMode):
    """Records (input channels, output channels, output is channels_last) of every conv2d."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is F.conv2d:
            self.calls.append((args[0].shape[1], out.shape[1], out.stride(1) == 1))
        return out


@pytest.mark.parametrize("grad", [False, True])
def test_thin_maps_keep_a_channels_last_pass_channels_last(grad):
    """A task-specific map of zero or one channel is channels_last and plain-contiguous at once;
    the pass must not fall back to NCHW after it (that made thin derived networks ~1.6x slower)."""
    nf, nb = 8, 3
    channels = [list(range(nf))] * (2 * nb + 3)
    channels[3] = [5]  # recon_trunk.1.inner: one channel
    channels[5] = []  # recon_trunk.2.inner: none (conv2 gives its bias)
    channels[7] = [2]  # upconv.shuffled: one channel (4 conv rows)
    net = TASNet(make_architecture(nf, nb, shared_maps=2, channels=channels)).eval()
    image = torch.rand(1, 3, 20, 26)
    expected = reference(net, image, TASKS[:2])
    for max_batch in (1, None):  # scales folded into weights / a batch of two tasks
        layouts = _ConvLayouts()
        with torch.set_grad_enabled(grad), layouts:
            out = net.restore(image.contiguous(memory_format=torch.channels_last), TASKS[:2], max_batch=max_batch)
        assert torch.allclose(out.detach(), expected, atol=1e-5, rtol=0)
        assert layouts.calls and all(nhwc for _, _, nhwc in layouts.calls), layouts.calls
