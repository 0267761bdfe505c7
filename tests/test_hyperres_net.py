"""HyperRes networks: parameter counts, initialisation, affine weight generation, the mixed-level
batch, the k-network training forward and the generated standalone network."""

import math

import pytest
import torch

from cirlab.archs.hyperres import HyperResNet, MainNet, as_level_matrix, reference_state_dict_to_cirlab


def randomised(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random non-zero weights everywhere (at initialisation the meta biases are 0, which hides bugs)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in net.parameters():
            param.copy_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * 0.2)
    return net


def tiny(**kwargs) -> HyperResNet:
    return randomised(HyperResNet(nf=8, nb=2, **kwargs).double())


def test_reference_parameter_counts():
    assert sum(p.numel() for p in HyperResNet().parameters()) == 2_588_483
    assert sum(p.numel() for p in MainNet().parameters()) == 1_406_787
    # the generated network has the dedicated network's shape
    assert sum(p.numel() for p in HyperResNet(nf=8, nb=2).generate(0.1).parameters()) == \
        sum(p.numel() for p in MainNet(nf=8, nb=2).parameters())


def test_width_depth_and_level_size_come_from_arguments():
    net = HyperResNet(nf=16, nb=3, cond_dim=3)
    assert len(list(net.meta_convs())) == 6
    assert net.blocks[0].meta1.fc.weight.shape == (16 * (16 * 9 + 1), 3)
    with pytest.raises(ValueError, match="nb"):
        HyperResNet(nb=0)
    with pytest.raises(ValueError, match="mixed_mode"):
        HyperResNet(mixed_mode="fast")


def test_initialisation_is_scaled_kaiming_with_zero_bias():
    torch.manual_seed(0)
    net = HyperResNet()
    for name, param in net.named_parameters():
        if name.endswith("bias"):
            assert torch.count_nonzero(param) == 0, name
    # meta blocks: Linear(1, N), fan_in 1 -> std 0.1 * sqrt(2)
    slopes = torch.cat([meta.fc.weight.flatten() for meta in net.meta_convs()])
    assert slopes.std().item() == pytest.approx(0.1 * math.sqrt(2), rel=0.01)
    assert net.conv2.weight.std().item() == pytest.approx(0.1 * math.sqrt(2 / (64 * 9)), rel=0.05)
    # so at c = 0 every generated conv is zero and the trunk is the identity
    assert all(torch.count_nonzero(w) == 0 for w, _ in net.trunk_weights(0.0))


def test_generated_weights_are_exactly_affine_in_the_level():
    net = tiny()
    meta = net.blocks[1].meta2
    base = meta.generate(torch.zeros(1, dtype=torch.float64))
    slope = [a - b for a, b in zip(meta.generate(torch.ones(1, dtype=torch.float64)), base)]
    for c in (0.0, 0.3, 15 / 255, 1.7, -0.4):  # inside and outside [0, 1]
        weight, bias = meta.generate(torch.tensor([c], dtype=torch.float64))
        torch.testing.assert_close(weight, base[0] + c * slope[0], rtol=0, atol=1e-12)
        torch.testing.assert_close(bias, base[1] + c * slope[1], rtol=0, atol=1e-12)
    # and the parameters are exactly (slope, constant): c * w + b
    weight, bias = meta.generate(torch.tensor([0.5], dtype=torch.float64))
    theta = 0.5 * meta.fc.weight[:, 0] + meta.fc.bias
    assert torch.equal(torch.cat([weight.flatten(), bias]), theta)


@pytest.mark.parametrize("mode", ["grouped", "affine"])
def test_mixed_level_batch_equals_per_level_calls(mode):
    net = tiny(mixed_mode=mode)
    x = torch.rand(5, 3, 18, 22, dtype=torch.float64)
    levels = torch.tensor([5, 25, 50, 90, 130], dtype=torch.float64) / 255  # 130 is outside any training range
    mixed = net(x, levels)
    single = torch.cat([net(x[i : i + 1], levels[i]) for i in range(5)])
    torch.testing.assert_close(mixed, single, rtol=0, atol=1e-10)
    # a batch at one level takes the generated-once path and agrees with both
    same = net(x, torch.full((5,), 0.2, dtype=torch.float64))
    torch.testing.assert_close(same, torch.cat([net(x[i : i + 1], 0.2) for i in range(5)]), rtol=0, atol=1e-10)


