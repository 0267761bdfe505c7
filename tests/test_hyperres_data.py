"""Single-type level data (HyperRes): degradations, deterministic level sets, k-level batches."""

import pytest
import torch
from torch.utils.data import default_collate

from cirlab.data.degradations import jpeg_roundtrip
from cirlab.data.hyperres import (
    TASKS,
    LevelDataModule,
    LevelSetDataset,
    LevelSetSpec,
    bicubic_resize,
    build_level_set,
    degrade_level,
    get_task,
    sr_reach,
)
from cirlab.data.loading import CropDataset, cut_patches
from cirlab.metrics import paper_psnr
from cirlab.metrics.conventions import quantize_uint8


def smooth_image(size: int = 64, batch: int = 2) -> torch.Tensor:
    """A uint8 image batch with texture but no clipping (values 60..195)."""
    y, x = torch.meshgrid(torch.linspace(0, 6, size), torch.linspace(0, 6, size), indexing="ij")
    base = torch.stack([torch.sin(x + y), torch.cos(x - y), torch.sin(2 * x)]) * 0.25 + 0.5
    return (base * 255).round().to(torch.uint8).expand(batch, -1, -1, -1).contiguous()


def test_defaults_match_the_reference_levels():
    assert get_task("denoise").train_levels == (15, 35, 55, 75)
    assert get_task("dejpeg").train_levels == (10, 30, 50, 80)
    assert get_task("sr").train_levels == (2, 3, 4, 5)
    assert get_task("denoise").sweep_levels == tuple(range(5, 95, 5))
    assert (get_task("dejpeg").channel, get_task("sr").channel, get_task("denoise").channel) == ("y_rounded", "y_rounded", "rgb")
    assert [TASKS["sr"].label(v) for v in (2, 2.5)] == ["x2", "x2.5"]


def test_noise_beyond_cresmd_range_has_the_right_sigma_and_is_deterministic():
    clean = smooth_image()
    generator = torch.Generator().manual_seed(0)
    noisy = degrade_level(clean, "denoise", 75, generator)
    assert noisy.dtype == torch.uint8
    residual = noisy.float() - clean.float()
    # clipping at 0/255 shrinks the spread a little at sigma 75 on values 60..195
    assert 60 < residual.std().item() < 76
    again = degrade_level(clean, "denoise", 75, torch.Generator().manual_seed(0))
    assert torch.equal(noisy, again)


def test_dejpeg_is_real_jpeg_and_quality_orders_psnr():
    clean = smooth_image()
    assert torch.equal(degrade_level(clean, "dejpeg", 30), jpeg_roundtrip(clean, 30))
    psnr = [paper_psnr(degrade_level(clean, "dejpeg", q).float() / 255, clean.float() / 255, "y").mean() for q in (10, 50, 90)]
    assert psnr[0] < psnr[1] < psnr[2]


def test_sr_is_bicubic_down_and_up_to_the_same_size():
    clean = smooth_image(62)
    assert torch.equal(degrade_level(clean, "sr", 1), clean)  # scale 1: bicubic to the same size is the identity
    outputs = {s: degrade_level(clean, "sr", s) for s in (2, 3, 5)}
    assert all(out.shape == clean.shape and out.dtype == torch.uint8 for out in outputs.values())
    psnr = [paper_psnr(outputs[s].float() / 255, clean.float() / 255).mean() for s in (2, 3, 5)]
    assert psnr[0] > psnr[1] > psnr[2]


@pytest.mark.parametrize(("task", "level", "message"), [("dejpeg", 5, "integer in"), ("dejpeg", 30.5, "integer"),
                                                          ("denoise", -1, "noise sigma"), ("sr", 0.5, "scale")])
def test_out_of_range_levels_name_the_key(task, level, message):
    with pytest.raises(ValueError, match=message):
        LevelDataModule(task=task, levels=[level], train_dir=None, val_dir=None)
    with pytest.raises(ValueError, match="data.task"):
        get_task("deblur")


