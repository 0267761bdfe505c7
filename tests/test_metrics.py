"""Tests of cirlab.metrics against independent implementations (scikit-image) and pyiqa offline.

Tests on CBSD68 and the IQA parameter files use the ``cbsd68_dir`` / ``iqa_dir`` fixtures and
skip with a reason when ../shared/data is absent; the rest use images bundled with scikit-image.
pyiqa is never allowed to download: every IQA test runs with an isolated TORCH_HOME and pyiqa's
download function replaced by one that fails.
"""

from __future__ import annotations

import copy
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata
from skimage.color import rgb2ycbcr
from skimage.metrics import peak_signal_noise_ratio as sk_psnr
from skimage.metrics import structural_similarity as sk_ssim
from torchmetrics.functional.image import peak_signal_noise_ratio as tm_psnr_batch
from torchmetrics.utilities.data import dim_zero_sum

from cirlab.metrics import (
    BRISQUE,
    NIQE,
    PerImageMean,
    install_iqa_weights,
    iqa_cache_dir,
    paper_psnr,
    paper_ssim,
    psnr_per_image,
    quantize_uint8,
    rgb_to_y_bt601,
    ssim_per_image,
)
from conftest import SHARED_DATA

SK_SSIM_KW = {"gaussian_weights": True, "sigma": 1.5, "use_sample_covariance": False}


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------
def to_tensor(img: np.ndarray) -> torch.Tensor:
    """HWC uint8 -> (1, 3, H, W) float32 in [0, 1]."""
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float() / 255.0


def to_numpy(x: torch.Tensor) -> np.ndarray:
    """(1, C, H, W) -> HWC float64."""
    return x[0].permute(1, 2, 0).double().numpy()


