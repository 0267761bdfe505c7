"""The CResMD network: reference names, parameter count, initialisation, shape safety."""

import math

import pytest
import torch

from cirlab.archs.cresmd import CResMDNet


def reference_state_shapes(nf=64, nb=32, cond_dim=3, nc=3):
    """Parameter names and shapes of the reference CResMDNet, written from docs/method.md section 2."""
    shapes = {
        "global_scale.weight": (nc, cond_dim), "global_scale.bias": (nc,),
        "conv_first.weight": (nf, nc, 3, 3), "conv_first.bias": (nf,),
    }
    for i in range(nb):
        for conv in ("conv1", "conv2"):
            shapes[f"recon_trunk.{i}.{conv}.weight"] = (nf, nf, 3, 3)
            shapes[f"recon_trunk.{i}.{conv}.bias"] = (nf,)
        shapes[f"recon_trunk.{i}.local_scale.weight"] = (nf, cond_dim)
        shapes[f"recon_trunk.{i}.local_scale.bias"] = (nf,)
    shapes.update({
        "upconv.weight": (4 * nf, nf, 3, 3), "upconv.bias": (4 * nf,),
        "HRconv.weight": (nf, nf, 3, 3), "HRconv.bias": (nf,),
        "conv_last.weight": (nc, nf, 3, 3), "conv_last.bias": (nc,),
    })
    return shapes


def test_reference_parameter_count_and_names():
    net = CResMDNet()
    assert sum(p.numel() for p in net.parameters()) == 2_559_759
    expected = reference_state_shapes()
    assert {k: tuple(v.shape) for k, v in net.state_dict().items()} == expected


def test_reference_shaped_state_dict_loads_strictly():
    generator = torch.Generator().manual_seed(0)
    state = {k: torch.randn(shape, generator=generator) for k, shape in reference_state_shapes().items()}
    net = CResMDNet()
    net.load_state_dict(state, strict=True)
    assert torch.equal(net.recon_trunk[31].local_scale.weight, state["recon_trunk.31.local_scale.weight"])


def test_initialisation_is_scaled_kaiming_with_zero_bias():
    torch.manual_seed(0)
    net = CResMDNet()
    for name, param in net.named_parameters():
        if name.endswith("bias"):
            assert torch.count_nonzero(param) == 0, name
    weight = torch.cat([net.recon_trunk[i].conv1.weight.flatten() for i in range(32)])
    fan_in = 64 * 9
    assert weight.std().item() == pytest.approx(0.1 * math.sqrt(2 / fan_in), rel=0.02)


def test_zero_global_scale_returns_the_input_and_task_changes_output():
    net = CResMDNet(nf=8, nb=2)
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        net.global_scale.weight.zero_()
        assert torch.equal(net(x, torch.rand(2, 3)), x)  # the output is x + residual * global_scale(t)
        net.global_scale.bias.fill_(1.0)
        a = net(x, torch.zeros(2, 3))
        b = net(x, torch.ones(2, 3))
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("size", [(15, 16), (16, 17), (13, 9), (1, 1)])
def test_odd_sizes_are_padded_and_cropped_back(size):
    torch.manual_seed(0)
    net = CResMDNet(nf=8, nb=2).eval()
    x = torch.rand(1, 3, *size)
    t = torch.rand(1, 3)
    with torch.no_grad():
        out = net(x, t)
        padded = torch.nn.functional.pad(x, (0, size[1] % 2, 0, size[0] % 2), mode="replicate")
        reference = net(padded, t)[..., : size[0], : size[1]]
    assert out.shape == x.shape
    assert torch.allclose(out, reference)


def test_bad_shapes_are_rejected_with_the_shape_in_the_message():
    net = CResMDNet(nf=8, nb=1)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        net(torch.rand(1, 4, 8, 8), torch.rand(1, 3))
    with pytest.raises(ValueError, match="task vectors"):
        net(torch.rand(2, 3, 8, 8), torch.rand(1, 3))
    with pytest.raises(ValueError, match="model.net.nb"):
        CResMDNet(nb=0)