def test_level_set_is_deterministic_cached_and_stable_per_level(tmp_path):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(smooth_image(40 + i, 1)[0].permute(1, 2, 0).numpy()).save(folder / f"im{i}.png")
    spec = LevelSetSpec(folder=str(folder), task="denoise", levels=[15, 50], seed=3)
    data = build_level_set(spec, tmp_path / "cache", progress=False)
    assert [tuple(x.shape) for x in data["inputs"]] == [(2, 3, 40, 40), (2, 3, 40, 40)]  # 41 cropped to even
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1
    again = build_level_set(spec, None, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(data["inputs"], again["inputs"]))
    more = build_level_set(LevelSetSpec(folder=str(folder), task="denoise", levels=[5, 15, 50], seed=3), None, progress=False)
    assert torch.equal(more["inputs"][1][1:], data["inputs"][1])  # adding a level changes no other input
    item = LevelSetDataset(data, 255.0)[1]
    assert item["input"].shape == item["target"].shape == (2, 3, 40, 40)
    torch.testing.assert_close(item["level"], torch.tensor([[15 / 255], [50 / 255]]))
    assert item["grid_index"].tolist() == [0, 1]


def textured_image(height: int, width: int, seed: int = 0) -> torch.Tensor:
    """A uint8 (3, H, W) image with detail at every scale down to 4 pixels (bicubic-enlarged noise)."""
    low = torch.rand(1, 3, height // 4, width // 4, generator=torch.Generator().manual_seed(seed))
    big = torch.nn.functional.interpolate(low, size=(height, width), mode="bicubic").clamp(0, 1)
    return (big[0] * 255).round().to(torch.uint8)


def margin_batch(datamodule: LevelDataModule, image: torch.Tensor, ids=(6, 7, 8), augment: bool = True) -> dict:
    """A training batch of crops as the DataModule's loader cuts them (margin and patch offsets)."""
    dataset = CropDataset([image], datamodule.patch_size, seed=1, augment=augment, margin=datamodule.degrade_margin)
    return default_collate([dataset[i] for i in ids])


@pytest.mark.parametrize("task", ["denoise", "dejpeg", "sr"])
def test_training_batch_degrades_the_same_crops_at_each_level(task):
    datamodule = LevelDataModule(task=task, train_dir=None, val_dir=None, seed=1, patch_size=32)
    raw = margin_batch(datamodule, textured_image(120, 120))
    batch = datamodule.on_after_batch_transfer(dict(raw), 0)
    k = len(datamodule.levels)
    assert batch["inputs"].shape == (k, 3, 3, 32, 32) and batch["levels"].shape == (k, 1)
    torch.testing.assert_close(batch["levels"][:, 0], torch.tensor(datamodule.levels) / 255)
    assert torch.equal(batch["target"], cut_patches(raw["clean"], raw["offset"], 32).float() / 255)
    for i, level in enumerate(datamodule.levels):
        if task != "denoise":  # deterministic degradations: each level degrades the whole crop, then the patch is cut
            whole = degrade_level(raw["clean"], task, level, sr_upscale="scale")
            assert torch.equal(batch["inputs"][i], cut_patches(whole, raw["offset"], 32).float() / 255)
    # heavier degradation, lower PSNR (levels ascend; JPEG quality ascending means lighter)
    psnr = [paper_psnr(batch["inputs"][i], batch["target"]).mean().item() for i in range(k)]
    assert psnr == (sorted(psnr) if task == "dejpeg" else sorted(psnr, reverse=True))
    again = datamodule.on_after_batch_transfer(dict(raw), 0)
    assert torch.equal(again["inputs"], batch["inputs"])


def find(patch: torch.Tensor, image: torch.Tensor) -> tuple[int, int]:
    size = patch.shape[-1]
    windows = image.unfold(1, size, 1).unfold(2, size, 1)  # (3, H - P + 1, W - P + 1, P, P) view
    (hit,) = (windows == patch[:, None, None]).flatten(3).all(-1).all(0).nonzero().tolist()
    return hit[0], hit[1]


@pytest.mark.parametrize(("task", "levels"), [("dejpeg", [10, 50]), ("sr", [2, 3, 4, 5])])
def test_training_patch_is_the_same_window_of_the_whole_degraded_image(task, levels):
    """Issue 11: level data degrades a crop with its context, so a training patch equals the same window of
    the image degraded from the crop's corner on (DeJPEG: the block grid starts there, at a random phase to the
    patch; SR: the bicubic grid starts there and scales by s exactly)."""
    image = textured_image(160, 176)
    datamodule = LevelDataModule(task=task, levels=levels, train_dir=None, val_dir=None, seed=1, patch_size=32)
    assert datamodule.degrade_margin == (10 if task == "dejpeg" else 11)
    raw = margin_batch(datamodule, image, ids=range(12), augment=False)
    batch = datamodule.on_after_batch_transfer(dict(raw), 0)
    phases = set()
    for j in range(12):
        oy, ox = raw["offset"][j].tolist()
        top, left = find(cut_patches(raw["clean"], raw["offset"], 32)[j], image)
        origin = image[None, :, top - oy :, left - ox :].contiguous()
        phases.add((oy % 16, ox % 16))
        for i, level in enumerate(levels):
            whole = degrade_level(origin, task, level, sr_upscale="scale")[0, :, oy : oy + 32, ox : ox + 32]
            assert torch.equal(batch["inputs"][i, j], whole.float() / 255), (j, level)
    assert len(phases) > 6  # the patch is not at one fixed phase of the grid


def test_sr_downscale_maps_coordinates_with_the_scale_as_opencv():
    """cv2.resize(fx=1/s) maps output pixel i to input (i + 0.5) s - 0.5 with s exactly: at s = 3 the
    bicubic taps fall on whole pixels, so the small image is every third pixel from the second on; resampling
    to the size round(62 / 3) = 21 maps with 62 / 21 instead."""
    clean = smooth_image(62, 1)
    picked = clean[..., 1::3, 1::3][..., :21, :21]
    assert torch.equal(bicubic_resize(clean, (21, 21), 1 / 3), picked)
    size_mapped = quantize_uint8(torch.nn.functional.interpolate(clean.float() / 255, size=(21, 21), mode="bicubic"))
    assert not torch.equal(size_mapped, picked)
    up = quantize_uint8(torch.nn.functional.interpolate(picked.float() / 255, size=(62, 62), mode="bicubic"))
    assert torch.equal(degrade_level(clean, "sr", 3), up)  # the way back: by the size ratio, cv2.resize(dsize=)
    # by s exactly both ways (training crops): up-sampled pixel 3 i + 1 is small pixel i again
    assert torch.equal(degrade_level(clean, "sr", 3, sr_upscale="scale")[..., 1:61:3, 1:61:3], picked[..., :20, :20])


def test_level_margins_default_per_task_and_bad_ones_name_the_key(caplog):
    defaults = {task: LevelDataModule(task=task, train_dir=None, val_dir=None).degrade_margin for task in TASKS}
    assert defaults == {"denoise": 0, "dejpeg": 10, "sr": sr_reach(5)} and sr_reach(5) == 11
    assert LevelDataModule(task="sr", levels=[6], train_dir=None, val_dir=None).degrade_margin == 13
    assert LevelDataModule(task="denoise", train_dir=None, val_dir=None, degrade_margin=4).degrade_margin == 4
    for bad in (-2, 1.5, "8"):
        with pytest.raises(ValueError, match="data.degrade_margin"):
            LevelDataModule(task="dejpeg", train_dir=None, val_dir=None, degrade_margin=bad)
    with caplog.at_level("WARNING"):
        LevelDataModule(task="sr", train_dir=None, val_dir=None, degrade_margin=4)
    assert "data.degrade_margin=4" in caplog.text
    datamodule = LevelDataModule(task="dejpeg", train_dir=None, val_dir=None, patch_size=32)
    with pytest.raises(ValueError, match="data.degrade_margin=10 needs 67x67"):
        datamodule.on_after_batch_transfer({"clean": smooth_image(32, 2), "id": torch.tensor([0, 1])}, 0)


def test_datamodule_builds_level_sets_from_a_folder(shared_cache):
    from cirlab.data.embedded import write_embedded

    folders = write_embedded(shared_cache / "embedded")
    datamodule = LevelDataModule(task="sr", levels=[2, 4], val_levels=[2, 3], test_levels=[2, 3, 6],
                                 train_dir=str(folders["train"]), val_dir=str(folders["heldout"]),
                                 test_dir=str(folders["heldout"]), patch_size=32, batch_size=2, num_workers=0,
                                 val_crop=48, test_crop=40, val_max_images=1, cache_dir=str(shared_cache))
    datamodule.prepare_data()
    datamodule.setup("fit")
    datamodule.setup("test")
    assert len(datamodule.val_set) == 1 and len(datamodule.test_set) == 2
    assert datamodule.val_set[0]["input"].shape == (2, 3, 48, 48)
    assert datamodule.test_set[1]["level"].shape == (3, 1)
    assert datamodule.example_inputs() is None  # the 3-D task-grid picture stays off
    assert datamodule.level_example().shape == (1, 3, 48, 48)
    raw = next(iter(datamodule.train_dataloader()))
    batch = datamodule.on_after_batch_transfer(raw, 0)
    assert batch["inputs"].shape == (2, 2, 3, 32, 32)
