"""Tests for cirlab.data.degradations (blur, noise + uint8 rounding, JPEG, task encoding)."""

from __future__ import annotations

import io
import math
import sys
import warnings
from contextlib import nullcontext

import numpy as np
import pytest
import torch

from cirlab.data import degradations as D
from cirlab.data.degradations import degrade, gaussian_blur, gaussian_kernel1d, jpeg_roundtrip
from cirlab.tasks import (
    NO_JPEG,
    physical_to_task,
    physical_to_task_scalar,
    task_to_physical,
    task_to_physical_scalar,
    validate_physical,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _np_gaussian_2d(r: float, size: int = 21) -> np.ndarray:
    """Independent construction: 2-D Gaussian on the size x size window, normalised to sum 1."""
    h = size // 2
    yy, xx = np.mgrid[-h : h + 1, -h : h + 1].astype(np.float64)
    k = np.exp(-(xx**2 + yy**2) / (2.0 * r * r))
    return k / k.sum()


def _np_blur_replicate(img: np.ndarray, r: float) -> np.ndarray:
    """Direct (non-separable) 2-D correlation of (C, H, W) with edge-replicated padding."""
    k = _np_gaussian_2d(r)
    h = k.shape[0] // 2
    pad = np.pad(img, ((0, 0), (h, h), (h, h)), mode="edge")
    out = np.zeros_like(img, dtype=np.float64)
    H, W = img.shape[1:]
    for dy in range(k.shape[0]):
        for dx in range(k.shape[1]):
            out += k[dy, dx] * pad[:, dy : dy + H, dx : dx + W]
    return out


def _natural_crops(
    n: int, size: int = 64, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """n crops of scikit-image's astronaut (uint8-exact floats in [0, 1])."""
    from skimage import data

    # (3, 512, 512) uint8
    img = torch.from_numpy(np.ascontiguousarray(data.astronaut())).permute(2, 0, 1)
    crops = [
        img[:, 100 + 37 * i : 100 + 37 * i + size, 150 + 23 * i : 150 + 23 * i + size]
        for i in range(n)
    ]
    return torch.stack(crops).to(dtype) / 255.0


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = ((a.double() - b.double()) ** 2).mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


# ------------------------------------------------------------------------------------ blur


@pytest.mark.parametrize("backend", ["matmul", "blocks", "kornia"])
def test_blur_of_impulse_is_the_normalised_gaussian(backend: str) -> None:
    radii = [0.5, 1.0, 2.3, 4.0]
    n = 41
    img = torch.zeros(len(radii), 3, n, n, dtype=torch.float64)
    img[:, :, n // 2, n // 2] = 1.0
    out = gaussian_blur(img, torch.tensor(radii, dtype=torch.float64), backend=backend)
    for i, r in enumerate(radii):
        expected = np.zeros((n, n))
        expected[n // 2 - 10 : n // 2 + 11, n // 2 - 10 : n // 2 + 11] = (
            _np_gaussian_2d(r)
        )
        for c in range(3):
            np.testing.assert_allclose(out[i, c].numpy(), expected, atol=1e-12, rtol=0)
        assert out[i].sum().item() == pytest.approx(3.0, abs=1e-9)


def test_kernel1d_outer_product_matches_2d_gaussian() -> None:
    for r in (0.3, 1.7, 4.0):
        k = gaussian_kernel1d(torch.tensor([r], dtype=torch.float64))[0].numpy()
        assert k.shape == (D.KERNEL_SIZE,)
        np.testing.assert_allclose(np.outer(k, k), _np_gaussian_2d(r), atol=1e-15)
    delta = gaussian_kernel1d(torch.tensor([0.0]))[0]
    assert delta[10] == 1 and delta.sum() == 1


def test_blur_zero_radius_is_identity_and_mixed_batch() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 3, 32, 40, generator=g)
    assert gaussian_blur(x, torch.zeros(3)) is x  # nothing to do: no work at all
    y = gaussian_blur(x, torch.tensor([0.0, 1.5, 0.0]))
    assert torch.equal(y[0], x[0]) and torch.equal(y[2], x[2])
    assert not torch.allclose(y[1], x[1])


@pytest.mark.parametrize("backend", ["matmul", "blocks", "kornia"])
def test_blur_replicate_border_matches_numpy(backend: str) -> None:
    g = torch.Generator().manual_seed(2)
    # non-square, smaller than 2x the kernel
    x = torch.rand(2, 3, 24, 30, generator=g, dtype=torch.float64)
    radii = [0.8, 3.3]
    y = gaussian_blur(x, torch.tensor(radii, dtype=torch.float64), backend=backend)
    for i, r in enumerate(radii):
        np.testing.assert_allclose(
            y[i].numpy(), _np_blur_replicate(x[i].numpy(), r), atol=1e-10
        )
    const = torch.full((1, 3, 16, 16), 0.37, dtype=torch.float64)
    torch.testing.assert_close(
        gaussian_blur(const, torch.tensor([4.0]), backend=backend), const
    )


def test_blur_backends_agree_float32() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.rand(5, 3, 48, 64, generator=g)
    r = torch.tensor([0.1, 0.7, 0.0, 2.0, 4.0])
    a = gaussian_blur(x, r, backend="matmul")
    b = gaussian_blur(x, r, backend="kornia")
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    torch.testing.assert_close(gaussian_blur(x, r, backend="blocks"), a, atol=1e-6, rtol=0)


def test_blocks_blur_equals_the_full_band_on_margin_crops() -> None:
    """The "blocks" backend (training pairs on CPU) multiplies each block of outputs by its part of the band:
    the same matrix entries as the full banded product. On 99 px crops (64 px patches, 10 px margin) it agrees
    with it to float rounding, and every output still reads the pixels 10 px away (block edges included)."""
    g = torch.Generator().manual_seed(5)
    x = torch.rand(6, 3, 99, 99, generator=g)
    r = torch.tensor([0.3, 1.0, 2.2, 3.1, 4.0, 4.0])
    blocks = gaussian_blur(x, r, backend="blocks")
    torch.testing.assert_close(blocks, gaussian_blur(x, r, backend="matmul"), atol=1e-6, rtol=0)
    impulse = torch.zeros(1, 3, 99, 99)
    impulse[..., 47, 47] = 1.0  # 47 = 2 * 16 + 15: the last column of a block, its reach crosses into the next
    spread = gaussian_blur(impulse, torch.tensor([4.0]), backend="blocks")[0, 0]
    assert (spread[37:58, 37:58] > 0).all() and spread[:37].abs().max() == 0 and spread[:, 58:].abs().max() == 0
    with pytest.raises(ValueError, match="'blocks'"):
        gaussian_blur(x, r, backend="band")


# ----------------------------------------------------------------------------------- noise


def test_noise_has_requested_std() -> None:
    clean = torch.full((2, 3, 256, 256), 0.5)
    levels = torch.tensor([[0.0, 10 / 50, 0.0], [0.0, 30 / 50, 0.0]])
    out = degrade(clean, levels, generator=torch.Generator().manual_seed(0))
    for i, sigma in enumerate((10.0, 30.0)):
        resid = (out[i] - 0.5) * 255.0
        # uint8 rounding adds variance 1/12; clipping is negligible at 0.5 +- 4 sigma
        expected = math.sqrt(sigma**2 + 1 / 12)
        assert resid.std().item() == pytest.approx(expected, rel=0.02)
        assert abs(resid.mean().item()) < 0.2


def test_output_is_uint8_levels_in_unit_range_same_device_dtype() -> None:
    g = torch.Generator().manual_seed(4)
    clean = _natural_crops(4, 32, torch.float64)
    levels = torch.tensor(
        [[1.0, 1.0, 1.0], [0.3, 0.0, 0.0], [0.0, 0.5, 0.0], [0.0, 0.0, 0.0]]
    )
    out = degrade(clean, levels, generator=g)
    assert (
        out.dtype == torch.float64
        and out.shape == clean.shape
        and out.device == clean.device
    )
    assert out.min() >= 0 and out.max() <= 1
    k = out * 255
    torch.testing.assert_close(k, k.round(), atol=1e-9, rtol=0)
    # all-zero levels: identity on uint8-exact input
    assert torch.equal(out[3], clean[3])


def test_same_seed_same_output_different_seed_differs() -> None:
    clean = _natural_crops(3, 32)
    levels = torch.tensor([[0.25, 0.3, 22 / 92], [0.0, 1.0, 0.0], [0.5, 0.2, 1.0]])
    a = degrade(clean, levels, generator=torch.Generator().manual_seed(7))
    b = degrade(clean, levels, generator=torch.Generator().manual_seed(7))
    c = degrade(clean, levels, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_noise_field_argument_is_used() -> None:
    clean = torch.full((2, 3, 16, 16), 0.5)
    field = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    levels = torch.tensor([[0.0, 0.4, 0.0], [0.0, 0.4, 0.0]])
    out = degrade(clean, levels, noise_field=field)
    expected = torch.clamp(torch.round((0.5 + 20 / 255 * field) * 255), 0, 255) / 255
    torch.testing.assert_close(out, expected, atol=1e-7, rtol=0)
    same = degrade(clean, levels, noise_field=torch.cat([field[:1], field[:1]]))
    assert torch.equal(same[0], same[1])


# ------------------------------------------------------------------------------------ JPEG


JPEG_QUALITIES = [10, 30, 50, 80]


def _pillow_roundtrip(u8: torch.Tensor, quality: int, subsampling: int = -1) -> torch.Tensor:
    """Pillow's JPEG encode (libjpeg defaults unless ``subsampling`` is given) + decode of a (3, H, W) uint8."""
    from PIL import Image, JpegImagePlugin

    buf = io.BytesIO()
    Image.fromarray(u8.permute(1, 2, 0).numpy()).save(
        buf, format="JPEG", quality=quality, subsampling=subsampling
    )
    decoded = Image.open(io.BytesIO(buf.getvalue()))
    # Pillow's default is libjpeg's: 4:2:0 (sampling 2); 4:4:4 is sampling 0
    assert JpegImagePlugin.get_sampling(decoded) == (2 if subsampling == -1 else subsampling)
    return torch.from_numpy(np.array(decoded.convert("RGB"))).permute(2, 0, 1)


def _noisy_u8(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Photo crops with noise (hard content for the codec), uint8 (n, 3, h, w)."""
    g = torch.Generator().manual_seed(seed)
    base = _natural_crops(n, max(h, w))[:, :, :h, :w]
    noisy = base + 25 / 255 * torch.randn(base.shape, generator=g)
    return (noisy * 255).round().clamp(0, 255).to(torch.uint8)


def _jpeg_levels(qualities: list[int]) -> torch.Tensor:
    t_jpeg = [0.0 if q == NO_JPEG else (102 - q) / 92 for q in qualities]
    return torch.tensor([[0.0, 0.0, t] for t in t_jpeg])


def test_degrade_jpeg_is_byte_identical_to_pillow_420() -> None:
    """The JPEG step is libjpeg's baseline 4:2:0: the whole decoded image equals Pillow's."""
    clean = _natural_crops(6, 64)
    qualities = JPEG_QUALITIES + [NO_JPEG, 95]
    out = degrade(clean, _jpeg_levels(qualities))
    u8 = (clean * 255).round().to(torch.uint8)
    for i, q in enumerate(qualities):
        if q == NO_JPEG:
            assert torch.equal(out[i], clean[i])
            continue
        ref = _pillow_roundtrip(u8[i], q)
        assert torch.equal(out[i], ref.float() / 255), f"sample {i} (q={q}) differs from Pillow's 4:2:0 JPEG"
        # the reference discriminates: Pillow's 4:4:4 output is another image
        assert not torch.equal(out[i], _pillow_roundtrip(u8[i], q, subsampling=0).float() / 255)
    assert _psnr(out[0], clean[0]) < _psnr(out[5], clean[5])  # q=10 worse than q=95


@pytest.mark.parametrize("size", [(64, 64), (37, 50)])
def test_jpeg_roundtrip_is_byte_identical_to_pillow(size: tuple[int, int]) -> None:
    """Noisy content, whole images, one quality per sample; odd sizes cover partial 4:2:0 blocks."""
    u8 = _noisy_u8(len(JPEG_QUALITIES), *size)
    out = jpeg_roundtrip(u8, torch.tensor(JPEG_QUALITIES))
    for i, q in enumerate(JPEG_QUALITIES):
        assert torch.equal(out[i], _pillow_roundtrip(u8[i], q)), f"q={q}, size {size}"
    # a scalar quality applies to every sample
    scalar = jpeg_roundtrip(u8, 30)
    for i in range(len(JPEG_QUALITIES)):
        assert torch.equal(scalar[i], _pillow_roundtrip(u8[i], 30))


# ------------------------------------------------------------------ patches of margin crops

CROP, PATCH = 99, 64  # a training crop: 64 px patch + 2 x 10 px margin + 15 px of grid phase


def _photo_u8(n: int, size: int, noise: float = 0.0, seed: int = 0) -> torch.Tensor:
    """n uint8 crops from all over the astronaut photo (optionally with Gaussian noise of std ``noise``/255)."""
    from skimage import data

    img = torch.from_numpy(np.ascontiguousarray(data.astronaut())).permute(2, 0, 1).float()
    span = img.shape[-1] - size
    crops = torch.stack([img[:, (37 * i) % span :, (53 * i + 11) % span :][:, :size, :size] for i in range(n)])
    crops = crops + noise * torch.randn(crops.shape, generator=torch.Generator().manual_seed(seed))
    return crops.round().clamp(0, 255).to(torch.uint8)


def _every_offset() -> torch.Tensor:
    """(2 * 36, 2) offsets: every row offset of a 64 px patch in a 99 px crop with spread columns, and transposed."""
    span = CROP - PATCH + 1
    rows = torch.tensor([[i, (7 * i) % span] for i in range(span)])
    return torch.cat([rows, rows.flip(1)])


def test_jpeg_window_is_the_blocks_around_the_window() -> None:
    from cirlab.data.loading import JPEG_GRID

    assert D.jpeg_window(10, PATCH, CROP) == (0, 80)  # 5 of the crop's 7 blocks per side
    assert D.jpeg_window(20, PATCH, CROP) == (16, 96)
    assert D.jpeg_window(35, PATCH, CROP) == (32, 99)  # up to the crop's end and its padded last block
    assert D.jpeg_window(0, 16, 16) == (0, 16)
    for start in range(CROP - PATCH + 1):
        s, e = D.jpeg_window(start, PATCH, CROP)
        assert s % JPEG_GRID == 0 and (e % JPEG_GRID == 0 or e == CROP)
        assert s <= max(0, start - 2) and e >= min(CROP, start + PATCH + 2)
        assert s > start - 2 - JPEG_GRID and (e < start + PATCH + 2 + JPEG_GRID or e == CROP)
    with pytest.raises(ValueError, match="window"):
        D.jpeg_window(40, PATCH, CROP)


@pytest.mark.parametrize("content", ["noisy", "photo"])
def test_jpeg_roundtrip_patches_equal_the_whole_crops_round_trip(content: str, monkeypatch) -> None:
    """Compressing only the blocks a patch depends on gives the patch of the whole crop's round trip, byte for
    byte, at every patch offset (and with it every phase of the 16 px grid), quality per sample."""
    from cirlab.data.loading import cut_patches

    offsets = _every_offset()
    n = len(offsets)
    crops = _photo_u8(n, CROP, noise=25.0 if content == "noisy" else 0.0, seed=3)
    qualities = torch.tensor([(10, 30, 50, 80, 95, NO_JPEG, 10, 30, 50)[i % 9] for i in range(n)])
    whole = cut_patches(jpeg_roundtrip(crops, qualities), offsets, PATCH)
    patches = D.jpeg_roundtrip_patches(crops, qualities, offsets, PATCH)
    assert patches.dtype == torch.uint8 and patches.shape == (n, 3, PATCH, PATCH)
    assert torch.equal(patches, whole)
    # the windows hold fewer 16 px blocks than the crop's 7 x 7: at most 6 x 6, about half for patches away
    # from the crop's borders (offsets 10..25, as CropDataset draws them inside an image)
    inner = [o for o in offsets.tolist() if 10 <= min(o) and max(o) <= 25]
    blocks = [math.ceil((y1 - y0) / 16) * math.ceil((x1 - x0) / 16)
              for (y0, y1), (x0, x1) in ((D.jpeg_window(oy, PATCH, CROP), D.jpeg_window(ox, PATCH, CROP)) for oy, ox in inner)]
    assert len(inner) > 10 and max(blocks) <= 36 and sum(blocks) / len(blocks) < 0.6 * 49
    # the check discriminates: windows without the chroma samples next to the patch change some patches
    monkeypatch.setattr(D, "_JPEG_CHROMA_REACH", 0)
    assert not torch.equal(D.jpeg_roundtrip_patches(crops, qualities, offsets, PATCH), whole)


def _patch_levels(b: int, seed: int) -> torch.Tensor:
    """(b, 3) task levels mixing no/mild/strong blur and noise and JPEG qualities on the grid, zeros included."""
    g = torch.Generator().manual_seed(seed)
    blur = torch.tensor([0.0, 0.25, 1.0])[torch.randint(0, 3, (b,), generator=g)]
    noise = torch.tensor([0.0, 0.1, 0.6])[torch.randint(0, 3, (b,), generator=g)]
    jpeg = _jpeg_levels([(NO_JPEG, 10, 30, 50, 80)[i] for i in torch.randint(0, 5, (b,), generator=g).tolist()])[:, 2]
    return torch.stack([blur, noise, jpeg], dim=1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["auto", "blocks"])
def test_degrade_patches_equal_degrading_the_whole_crops_then_cutting(device: str, backend: str) -> None:
    """degrade_patches (training pairs) is degrade of the whole crops + cut_patches, exactly; with k level sets per
    crop (input and target) the copies share the crop's noise field and offset; a field drawn from a generator
    (on a helper thread on CPU) is the same draw as torch.randn of the crops' shape."""
    from cirlab.data.loading import cut_patches

    b, size, patch = 6, 56, 24
    clean = _natural_crops(b, size).to(device)
    levels = _patch_levels(2 * b, seed=1).to(device)
    levels[b : b + 2] = levels[:2]  # input and target levels equal: the image is made once and copied
    offsets = torch.randint(0, size - patch + 1, (b, 2), generator=torch.Generator().manual_seed(2)).to(device)
    field = torch.randn(clean.shape, generator=torch.Generator().manual_seed(3)).to(device)
    out = D.degrade_patches(clean, levels, offsets, patch, noise_field=field, blur_backend=backend)
    whole = degrade(torch.cat([clean, clean]), levels, noise_field=torch.cat([field, field]), blur_backend=backend)
    assert out.shape == (2 * b, 3, patch, patch) and out.dtype == clean.dtype and out.device == clean.device
    assert torch.equal(out, cut_patches(whole, torch.cat([offsets, offsets]), patch))
    assert torch.equal(out[b : b + 2], out[:2])
    three = D.degrade_patches(clean, torch.cat([levels, levels[:b]]), offsets, patch, noise_field=field,
                              blur_backend=backend)
    assert torch.equal(three, torch.cat([out, out[:b]]))
    one = D.degrade_patches(clean, levels[:b], offsets, patch, noise_field=field, blur_backend=backend)
    assert torch.equal(one, cut_patches(degrade(clean, levels[:b], noise_field=field, blur_backend=backend), offsets, patch))
    drawn = D.degrade_patches(clean, levels, offsets, patch, generator=torch.Generator(device=device).manual_seed(4),
                              blur_backend=backend)
    same_draw = torch.randn(clean.shape, generator=torch.Generator(device=device).manual_seed(4), device=device)
    assert torch.equal(drawn, D.degrade_patches(clean, levels, offsets, patch, noise_field=same_draw, blur_backend=backend))
    assert not torch.equal(drawn, out)  # another noise draw


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA device: this test checks that jpeg_roundtrip_patches of a CUDA batch equals the CPU "
    "result byte for byte (windows compressed by libjpeg through host memory)",
)
def test_jpeg_roundtrip_patches_of_cuda_batch_equal_cpu() -> None:
    offsets = _every_offset()[::3]
    crops = _photo_u8(len(offsets), CROP, noise=25.0)
    qualities = torch.tensor([(10, NO_JPEG, 50, 80)[i % 4] for i in range(len(offsets))])
    on_gpu = D.jpeg_roundtrip_patches(crops.cuda(), qualities.cuda(), offsets.cuda(), PATCH)
    assert on_gpu.device.type == "cuda"
    assert torch.equal(on_gpu.cpu(), D.jpeg_roundtrip_patches(crops, qualities, offsets, PATCH))


def test_degrade_patches_validates_before_degrading() -> None:
    clean = _natural_crops(2, 40)
    levels = _patch_levels(4, seed=0)
    good = torch.tensor([[0, 0], [16, 16]])
    with pytest.raises(ValueError, match=r"offsets must have shape \(2, 2\)"):
        D.degrade_patches(clean, levels, torch.zeros(4, 2, dtype=torch.long), 24)
    with pytest.raises(ValueError, match="integers"):
        D.degrade_patches(clean, levels, good.float(), 24)
    with pytest.raises(ValueError, match=r"offsets\[1\]=\(17, 16\)"):
        D.degrade_patches(clean, levels, torch.tensor([[0, 0], [17, 16]]), 24)
    with pytest.raises(ValueError, match="patch_size"):
        D.degrade_patches(clean, levels, good, 0)
    with pytest.raises(ValueError, match=r"levels must have shape \(k \* 2, 3\)"):
        D.degrade_patches(clean, levels[:3], good, 24)
    # degrade itself keeps one level set per image
    with pytest.raises(ValueError, match=r"levels must have shape \(2, 3\) to match clean"):
        degrade(clean, levels)
    with pytest.raises(ValueError, match="backend"):
        D.degrade_patches(clean, levels, good, 24, blur_backend="band")


def _torchvision_deprecates_codecs() -> bool:
    import torchvision

    major, minor = (int(v) for v in torchvision.__version__.split(".")[:2])
    return (major, minor) >= (0, 29)


def test_jpeg_codec_is_torchcodec_without_deprecation_warnings() -> None:
    pytest.importorskip("torchcodec")
    assert D.jpeg_codec()[0] == "torchcodec"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        jpeg_roundtrip(_noisy_u8(2, 32, 32), [30, 80])
    assert not [w for w in caught if issubclass(w.category, DeprecationWarning)], [
        str(w.message) for w in caught
    ]


def test_torchvision_fallback_codec_matches_pillow() -> None:
    """The fallback (torchvision.io's CPU libjpeg) gives the same bytes; its deprecation is not hidden."""
    u8 = _noisy_u8(len(JPEG_QUALITIES), 40, 56)
    for i, q in enumerate(JPEG_QUALITIES):
        deprecated = _torchvision_deprecates_codecs()
        with pytest.warns(DeprecationWarning, match="TorchCodec") if deprecated else nullcontext():
            out = D._roundtrip_torchvision(u8[i], q)
        assert torch.equal(out, _pillow_roundtrip(u8[i], q)), f"q={q}"


def test_jpeg_codec_falls_back_with_a_warning_when_torchcodec_is_missing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # torchcodec not importable (a None entry in sys.modules makes `import` raise ImportError)
    monkeypatch.setitem(sys.modules, "torchcodec.encoders", None)
    monkeypatch.setattr(D, "_CODEC", None)
    with pytest.warns(RuntimeWarning, match="falling back to torchvision"):
        name, _ = D.jpeg_codec()
    assert name == "torchvision"
    u8 = _noisy_u8(1, 32, 32)
    with pytest.warns(DeprecationWarning) if _torchvision_deprecates_codecs() else nullcontext():
        out = jpeg_roundtrip(u8, 50)
    assert torch.equal(out[0], _pillow_roundtrip(u8[0], 50))


def test_jpeg_roundtrip_direct_and_validation() -> None:
    u8 = (_natural_crops(2, 32) * 255).round().to(torch.uint8)
    same = jpeg_roundtrip(u8, torch.tensor([NO_JPEG, NO_JPEG]))
    assert same is u8
    out = jpeg_roundtrip(u8, [30, NO_JPEG])
    assert out.dtype == torch.uint8 and out.shape == u8.shape
    assert not torch.equal(out[0], u8[0]) and torch.equal(out[1], u8[1])
    assert torch.equal(u8, (_natural_crops(2, 32) * 255).round().to(torch.uint8))  # input untouched
    with pytest.raises(ValueError, match=r"quality\[0\]=5\.0"):
        jpeg_roundtrip(u8, [5, 30])
    with pytest.raises(ValueError, match=r"quality\[1\]=30\.5"):
        jpeg_roundtrip(u8, [30, 30.5])
    with pytest.raises(ValueError, match=r"quality must be a scalar or have shape \(2,\)"):
        jpeg_roundtrip(u8, [30, 30, 30])
    with pytest.raises(ValueError, match="uint8"):
        jpeg_roundtrip(u8.float(), [30, 30])
    with pytest.raises(TypeError, match="images must be a torch.Tensor"):
        jpeg_roundtrip(u8.numpy(), [30, 30])


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA device: this test checks that degrade() of a CUDA batch equals the CPU result "
    "byte for byte (libjpeg 4:2:0 through host memory, not nvJPEG's 4:4:4)",
)
def test_degrade_of_cuda_batch_equals_cpu_exactly() -> None:
    qualities = JPEG_QUALITIES + [NO_JPEG, 95]
    clean = _natural_crops(len(qualities), 64)
    levels = _jpeg_levels(qualities)
    cpu = degrade(clean, levels)
    for dtype in (torch.float32, torch.float64):
        gpu = degrade(clean.to("cuda", dtype), levels.cuda())
        assert gpu.device.type == "cuda" and gpu.dtype == dtype
        levels_gpu = (gpu.cpu().double() * 255).round().to(torch.uint8)
        assert torch.equal(levels_gpu, (cpu.double() * 255).round().to(torch.uint8)), (
            f"{dtype}: CUDA JPEG differs from the CPU's"
        )
    half = degrade(clean.to("cuda", torch.float16), levels.cuda())
    assert half.dtype == torch.float16 and half.device.type == "cuda"
    # every sample compressed (no gather/scatter) and noisy content, odd size, quality on the CPU
    u8 = _noisy_u8(len(JPEG_QUALITIES), 37, 50)
    q = torch.tensor(JPEG_QUALITIES)
    on_gpu = jpeg_roundtrip(u8.cuda(), q)
    assert on_gpu.device.type == "cuda" and on_gpu.dtype == torch.uint8
    assert torch.equal(on_gpu.cpu(), jpeg_roundtrip(u8, q))
    for i, qv in enumerate(JPEG_QUALITIES):
        assert torch.equal(on_gpu[i].cpu(), _pillow_roundtrip(u8[i], qv))


# ----------------------------------------------------------------------- task <-> physical


def test_cresmd_27_point_grid() -> None:
    tb, tn, tj = torch.meshgrid(
        torch.tensor([0.0, 0.25, 1.0]),
        torch.tensor([0.0, 0.3, 1.0]),
        torch.tensor([0.0, 22 / 92, 1.0]),
        indexing="ij",
    )
    levels = torch.stack([tb, tn, tj], dim=-1).reshape(27, 3)
    phys = task_to_physical(levels)
    assert set(phys[:, 0].tolist()) == {0.0, 1.0, 4.0}
    assert sorted({round(v, 4) for v in phys[:, 1].tolist()}) == [0.0, 15.0, 50.0]
    assert set(phys[:, 2].tolist()) == {float(NO_JPEG), 80.0, 10.0}
    torch.testing.assert_close(physical_to_task(phys), levels, atol=1e-6, rtol=0)
    assert task_to_physical_scalar(0.25, 0.3, 22 / 92) == pytest.approx((1.0, 15.0, 80))
    assert physical_to_task_scalar(4.0, 50.0, None) == (1.0, 1.0, 0.0)


def test_round_trips_on_the_grids() -> None:
    r = torch.arange(0, 41, dtype=torch.float64) * 0.1
    s = torch.arange(0, 51, dtype=torch.float64)
    q = torch.tensor([float(NO_JPEG)] + list(range(100, 9, -2)), dtype=torch.float64)
    n = max(len(r), len(s), len(q))
    phys = torch.stack([r.repeat(2)[:n], s[:n], q.repeat(2)[:n]], dim=-1)
    back = task_to_physical(physical_to_task(phys))
    torch.testing.assert_close(back, phys, atol=1e-9, rtol=0)
    # every integer quality 10..100 survives the round trip, and t is (102 - q) / 92
    q_all = torch.arange(10, 101, dtype=torch.float32)
    phys_q = torch.stack([torch.zeros(91), torch.zeros(91), q_all], dim=-1)
    t = physical_to_task(phys_q)
    torch.testing.assert_close(t[:, 2], (102 - q_all) / 92)
    assert torch.equal(task_to_physical(t)[:, 2], q_all)
    # task grid -> physical -> task
    tj = torch.tensor([0.0] + [k * 2 / 92 for k in range(1, 47)], dtype=torch.float64)
    lv = torch.stack(
        [torch.zeros(47), torch.linspace(0, 1, 47, dtype=torch.float64), tj], dim=-1
    )
    torch.testing.assert_close(
        physical_to_task(task_to_physical(lv)), lv, atol=1e-12, rtol=0
    )


def test_jpeg_task_to_quality_rule() -> None:
    t = torch.tensor(
        [0.0, 0.5 / 92, 0.99 / 92, 1.0 / 92, 1.4 / 92, 2 / 92, 3.4 / 92, 1.0],
        dtype=torch.float64,
    )
    lv = torch.stack([torch.zeros_like(t), torch.zeros_like(t), t], dim=-1)
    q = task_to_physical(lv)[:, 2].tolist()
    assert q == [NO_JPEG, NO_JPEG, NO_JPEG, 100, 100, 100, 99, 10]


# ------------------------------------------------------------------------------ validation


def test_out_of_range_levels_raise_with_name_and_value() -> None:
    clean = torch.rand(2, 3, 16, 16)
    with pytest.raises(ValueError, match=r"levels\[1, 1\] \(noise\)=1\.5"):
        degrade(clean, torch.tensor([[0.0, 0.0, 0.0], [0.0, 1.5, 0.0]]))
    with pytest.raises(ValueError, match=r"\(blur\)=-0\.25"):
        task_to_physical(torch.tensor([-0.25, 0.0, 0.0]))
    with pytest.raises(ValueError, match="nan"):
        task_to_physical(torch.tensor([0.0, float("nan"), 0.0]))
    with pytest.raises(ValueError, match=r"r \(blur radius\)=5\.0"):
        physical_to_task(torch.tensor([5.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match=r"sigma \(noise\)=60\.0"):
        physical_to_task(torch.tensor([0.0, 60.0, 0.0]))
    with pytest.raises(ValueError, match=r"q \(JPEG quality\)=5\.0"):
        validate_physical(torch.tensor([[0.0, 0.0, 80.0], [0.0, 0.0, 5.0]]))
    with pytest.raises(ValueError, match=r"q \(JPEG quality\)=50\.5"):
        physical_to_task(torch.tensor([0.0, 0.0, 50.5]))
    with pytest.raises(ValueError, match="radius"):
        gaussian_blur(clean, torch.tensor([1.0, 4.5]))


def test_bad_shapes_and_dtypes_raise() -> None:
    clean = torch.rand(2, 3, 16, 16)
    ok = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"clean must have shape \(B, 3, H, W\)"):
        degrade(torch.rand(2, 1, 16, 16), ok)
    with pytest.raises(ValueError, match=r"clean must have shape"):
        degrade(torch.rand(3, 16, 16), ok)
    with pytest.raises(ValueError, match="dtype torch.uint8"):
        degrade((clean * 255).to(torch.uint8), ok)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        degrade(clean * 2, ok)
    with pytest.raises(ValueError, match=r"levels must have shape \(2, 3\)"):
        degrade(clean, torch.zeros(3, 3))
    with pytest.raises(ValueError, match=r"shape \(\.\.\., 3\)"):
        degrade(clean, torch.zeros(2, 2))
    with pytest.raises(ValueError, match="floating"):
        degrade(clean, torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="noise_field"):
        degrade(
            clean,
            torch.tensor([[0.0, 0.5, 0.0]] * 2),
            noise_field=torch.zeros(1, 3, 16, 16),
        )


@pytest.mark.parametrize("device", DEVICES)
def test_degrade_on_device(device: str) -> None:
    g = torch.Generator(device=device).manual_seed(0)
    clean = _natural_crops(3, 32).to(device)
    levels = torch.tensor(
        [[0.25, 0.3, 22 / 92], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]], device=device
    )
    out = degrade(clean, levels, generator=g)
    assert out.device.type == device and out.shape == clean.shape
    assert torch.equal(out[2], clean[2])
    g2 = torch.Generator(device=device).manual_seed(0)
    assert torch.equal(out, degrade(clean, levels, generator=g2))