@pytest.mark.parametrize("mode", ["grouped", "affine"])
def test_task_vector_variant_mixes_task_vectors_per_sample(mode):
    net = tiny(cond_dim=3, mixed_mode=mode)
    x = torch.rand(4, 3, 16, 16, dtype=torch.float64)
    tasks = torch.rand(4, 3, dtype=torch.float64)
    mixed = net(x, tasks)
    single = torch.cat([net(x[i : i + 1], tasks[i]) for i in range(4)])
    torch.testing.assert_close(mixed, single, rtol=0, atol=1e-10)
    # sum_d t_d W_d + B: a generated weight is affine in each coordinate
    meta = net.blocks[0].meta1
    t = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    expected = meta.fc.bias + (meta.fc.weight * t).sum(dim=1)
    weight, bias = meta.generate(t)
    torch.testing.assert_close(torch.cat([weight.flatten(), bias]), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("k_mode", ["loop", "grouped"])
def test_k_network_training_forward_equals_k_single_forwards(k_mode):
    net = tiny(k_mode=k_mode)
    inputs = torch.rand(4, 3, 3, 20, 20, dtype=torch.float64)
    levels = torch.tensor([15, 35, 55, 75], dtype=torch.float64) / 255
    out = net.forward_levels(inputs, levels)
    assert out.shape == (4, 3, 3, 20, 20)
    for i in range(4):
        torch.testing.assert_close(out[i], net(inputs[i], levels[i]), rtol=0, atol=1e-10)
    # the gradient reaches the shared head/tail and every meta block
    out.abs().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


def test_generated_network_equals_the_hypernetwork_at_its_level():
    net = tiny()
    x = torch.rand(2, 3, 17, 15, dtype=torch.float64)  # odd sizes: padded and cropped back
    for level in (10 / 255, 0.6, 2.0):
        generated = net.generate(level)
        assert isinstance(generated, MainNet)
        y = generated(x)
        assert y.shape == x.shape
        torch.testing.assert_close(y, net(x, level), rtol=0, atol=1e-10)


def test_dedicated_network_ignores_the_level_and_flattens_k():
    net = randomised(MainNet(nf=8, nb=2).double())
    x = torch.rand(3, 2, 3, 16, 16, dtype=torch.float64)
    out = net.forward_levels(x, torch.tensor([0.1, 0.2, 0.3]))
    torch.testing.assert_close(out[1], net(x[1], 0.9), rtol=0, atol=1e-10)


def test_level_shapes_and_errors():
    like = torch.zeros(1)
    assert as_level_matrix(0.5, 4, 1, like).shape == (4, 1)
    assert as_level_matrix(torch.tensor([0.1, 0.2, 0.3]), 3, 1, like).shape == (3, 1)
    assert as_level_matrix(torch.tensor([0.1, 0.2, 0.3]), 5, 3, like).shape == (5, 3)
    with pytest.raises(ValueError, match="scalar level"):
        as_level_matrix(0.5, 2, 3, like)
    with pytest.raises(ValueError, match="shape"):
        as_level_matrix(torch.rand(3), 2, 1, like)
    with pytest.raises(ValueError, match="finite"):
        as_level_matrix(float("nan"), 2, 1, like)
    with pytest.raises(ValueError, match="input of shape"):
        HyperResNet(nf=8, nb=1)(torch.rand(1, 1, 8, 8), 0.1)


def test_reference_state_dict_names_map_onto_this_network():
    net = HyperResNet(nf=8, nb=2)
    mine = net.state_dict()
    reference = {}
    for key, value in mine.items():
        if key.startswith("blocks."):
            _, block, meta, _, kind = key.split(".")
            reference[f"module.res_blocks_meta.{int(block) + 1}.hy_conv{meta[-1]}.fc.{kind}"] = value.clone()
        else:
            name, kind = key.split(".")
            reference[f"{name}.module.{kind}"] = value.clone()
    converted = reference_state_dict_to_cirlab(reference)
    HyperResNet(nf=8, nb=2).load_state_dict(converted, strict=True)
    with pytest.raises(KeyError, match="bn_"):
        reference_state_dict_to_cirlab({"bn_15.weight": torch.zeros(1)})


def test_flops_count_main_network_and_generation():
    net = HyperResNet()
    flops = net.flops(64, 64)
    # 2 FLOPs per multiply-add: 2 nb + 3 convs 64->64-ish at 32x32, conv3 64->256, conv4 at 64x64
    conv = 2 * 9 * 64 * 64
    expected = 2 * 9 * 3 * 64 * 32 * 32 + 33 * conv * 32 * 32 + 4 * conv * 32 * 32 + conv * 64 * 64 + 2 * 9 * 64 * 3 * 64 * 64
    assert flops["main"] == expected
    assert flops["generation"] == 2 * 32 * 64 * (64 * 9 + 1)
