"""Tests for cirlab.data.sampling (relative/absolute ground-truth pair sampling)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cirlab.data.sampling import (
    DegradationConfig,
    PairSampler,
    SamplingConfig,
    make_pairs,
    sample_beta,
)
from cirlab.tasks import NO_JPEG, task_to_physical


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _assert_on_grid(
    levels: torch.Tensor,
    blur_stride: float = 0.1,
    noise_stride: float = 1.0,
    jpeg_stride: int = 2,
) -> None:
    phys = task_to_physical(levels.double())
    r, s, q = phys.unbind(-1)
    assert torch.allclose(r / blur_stride, (r / blur_stride).round(), atol=1e-4)
    assert torch.allclose(s / noise_stride, (s / noise_stride).round(), atol=1e-4)
    jpeg_on = q != NO_JPEG
    assert bool(((100 - q[jpeg_on]) % jpeg_stride == 0).all())
    # and the task levels themselves are exactly the grid points' encodings (float32)
    lv = levels.double()
    torch.testing.assert_close(lv[:, 0], (r / 4), atol=1e-6, rtol=0)
    t_j = torch.where(jpeg_on, (102 - q) / 92, torch.zeros_like(q))
    torch.testing.assert_close(lv[:, 2], t_j, atol=1e-6, rtol=0)


@pytest.mark.parametrize("distribution", ["uniform", "beta"])
@pytest.mark.parametrize("ground_truth", ["relative", "absolute"])
def test_levels_ordered_on_grid_and_in_range(
    distribution: str, ground_truth: str
) -> None:
    sampler = PairSampler(
        DegradationConfig(),
        SamplingConfig(distribution=distribution, ground_truth=ground_truth),
    )
    l_in, l_gt = sampler.sample_levels(4000, generator=_gen(1))
    assert l_in.shape == l_gt.shape == (4000, 3) and l_in.dtype == torch.float32
    assert bool((l_gt <= l_in).all())
    assert bool((l_in >= 0).all() and (l_in <= 1).all())
    _assert_on_grid(l_in)
    _assert_on_grid(l_gt)
    if ground_truth == "absolute":
        assert bool((l_gt == 0).all())
    else:
        assert bool((l_gt > 0).any()) and bool((l_in > l_gt).any())
    # every type gets used, at many different levels
    for col in range(3):
        assert len(torch.unique(l_in[:, col])) > 20


def test_custom_strides_and_ranges() -> None:
    deg = DegradationConfig(
        blur_radius_max=2.0, noise_sigma_max=30.0, jpeg_quality_min=40
    )
    samp = SamplingConfig(
        blur_stride=0.5, noise_stride=5.0, jpeg_stride=10, p_binary=0.0
    )
    sampler = PairSampler(deg, samp)
    assert sampler.top_levels == pytest.approx((0.5, 0.6, 62 / 92))
    assert deg.max_levels == pytest.approx((0.5, 0.6, 62 / 92))
    l_in, _ = sampler.sample_levels(2000, generator=_gen(2))
    _assert_on_grid(l_in, 0.5, 5.0, 10)
    phys = task_to_physical(l_in.double())
    assert set(phys[:, 0].round(decimals=4).tolist()) <= {0.0, 0.5, 1.0, 1.5, 2.0}
    assert set(phys[:, 2].tolist()) <= {
        float(NO_JPEG),
        100.0,
        90.0,
        80.0,
        70.0,
        60.0,
        50.0,
        40.0,
    }
    assert phys[:, 1].max() <= 30.0 + 1e-4


def test_binary_levels_are_zero_or_top() -> None:
    deg = DegradationConfig(
        blur_radius_max=2.0, noise_sigma_max=25.0, jpeg_quality_min=30
    )
    sampler = PairSampler(deg, SamplingConfig(p_binary=1.0))
    l_in, l_gt = sampler.sample_levels(1000, generator=_gen(3))
    top = torch.tensor([0.5, 0.5, 72 / 92])
    for lv in (l_in, l_gt):
        is_zero = lv == 0
        is_top = torch.isclose(lv, top.expand_as(lv), atol=1e-6)
        assert bool((is_zero | is_top).all())
    assert bool((l_in > 0).any())


def test_p_multiple_zero_gives_one_active_type() -> None:
    sampler = PairSampler(DegradationConfig(), SamplingConfig(p_multiple=0.0))
    l_in, l_gt = sampler.sample_levels(3000, generator=_gen(4))
    n_active = (l_in > 0).sum(dim=1)
    assert int(n_active.max()) == 1
    assert bool(((l_gt > 0).sum(dim=1) <= 1).all())
    # each type is the active one about a third of the time
    counts = (l_in > 0).sum(dim=0).float()
    assert float(counts.min() / counts.max()) > 0.8


def test_p_multiple_one_gives_two_or_three_types() -> None:
    samp = SamplingConfig(p_multiple=1.0, p_binary=0.0, ground_truth="absolute")
    sampler = PairSampler(DegradationConfig(), samp)
    l_in, _ = sampler.sample_levels(3000, generator=_gen(5))
    n_active = (l_in > 0).sum(dim=1)
    # an active type has l_in = 0 only when its uniform draw hits 0 (probability ~1/47)
    assert float((n_active >= 2).float().mean()) > 0.9
    frac3 = float((n_active == 3).float().mean())
    assert 0.35 < frac3 < 0.55  # 2 or 3 types, uniformly


def test_disabled_types_are_always_zero() -> None:
    sampler = PairSampler(
        DegradationConfig(types=["noise"]), SamplingConfig(p_multiple=1.0)
    )
    l_in, l_gt = sampler.sample_levels(500, generator=_gen(6))
    assert bool((l_in[:, [0, 2]] == 0).all() and (l_gt[:, [0, 2]] == 0).all())
    assert bool((l_in[:, 1] > 0).any())


def test_beta_favours_small_levels() -> None:
    common = {"p_binary": 0.0, "ground_truth": "absolute", "p_multiple": 1.0}
    uni = PairSampler(
        DegradationConfig(), SamplingConfig(distribution="uniform", **common)
    )
    beta = PairSampler(
        DegradationConfig(), SamplingConfig(distribution="beta", **common)
    )
    u_in, _ = uni.sample_levels(4000, generator=_gen(7))
    b_in, _ = beta.sample_levels(4000, generator=_gen(7))
    # CResMD's Beta(0.5, 1) has mean 1/3; uniform on the grid has mean 1/2 (over active types)
    u_mean = u_in[u_in > 0].mean().item()
    b_mean = b_in[b_in > 0].mean().item()
    assert b_mean < u_mean - 0.1
    assert b_in[:, 1].median() < u_in[:, 1].median()


def test_sample_beta_moments() -> None:
    for a, b in ((0.5, 1.0), (2.0, 5.0), (0.7, 0.4), (1.0, 3.0)):
        x = sample_beta(a, b, (20000,), generator=_gen(8))
        assert x.dtype == torch.float64 and bool(((x >= 0) & (x <= 1)).all())
        mean = a / (a + b)
        var = a * b / ((a + b) ** 2 * (a + b + 1))
        assert x.mean().item() == pytest.approx(mean, abs=0.01)
        assert x.var().item() == pytest.approx(var, rel=0.06)
    a = sample_beta(2.0, 5.0, (10,), generator=_gen(9))
    assert torch.equal(a, sample_beta(2.0, 5.0, (10,), generator=_gen(9)))


def _clean(b: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    # smooth random crops, uint8-exact
    g = _gen(seed)
    low = torch.rand(b, 3, size // 8, size // 8, generator=g)
    img = torch.nn.functional.interpolate(
        low, size=(size, size), mode="bilinear", align_corners=False
    )
    return (img * 255).round() / 255


def test_make_pairs_outputs() -> None:
    sampler = PairSampler()
    clean = _clean(12)
    d = make_pairs(clean, sampler, generator=_gen(10))
    assert set(d) == {
        "input",
        "target",
        "task",
        "levels_in",
        "levels_gt",
        "physical_in",
        "physical_gt",
    }
    for k in ("input", "target"):
        assert d[k].shape == clean.shape and d[k].dtype == clean.dtype
        assert bool((d[k] >= 0).all() and (d[k] <= 1).all())
        torch.testing.assert_close(d[k] * 255, (d[k] * 255).round(), atol=1e-4, rtol=0)
    for k in ("task", "levels_in", "levels_gt", "physical_in", "physical_gt"):
        assert d[k].shape == (12, 3)
    torch.testing.assert_close(d["task"], d["levels_in"] - d["levels_gt"])
    assert bool((d["task"] >= 0).all())
    torch.testing.assert_close(d["physical_in"], task_to_physical(d["levels_in"]))
    torch.testing.assert_close(d["physical_gt"], task_to_physical(d["levels_gt"]))


def test_make_pairs_deterministic_given_generator() -> None:
    sampler = PairSampler()
    clean = _clean(8)
    a = make_pairs(clean, sampler, generator=_gen(11))
    b = make_pairs(clean, sampler, generator=_gen(11))
    c = make_pairs(clean, sampler, generator=_gen(12))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not torch.equal(a["input"], c["input"])


def test_equal_levels_give_identical_images_shared_noise() -> None:
    # binary relative levels: both draws at the top level gives l_in == l_gt (task 0)
    sampler = PairSampler(
        DegradationConfig(), SamplingConfig(p_binary=1.0, p_multiple=1.0)
    )
    clean = _clean(48)
    d = make_pairs(clean, sampler, generator=_gen(13))
    same = (d["task"] == 0).all(dim=1) & (d["levels_in"][:, 1] > 0)
    assert int(same.sum()) >= 2  # pairs with noise at equal levels exist in this draw
    assert torch.equal(d["input"][same], d["target"][same])
    diff = (d["task"] > 0).any(dim=1)
    assert not torch.equal(d["input"][diff], d["target"][diff])


def test_target_noise_is_the_input_noise_rescaled() -> None:
    sampler = PairSampler(
        DegradationConfig(types=["noise"]), SamplingConfig(p_binary=0.0)
    )
    clean = torch.full((64, 3, 32, 32), 0.5)
    d = make_pairs(clean, sampler, generator=_gen(14))
    s_in, s_gt = d["physical_in"][:, 1], d["physical_gt"][:, 1]
    rows = (s_gt >= 10) & (s_in > s_gt)
    assert int(rows.sum()) >= 5
    for i in rows.nonzero().squeeze(1).tolist():
        n_in = (d["input"][i] - 0.5).flatten()
        n_gt = (d["target"][i] - 0.5).flatten()
        corr = torch.corrcoef(torch.stack([n_in, n_gt]))[0, 1].item()
        assert corr > 0.95, (i, corr)
        ratio = (n_gt.std() / n_in.std()).item()
        assert ratio == pytest.approx((s_gt[i] / s_in[i]).item(), rel=0.05)


def test_make_pairs_on_margin_crops_degrades_the_crop_then_cuts_the_patch() -> None:
    """Margin crops (issue 11): the whole crop is degraded, then the patch at each offset is cut out of
    input and target alike; the noise field covers the crop and stays shared by input and target."""
    from cirlab.data.degradations import degrade
    from cirlab.data.loading import cut_patches

    sampler = PairSampler(DegradationConfig(), SamplingConfig(p_binary=1.0, p_multiple=1.0))
    crops = _clean(48, size=56)
    offsets = torch.randint(0, 56 - 24 + 1, (48, 2), generator=_gen(1))
    d = make_pairs(crops, sampler, generator=_gen(13), offsets=offsets, patch_size=24)
    assert d["input"].shape == d["target"].shape == (48, 3, 24, 24)
    # the same draws degrade the whole crops: levels first, then one noise field of the crops' shape; on CPU
    # training blurs with the "blocks" backend (equal to the full band to float rounding, tests/test_degradations.py)
    generator = _gen(13)
    levels_in, levels_gt = sampler.sample_levels(48, generator=generator)
    field_ = torch.randn(crops.shape, generator=generator)
    for image, levels in ((d["input"], levels_in), (d["target"], levels_gt)):
        whole = degrade(crops, levels, noise_field=field_, blur_backend="blocks")
        assert torch.equal(image, cut_patches(whole, offsets, 24))
        # and to the default (full band) blur up to one 8-bit level where a value sits at a rounding edge
        default = cut_patches(degrade(crops, levels, noise_field=field_), offsets, 24)
        assert float((image - default).abs().max()) <= 1 / 255 + 1e-6 and float((image != default).float().mean()) < 1e-3
    same = (d["task"] == 0).all(dim=1) & (d["levels_in"][:, 1] > 0)
    assert int(same.sum()) >= 2 and torch.equal(d["input"][same], d["target"][same])
    again = make_pairs(crops, sampler, generator=_gen(13), offsets=offsets, patch_size=24)
    assert torch.equal(again["input"], d["input"])
    with pytest.raises(ValueError, match="patch_size"):
        make_pairs(crops, sampler, generator=_gen(13), offsets=offsets)


@pytest.mark.parametrize("margin", [False, True])
def test_pair_codes_are_the_pairs_before_the_float_conversion(margin: bool) -> None:
    """make_pair_codes is make_pairs in uint8 (what DataLoader workers send): same draws, code / 255 equal
    to the float pairs bit for bit, levels in input-then-target order; pairs_from_codes rebuilds the dict."""
    from cirlab.data.sampling import make_pair_codes, pairs_from_codes

    sampler = PairSampler()
    clean = _clean(10, size=56 if margin else 24)
    kwargs = {"offsets": torch.randint(0, 56 - 24 + 1, (10, 2), generator=_gen(2)), "patch_size": 24} if margin else {}
    pairs = make_pairs(clean, sampler, generator=_gen(21), **kwargs)
    packed = make_pair_codes(clean, sampler, generator=_gen(21), **kwargs)
    assert set(packed) == {"codes", "levels"} and packed["codes"].dtype == torch.uint8
    assert packed["codes"].shape == (20, 3, 24, 24) and packed["levels"].shape == (20, 3)
    assert torch.equal(packed["codes"][:10].float() / 255, pairs["input"])
    assert torch.equal(packed["codes"][10:].float() / 255, pairs["target"])
    assert torch.equal(packed["levels"], torch.cat((pairs["levels_in"], pairs["levels_gt"])))
    rebuilt = pairs_from_codes(**packed)
    assert list(rebuilt) == list(pairs)
    for key in pairs:
        assert rebuilt[key].dtype == pairs[key].dtype and torch.equal(rebuilt[key], pairs[key]), key
    assert pairs_from_codes(**packed, dtype=torch.float64)["input"].dtype == torch.float64
    with pytest.raises(ValueError, match="uint8"):
        pairs_from_codes(pairs["input"], packed["levels"])
    with pytest.raises(TypeError, match="on_before_batch_transfer"):
        pairs_from_codes(packed["codes"].numpy(), packed["levels"])
    with pytest.raises(ValueError, match=r"levels must have shape \(20, 3\)"):
        pairs_from_codes(packed["codes"], packed["levels"][:10])


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"p_binary": 1.5}, "sampling.p_binary=1.5"),
        ({"p_multiple": -0.1}, "sampling.p_multiple=-0.1"),
        ({"ground_truth": "both"}, "sampling.ground_truth='both'"),
        ({"distribution": "gauss"}, "sampling.distribution='gauss'"),
        ({"beta_a": 0.0}, "sampling.beta_a=0.0"),
        ({"beta_b": -1.0}, "sampling.beta_b=-1.0"),
        ({"blur_stride": 0.0}, "sampling.blur_stride=0.0"),
        ({"noise_stride": 100.0}, "sampling.noise_stride=100.0"),
        ({"jpeg_stride": 1.5}, "sampling.jpeg_stride=1.5"),
        ({"jpeg_stride": 0}, "sampling.jpeg_stride=0"),
    ],
)
def test_bad_sampling_config_names_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field.replace(".", r"\.").replace("(", r"\(")):
        SamplingConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"types": ["blur", "haze"]}, "degradation.types"),
        ({"types": []}, "degradation.types"),
        ({"types": ["blur", "blur"]}, "degradation.types"),
        ({"blur_radius_max": 5.0}, "degradation.blur_radius_max=5.0"),
        ({"noise_sigma_max": 0.0}, "degradation.noise_sigma_max=0.0"),
        ({"jpeg_quality_min": 5}, "degradation.jpeg_quality_min=5"),
        ({"jpeg_quality_min": 20.5}, "degradation.jpeg_quality_min=20.5"),
    ],
)
def test_bad_degradation_config_names_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        DegradationConfig(**kwargs)


def test_configs_are_omegaconf_structured_schemas() -> None:
    omegaconf = pytest.importorskip("omegaconf")
    oc = omegaconf.OmegaConf
    cfg = oc.structured(SamplingConfig)
    assert cfg.p_binary == 0.5 and cfg.distribution == "uniform"
    deg = oc.to_object(
        oc.merge(oc.structured(DegradationConfig), {"types": ["noise", "jpeg"]})
    )
    assert isinstance(deg, DegradationConfig) and deg.enabled == (False, True, True)
    with pytest.raises(ValueError, match=r"sampling\.p_binary=1\.5"):
        oc.to_object(oc.merge(cfg, {"p_binary": 1.5}))


def test_sample_levels_validation_and_cresmd_mix() -> None:
    sampler = PairSampler()
    with pytest.raises(ValueError, match="batch_size"):
        sampler.sample_levels(0)
    # CResMD's 1/3-1/3-1/3 mix of 1, 2, 3 active types is p_multiple = 2/3
    mix = PairSampler(
        DegradationConfig(),
        SamplingConfig(p_multiple=2 / 3, p_binary=1.0, ground_truth="absolute"),
    )
    l_in, _ = mix.sample_levels(6000, generator=_gen(15))
    # binary absolute: an active type is at its top with probability 1/2, so compare to that
    n = (l_in > 0).sum(dim=1).double()
    expected_mean = (1 + 2 + 3) / 3 * 0.5
    assert n.mean().item() == pytest.approx(expected_mean, abs=0.05)
    assert math.isclose(float(np.mean(n.numpy() == 3)), 1 / 3 * 1 / 8, abs_tol=0.015)


def test_bench_pairs_smoke() -> None:
    from cirlab.bench.data import bench_pairs

    res = bench_pairs(batch_size=4, patch=32, seconds=0.05, warmup=1)
    assert res["pairs_per_s"] > 0 and res["batch"] == 4 and res["patch"] == 32
    assert res["device"] == "cpu" and res["torch_threads"] == torch.get_num_threads()
    before = torch.get_num_threads()
    res1 = bench_pairs(batch_size=2, patch=16, seconds=0.01, warmup=0, num_threads=1)
    assert res1["torch_threads"] == 1 and torch.get_num_threads() == before