def add_noise(x: torch.Tensor, sigma255: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return x + torch.randn(x.shape, generator=g) * (sigma255 / 255.0)


def load_cbsd68(cbsd68_dir: Path, n: int) -> list[torch.Tensor]:
    files = sorted(cbsd68_dir.glob("*.png"))[:n]
    assert len(files) == n, f"expected {n} PNGs in {cbsd68_dir}"
    return [to_tensor(np.asarray(Image.open(f).convert("RGB"))) for f in files]


def np_uint8(x: np.ndarray) -> np.ndarray:
    """Independent paper quantisation: clip, *255, numpy round (half to even)."""
    return np.round(np.clip(x, 0.0, 1.0) * 255.0)


@pytest.fixture
def noisy_cbsd68() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Three CBSD68 images (clean) with Gaussian noise of sigma 5, 15, 30 (out of 255).

    Without the shared data (a fresh clone), three photos bundled with scikit-image stand in,
    so the comparison with scikit-image's metrics still runs.
    """
    folder = SHARED_DATA / "test" / "CBSD68"
    if folder.is_dir():
        clean = load_cbsd68(folder, 3)
    else:
        clean = [to_tensor(photo()) for photo in (skdata.chelsea, skdata.coffee, skdata.rocket)]
    return [(add_noise(c, s, seed=i), c) for i, (c, s) in enumerate(zip(clean, (5, 15, 30)))]


@pytest.fixture
def astronaut() -> torch.Tensor:
    """Bundled scikit-image photo, 256x256 crop, (1, 3, 256, 256) in [0, 1]."""
    return to_tensor(skdata.astronaut()[128:384, 128:384])


# ------------------------------------------------------------------------------------------
# PSNR / SSIM against scikit-image
# ------------------------------------------------------------------------------------------
def test_torchmetrics_convention_matches_skimage(noisy_cbsd68) -> None:
    for pred, target in noisy_cbsd68:
        p, t = to_numpy(pred), to_numpy(target)
        # PSNR: raw float, data_range 1 (float32 in torchmetrics -> ~1e-6 dB agreement)
        ours = psnr_per_image(pred, target)
        assert ours.shape == (1,)
        assert ours.item() == pytest.approx(sk_psnr(t, p, data_range=1.0), abs=1e-3)
        # SSIM: torchmetrics reflect-pads by 5 px and averages the whole image, whereas skimage
        # drops the 5-px border. Reproduce torchmetrics' convention with skimage on
        # reflect-padded images (exact up to float32), and check the plain skimage value
        # differs only by that border effect (up to ~1e-2).
        pad = ((5, 5), (5, 5), (0, 0))
        _, smap = sk_ssim(
            np.pad(t, pad, mode="reflect"),
            np.pad(p, pad, mode="reflect"),
            data_range=1.0,
            channel_axis=-1,
            full=True,
            **SK_SSIM_KW,
        )
        ref_padded = smap[5:-5, 5:-5].mean()
        ref_plain = sk_ssim(t, p, data_range=1.0, channel_axis=-1, **SK_SSIM_KW)
        ours = ssim_per_image(pred, target).item()
        assert ours == pytest.approx(ref_padded, abs=1e-4)
        assert ours == pytest.approx(ref_plain, abs=1e-2)


@pytest.mark.parametrize(("channel", "crop_border"), [("rgb", 0), ("y", 0), ("y", 4), ("y_rounded", 0)])
def test_paper_convention_matches_skimage(noisy_cbsd68, channel: str, crop_border: int) -> None:
    for pred, target in noisy_cbsd68:
        p, t = np_uint8(to_numpy(pred)), np_uint8(to_numpy(target))
        if channel != "rgb":
            p = rgb2ycbcr(p.astype(np.uint8))[..., 0]
            t = rgb2ycbcr(t.astype(np.uint8))[..., 0]
        if channel == "y_rounded":  # MATLAB's rgb2ycbcr returns uint8 for uint8 input
            p, t = np.round(p), np.round(t)
        if crop_border:
            p = p[crop_border:-crop_border, crop_border:-crop_border]
            t = t[crop_border:-crop_border, crop_border:-crop_border]
        axis = -1 if p.ndim == 3 else None
        ref_psnr = sk_psnr(t, p, data_range=255)
        ref_ssim = sk_ssim(t, p, data_range=255, channel_axis=axis, **SK_SSIM_KW)
        ours_psnr = paper_psnr(pred, target, channel=channel, crop_border=crop_border)
        ours_ssim = paper_ssim(pred, target, channel=channel, crop_border=crop_border)
        assert ours_psnr.shape == ours_ssim.shape == (1,)
        assert ours_psnr.item() == pytest.approx(ref_psnr, abs=1e-3)
        assert ours_ssim.item() == pytest.approx(ref_ssim, abs=1e-4)


def test_paper_convention_quantises(astronaut) -> None:
    # values outside [0, 1] are clamped, so an overshooting prediction equals its clamped self
    pred = add_noise(astronaut, 40, seed=1)
    assert (pred > 1).any() and (pred < 0).any()
    assert torch.equal(paper_psnr(pred, astronaut), paper_psnr(pred.clamp(0, 1), astronaut))
    # uint8 input is used as is and gives the same numbers as the float image it came from
    assert torch.equal(
        paper_ssim(quantize_uint8(pred), quantize_uint8(astronaut)), paper_ssim(pred, astronaut)
    )
    assert torch.isinf(paper_psnr(astronaut, astronaut)).all()
    assert paper_ssim(astronaut, astronaut).item() == pytest.approx(1.0, abs=1e-12)


def test_rgb_to_y_matches_skimage(cbsd68_dir: Path) -> None:
    img = np.asarray(Image.open(min(cbsd68_dir.glob("*.png"))).convert("RGB"))
    ref = rgb2ycbcr(img)[..., 0]  # float64, MATLAB rgb2ycbcr Y on 0..255, unrounded
    x_u8 = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None]
    y = rgb_to_y_bt601(x_u8)  # uint8 input -> 0..255 scale, float64
    assert y.shape == (1, 1, *img.shape[:2]) and y.dtype == torch.float64
    np.testing.assert_allclose(y[0, 0].numpy(), ref, atol=1e-9)
    y_float = rgb_to_y_bt601(x_u8.double() / 255.0)  # float input -> [16/255, 235/255]
    np.testing.assert_allclose(y_float[0, 0].numpy() * 255.0, ref, atol=1e-9)
    y_round = rgb_to_y_bt601(x_u8, round_output=True)  # MATLAB uint8 behaviour
    np.testing.assert_array_equal(y_round[0, 0].numpy(), np.round(ref))
    # studio swing end points
    bw = torch.tensor([0.0, 1.0], dtype=torch.float64).view(1, 1, 1, 2).expand(1, 3, 1, 2)
    np.testing.assert_allclose(rgb_to_y_bt601(bw, data_range=1.0).flatten().numpy() * 255, [16.0, 235.0])


def test_quantize_uint8_rounding_and_clamp() -> None:
    x = torch.tensor([0.5, 1.5, 2.5, 3.5, 254.5]) / 255.0
    assert torch.equal(x * 255.0, torch.tensor([0.5, 1.5, 2.5, 3.5, 254.5]))  # exact halves
    assert quantize_uint8(x).tolist() == [0, 2, 2, 4, 254]  # half to even, like numpy.round
    assert quantize_uint8(torch.tensor([-0.3, 1.7, float("nan")])).tolist() == [0, 255, 0]
    r = torch.rand(1000, generator=torch.Generator().manual_seed(0)) * 1.2 - 0.1
    q = quantize_uint8(r)
    assert q.dtype == torch.uint8
    np.testing.assert_array_equal(q.numpy(), np_uint8(r.numpy().astype(np.float64)).astype(np.uint8))


def test_input_validation(astronaut) -> None:
    grey = astronaut[:, :1]
    with pytest.raises(ValueError, match="same shape"):
        paper_psnr(astronaut, astronaut[..., :100])
    with pytest.raises(ValueError, match="same shape"):
        psnr_per_image(astronaut, grey)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        ssim_per_image(astronaut[0], astronaut[0])
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        paper_ssim(astronaut[0], astronaut[0])
    with pytest.raises(ValueError, match="3 channels"):
        paper_psnr(grey, grey, channel="y")
    with pytest.raises(ValueError, match="y_rounded"):
        paper_psnr(astronaut, astronaut, channel="Y")
    with pytest.raises(ValueError, match="3 channels"):
        rgb_to_y_bt601(grey)
    with pytest.raises(ValueError, match="channel"):
        paper_ssim(astronaut, astronaut, channel="ycbcr")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="crop_border"):
        paper_psnr(astronaut, astronaut, crop_border=128)
    # grey images work in the RGB paths
    assert paper_ssim(grey, grey).item() == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------
# per-image averaging and Metric state (PerImageMean)
# ------------------------------------------------------------------------------------------
class PerImage(PerImageMean):
    """The mean of one of the per-image functions, as a run would accumulate it."""

    def __init__(self, score) -> None:
        super().__init__()
        self.score = score

    def per_image(self, preds: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        return self.score(preds, target)


def _mixed_quality_batch(astronaut: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Four views of one photo with noise sigma 1, 5, 20, 60 (out of 255), clamped."""
    target = astronaut.expand(4, -1, -1, -1).contiguous()
    pred = torch.cat([add_noise(astronaut, s, seed=s) for s in (1, 5, 20, 60)]).clamp(0, 1)
    return pred, target


@pytest.mark.parametrize("convention", ["torchmetrics", "paper"])
def test_metric_is_mean_of_per_image_values(astronaut, convention: str) -> None:
    pred, target = _mixed_quality_batch(astronaut)
    per_image = psnr_per_image(pred, target) if convention == "torchmetrics" else paper_psnr(pred, target)
    batch_psnr = tm_psnr_batch(pred, target, data_range=1.0)  # one MSE over the whole batch
    assert abs(per_image.mean().item() - batch_psnr.item()) > 5.0  # very different for mixed quality
    metric = PerImage(psnr_per_image if convention == "torchmetrics" else paper_psnr)
    metric.update(pred[:1], target[:1])  # uneven batches: each image still weighs 1/4
    metric.update(pred[1:], target[1:])
    assert metric.compute().item() == pytest.approx(per_image.double().mean().item(), abs=1e-6)
    ssim_metric = PerImage(ssim_per_image if convention == "torchmetrics" else paper_ssim)
    ssim_metric.update(pred[:3], target[:3])
    ssim_metric.update(pred[3:], target[3:])
    ref = ssim_per_image(pred, target) if convention == "torchmetrics" else paper_ssim(pred, target)
    assert ssim_metric.compute().item() == pytest.approx(ref.double().mean().item(), abs=1e-6)
    metric.reset()
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert torch.isnan(metric.compute())


@pytest.mark.parametrize(
    "make",
    [
        lambda: PerImage(psnr_per_image),
        lambda: PerImage(lambda p, t: paper_psnr(p, t, channel="y", crop_border=2)),
        lambda: PerImage(ssim_per_image),
        lambda: PerImage(paper_ssim),
    ],
)
def test_metric_states_merge_like_ddp(astronaut, make) -> None:
    pred, target = _mixed_quality_batch(astronaut)
    full, rank0, rank1 = make(), make(), make()
    full.update(pred, target)
    rank0.update(pred[:1], target[:1])  # ranks with different batch sizes
    rank1.update(pred[1:], target[1:])
    # what a dist_reduce_fx="sum" all-reduce does: sum every state over the ranks
    assert all(rank0._reductions[k] is dim_zero_sum for k in ("score_sum", "count"))
    summed = {k: getattr(rank0, k) + getattr(rank1, k) for k in ("score_sum", "count")}
    assert (summed["score_sum"] / summed["count"]).item() == pytest.approx(full.compute().item(), abs=1e-9)
    rank0.merge_state(rank1)
    assert int(rank0.count) == 4
    assert rank0.compute().item() == pytest.approx(full.compute().item(), abs=1e-9)


# ------------------------------------------------------------------------------------------
# NIQE / BRISQUE (pyiqa, offline)
# ------------------------------------------------------------------------------------------
@pytest.fixture
def offline_torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Empty TORCH_HOME in tmp_path; any pyiqa/torch.hub download fails the test."""

    def no_download(url, *args, **kwargs):
        raise AssertionError(f"test tried to download {url}")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    monkeypatch.setattr("pyiqa.utils.download_util.download_url_to_file", no_download)
    assert iqa_cache_dir() == tmp_path / "torch" / "hub" / "pyiqa"
    return tmp_path / "torch"


@pytest.fixture
def iqa_installed(offline_torch_home: Path, iqa_dir: Path) -> Path:
    """TORCH_HOME in tmp_path with the NIQE/BRISQUE files copied from the shared data."""
    paths = install_iqa_weights(iqa_dir)
    assert [p.name for p in paths] == ["niqe_modelparameters.mat", "brisque_svm_weights.pth"]
    assert all(p.parent == offline_torch_home / "hub" / "pyiqa" and p.is_file() for p in paths)
    return offline_torch_home


@pytest.mark.parametrize(("cls", "clean_range"), [(NIQE, (2.0, 15.0)), (BRISQUE, (0.0, 100.0))])
def test_no_reference_metrics_on_cbsd68(iqa_installed, cbsd68_dir: Path, cls, clean_range) -> None:
    clean = load_cbsd68(cbsd68_dir, 2)
    noisy = [add_noise(c, 25, seed=i).clamp(0, 1) for i, c in enumerate(clean)]
    metric = cls()  # parameters from the (temporary) pyiqa cache
    assert metric.higher_is_better is False
    clean_scores = torch.cat([metric.per_image(c) for c in clean])
    noisy_scores = torch.cat([metric.per_image(n) for n in noisy])
    assert torch.isfinite(clean_scores).all() and torch.isfinite(noisy_scores).all()
    lo, hi = clean_range
    assert ((clean_scores > lo) & (clean_scores < hi)).all(), clean_scores
    assert (noisy_scores > clean_scores + 1.0).all(), (clean_scores, noisy_scores)  # lower is better
    # mean over images, per-rank halves merge like DDP
    for c in clean:
        metric.update(c)
    other = cls()
    for n in noisy:
        other.update(n, n)  # a target is accepted and ignored (MetricCollection with full-reference metrics)
    assert metric.compute().item() == pytest.approx(clean_scores.double().mean().item(), rel=1e-6)
    metric.merge_state(other)
    both = torch.cat([clean_scores, noisy_scores]).double().mean()
    assert metric.compute().item() == pytest.approx(both.item(), rel=1e-6)


@pytest.mark.parametrize("cls", [NIQE, BRISQUE])
def test_pyiqa_network_stays_out_of_state_dict(offline_torch_home, iqa_dir: Path, astronaut, cls) -> None:
    class Restorer(torch.nn.Module):  # stands in for a LightningModule holding its metrics
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
            self.val_iqa = cls(weights_dir=iqa_dir)  # weights_dir given: the empty cache is fine

    model = Restorer()
    model.val_iqa.update(astronaut)
    assert "net" in model.val_iqa._iqa_holder  # the pyiqa network exists now ...
    assert set(model.state_dict()) == {"conv.weight", "conv.bias"}  # ... but is not saved
    assert set(model.val_iqa.state_dict()) == set()
    assert len(list(model.parameters())) == 2
    assert all(type(m).__module__.split(".")[0] != "pyiqa" for m in model.modules())
    # copies and pickles leave the network behind and rebuild it lazily with equal results
    clone = copy.deepcopy(model.val_iqa)
    restored = pickle.loads(pickle.dumps(model.val_iqa))
    assert clone._iqa_holder == {} and restored._iqa_holder == {}
    assert restored.compute().item() == pytest.approx(model.val_iqa.compute().item())
    restored.update(astronaut)
    assert restored.compute().item() == pytest.approx(model.val_iqa.compute().item(), rel=1e-6)


def test_missing_iqa_weights_raise_clear_error(offline_torch_home: Path, tmp_path: Path) -> None:
    cache = offline_torch_home / "hub" / "pyiqa"
    with pytest.raises(RuntimeError, match="niqe_modelparameters.mat") as err:
        NIQE()
    assert str(cache) in str(err.value) and "install_iqa_weights" in str(err.value)
    with pytest.raises(RuntimeError, match="brisque_svm_weights.pth"):
        BRISQUE()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RuntimeError, match=r"weights_dir=.*empty"):
        NIQE(weights_dir=empty)
    with pytest.raises(FileNotFoundError, match="niqe_modelparameters.mat"):
        install_iqa_weights(empty)


def test_iqa_input_validation(offline_torch_home, iqa_dir: Path) -> None:
    niqe = NIQE(weights_dir=iqa_dir)
    with pytest.raises(ValueError, match="at least 96"):
        niqe.update(torch.rand(1, 3, 64, 200))
    with pytest.raises(ValueError, match="3 channels"):
        niqe.update(torch.rand(1, 4, 128, 128))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        niqe.update(torch.rand(3, 128, 128))


def test_import_does_not_load_pyiqa() -> None:
    code = "import sys, cirlab.metrics; assert 'pyiqa' not in sys.modules, 'pyiqa imported eagerly'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_niqe_and_brisque_average_the_same_grid_points_as_psnr(offline_torch_home, iqa_dir: Path) -> None:
    """The clean grid point (t = 0, an identity check) is out of test/psnr, so out of NIQE/BRISQUE too."""
    from cirlab.models.cresmd import CResMD

    module = CResMD(net={"_target_": "cirlab.archs.cresmd.CResMDNet", "nf": 8, "nb": 1},
                    optimizer={"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-3},
                    test_iqa=True, iqa_weights_dir=str(iqa_dir))
    module.test_levels = torch.tensor([[0.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.25, 0.0, 0.0]])
    output = torch.rand(3, 3, 128, 128)
    module.update_iqa(output, torch.tensor([0, 1, 2]))
    assert int(module.test_niqe.count) == int(module.test_brisque.count) == 2
    expected = NIQE(weights_dir=iqa_dir)
    expected.update(output[1:])
    assert torch.allclose(module.test_niqe.compute(), expected.compute())
