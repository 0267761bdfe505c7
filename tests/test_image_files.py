"""Tests for cirlab.data.image_files: folder listing, per-file validation, scanning, crops."""

from __future__ import annotations

import logging
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from cirlab.data.image_files import (
    IMAGE_EXTENSIONS,
    ImageFolderError,
    center_crop,
    check_image,
    crop_to_multiple,
    header_size,
    list_images,
    load_image,
    scan_folder,
)

# ------------------------------------------------------------------ helpers


def _rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def save_rgb(path: Path, h: int = 24, w: int = 32, seed: int = 0) -> np.ndarray:
    arr = _rgb(h, w, seed)
    Image.fromarray(arr, "RGB").save(path)
    return arr


def write_png_raw(path: Path, arr: np.ndarray, color_type: int) -> None:
    """Write a PNG by hand (so we control the bit depth): color_type 2 = RGB, 6 = RGBA."""
    h, w = arr.shape[:2]
    depth = 16 if arr.dtype == np.uint16 else 8
    sample = ">u2" if depth == 16 else "u1"
    raw = b"".join(b"\x00" + arr[y].astype(sample).tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + tag
            + data
            + struct.pack(">I", zlib.crc32(tag + data))
        )

    ihdr = struct.pack(">IIBBBBB", w, h, depth, color_type, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def assert_error(fn, *args, contains: tuple[str, ...], **kwargs) -> ImageFolderError:
    with pytest.raises(ImageFolderError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    for part in contains:
        assert part in msg, f"{part!r} not in {msg!r}"
    return info.value


# ------------------------------------------------------------------ list_images


def test_extensions_cover_the_formats():
    assert set(IMAGE_EXTENSIONS) == {
        ".png",
        ".jpg",
        ".jpeg",
        ".bmp",
        ".tif",
        ".tiff",
        ".webp",
    }


def test_missing_folder_names_key_and_path(tmp_path):
    missing = tmp_path / "nope"
    err = assert_error(
        list_images,
        missing,
        contains=("data.train_dir", str(missing), "does not exist"),
    )
    assert err.path == missing
    assert_error(
        list_images, missing, config_key="data.val_dir", contains=("data.val_dir",)
    )


def test_not_a_folder_and_no_folder(tmp_path):
    f = tmp_path / "file.png"
    save_rgb(f)
    assert_error(list_images, f, contains=("data.train_dir", str(f), "not a folder"))
    assert_error(list_images, "", contains=("data.train_dir", "no folder"))
    assert_error(list_images, None, contains=("data.train_dir",))


def test_empty_folder(tmp_path):
    assert_error(
        list_images,
        tmp_path,
        contains=("data.train_dir", str(tmp_path), "no image files", ".png"),
    )


def test_folder_with_only_text_files_counts_them(tmp_path):
    for i in range(3):
        (tmp_path / f"note{i}.txt").write_text("hi")
    err = assert_error(
        list_images,
        tmp_path,
        contains=(str(tmp_path), "3 non-image", "note0.txt", ".bmp"),
    )
    assert ".webp" in str(err)


def test_subfolder_hint_and_recursive(tmp_path):
    sub = tmp_path / "DIV2K_train_HR"
    sub.mkdir()
    save_rgb(sub / "0001.png")
    assert_error(list_images, tmp_path, contains=("DIV2K_train_HR", "subfolder"))
    assert list_images(tmp_path, recursive=True) == [sub / "0001.png"]


def test_listing_is_sorted_case_insensitive_extension_and_ignores_other_files(tmp_path):
    for name in ["b.PNG", "a.jpg", "c.Bmp", "d.tiff", "e.webp"]:
        Image.fromarray(_rgb(8, 8), "RGB").save(
            tmp_path / name,
            format={
                ".png": "PNG",
                ".jpg": "JPEG",
                ".bmp": "BMP",
                ".tiff": "TIFF",
                ".webp": "WEBP",
            }[Path(name).suffix.lower()],
        )
    (tmp_path / "readme.txt").write_text("x")
    (tmp_path / "sub.png").mkdir()  # a folder named like an image is not a file
    assert [p.name for p in list_images(tmp_path)] == [
        "a.jpg",
        "b.PNG",
        "c.Bmp",
        "d.tiff",
        "e.webp",
    ]


# ------------------------------------------------------------------ load_image / check_image


def test_load_rgb_png_and_bmp_exact(tmp_path):
    for ext in (".png", ".bmp", ".tif"):
        p = tmp_path / f"x{ext}"
        arr = save_rgb(p, 13, 17)
        t = load_image(p)
        assert t.dtype == torch.uint8 and t.shape == (3, 13, 17) and t.is_contiguous()
        assert torch.equal(t, torch.from_numpy(arr).permute(2, 0, 1))
        assert check_image(p) == (13, 17)


def test_odd_size_accepted(tmp_path):
    p = tmp_path / "odd.png"
    save_rgb(p, 31, 45)
    assert load_image(p).shape == (3, 31, 45)
    assert check_image(p, min_size=31) == (31, 45)


def test_palette_image_becomes_rgb(tmp_path):
    p = tmp_path / "pal.png"
    Image.fromarray(_rgb(10, 12), "RGB").convert("P").save(p)
    assert Image.open(p).mode == "P"
    t = load_image(p)
    assert t.shape == (3, 10, 12)
    assert torch.equal(
        t, torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1)
    )


def test_truncated_png(tmp_path):
    p = tmp_path / "trunc.png"
    save_rgb(p, 64, 64)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    assert_error(load_image, p, contains=("trunc.png", "truncated"))
    assert_error(check_image, p, contains=("trunc.png", "truncated"))


def test_truncated_jpeg(tmp_path):
    p = tmp_path / "trunc.jpg"
    Image.fromarray(_rgb(64, 64), "RGB").save(p, quality=95)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    assert_error(check_image, p, contains=("trunc.jpg", "truncated"))


def test_load_truncated_images_flag_must_stay_false(tmp_path, monkeypatch):
    p = tmp_path / "ok.png"
    save_rgb(p)
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        load_image(p)


def test_text_file_named_png_and_empty_file(tmp_path):
    p = tmp_path / "fake.png"
    p.write_text("this is not an image")
    assert_error(load_image, p, contains=("fake.png", "not a readable image"))
    e = tmp_path / "empty.jpg"
    e.write_bytes(b"")
    assert_error(check_image, e, contains=("empty.jpg",))


def test_grayscale_rejected_unless_asked(tmp_path):
    p = tmp_path / "gray.png"
    g = _rgb(9, 11)[..., 0]
    Image.fromarray(g, "L").save(p)
    assert_error(load_image, p, contains=("gray.png", "grayscale", "RGB"))
    t = load_image(p, mode="gray_to_rgb")
    assert t.shape == (3, 9, 11)
    for c in range(3):
        assert torch.equal(t[c], torch.from_numpy(g))
    assert check_image(p, mode="gray_to_rgb") == (9, 11)
    b = tmp_path / "bilevel.bmp"
    Image.fromarray(g > 128).save(b)
    assert_error(check_image, b, contains=("bilevel.bmp", "grayscale"))


def test_alpha_rejected(tmp_path):
    rgba = tmp_path / "rgba.png"
    Image.fromarray(
        np.dstack([_rgb(8, 8), np.full((8, 8), 255, np.uint8)]), "RGBA"
    ).save(rgba)
    assert_error(
        load_image,
        rgba,
        contains=("rgba.png", "has an alpha channel; convert it to RGB"),
    )
    la = tmp_path / "la.png"
    Image.new("LA", (8, 8)).save(la)
    assert_error(check_image, la, contains=("la.png", "alpha channel"))
    pa = tmp_path / "pal_alpha.png"
    Image.new("RGBA", (8, 8), (1, 2, 3, 0)).convert("P").save(pa)
    assert_error(check_image, pa, contains=("pal_alpha.png", "alpha channel"))


def test_16bit_gray_png_rejected(tmp_path):
    p = tmp_path / "g16.png"
    Image.fromarray(np.full((8, 9), 40000, np.uint16)).save(p)
    assert Image.open(p).mode.startswith("I")
    assert_error(load_image, p, contains=("g16.png", "16-bit", "8-bit"))


def test_16bit_rgb_png_rejected_although_pillow_opens_it_as_rgb(tmp_path):
    p = tmp_path / "rgb16.png"
    write_png_raw(
        p,
        np.random.default_rng(1).integers(0, 65536, (8, 9, 3), dtype=np.uint16),
        color_type=2,
    )
    assert Image.open(p).mode == "RGB"  # the trap: precision would be lost silently
    assert_error(
        load_image,
        p,
        contains=("rgb16.png", "16-bit images are not supported", "8-bit"),
    )
    assert_error(check_image, p, contains=("rgb16.png", "16-bit"))
    # an 8-bit PNG written the same way is fine
    ok = tmp_path / "rgb8.png"
    arr = _rgb(8, 9)
    write_png_raw(ok, arr, color_type=2)
    assert torch.equal(load_image(ok), torch.from_numpy(arr).permute(2, 0, 1))


def test_16bit_rgb_tiff_rejected(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    p = tmp_path / "rgb16.tif"
    tifffile.imwrite(
        p,
        np.random.default_rng(2).integers(0, 65536, (8, 9, 3), dtype=np.uint16),
        photometric="rgb",
    )
    assert_error(check_image, p, contains=("rgb16.tif", "16-bit"))


def test_cmyk_jpeg_rejected(tmp_path):
    p = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (10, 10), (10, 20, 30, 40)).save(p)
    assert_error(load_image, p, contains=("cmyk.jpg", "CMYK", "RGB"))


def test_multiframe_rejected(tmp_path):
    p = tmp_path / "pages.tif"
    frames = [Image.fromarray(_rgb(8, 8, s), "RGB") for s in range(2)]
    frames[0].save(p, save_all=True, append_images=frames[1:])
    assert_error(check_image, p, contains=("pages.tif", "2 frames"))


def test_too_small(tmp_path):
    p = tmp_path / "small.png"
    save_rgb(p, 40, 50)
    err = assert_error(
        check_image,
        p,
        min_size=64,
        contains=(
            "small.png",
            "40x50",
            "smaller than the patch size 64",
            "(data.patch_size)",
        ),
    )
    assert err.path == p
    assert_error(check_image, p, min_size=(32, 64), contains=("32x64",))
    assert check_image(p, min_size=(40, 50)) == (40, 50)
    with pytest.raises(ValueError, match="data.patch_size"):
        check_image(p, min_size=0)


# ------------------------------------------------------------------ scan_folder


def _mixed_folder(root: Path) -> dict[str, Path]:
    root.mkdir(exist_ok=True)
    files = {}
    for i in range(3):
        files[f"good{i}"] = root / f"good{i}.png"
        save_rgb(files[f"good{i}"], 32, 32, seed=i)
    files["fake"] = root / "fake.png"
    files["fake"].write_text("nope")
    files["gray"] = root / "gray.png"
    Image.new("L", (32, 32)).save(files["gray"])
    files["small"] = root / "small.png"
    save_rgb(files["small"], 8, 8)
    (root / "notes.txt").write_text("ignored: not an image extension")
    return files


def test_scan_folder_all_good(tmp_path):
    for i in range(4):
        save_rgb(tmp_path / f"{i}.png", 16, 16, seed=i)
    assert scan_folder(tmp_path, min_size=16) == [
        tmp_path / f"{i}.png" for i in range(4)
    ]


def test_scan_folder_aggregates_every_problem(tmp_path):
    files = _mixed_folder(tmp_path / "train")
    err = assert_error(
        scan_folder,
        tmp_path / "train",
        min_size=16,
        config_key="data.train_dir",
        contains=(
            "data.train_dir",
            "3 of 6",
            "fake.png",
            "gray.png",
            "small.png",
            "on_bad='skip'",
        ),
    )
    assert len(err.problems) == 3
    assert "good0.png" not in str(err)
    assert err.path == files["fake"].parent


def test_scan_folder_truncates_long_listing(tmp_path):
    for i in range(25):
        (tmp_path / f"bad{i:02d}.png").write_text("x")
    save_rgb(tmp_path / "ok.png")
    err = assert_error(
        scan_folder,
        tmp_path,
        num_threads=2,
        contains=("bad00.png", "bad19.png", "... and 5 more"),
    )
    assert "bad20.png" not in str(err)
    assert len(err.problems) == 25


def test_scan_folder_skip_warns_per_file(tmp_path, caplog):
    files = _mixed_folder(tmp_path / "train")
    with caplog.at_level(logging.WARNING, logger="cirlab.data.image_files"):
        good = scan_folder(tmp_path / "train", min_size=16, on_bad="skip")
    assert good == [files[f"good{i}"] for i in range(3)]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3
    for name in ("fake.png", "gray.png", "small.png"):
        assert sum(name in w for w in warnings) == 1


def test_scan_folder_skip_with_nothing_left_raises(tmp_path, caplog):
    (tmp_path / "a.png").write_text("x")
    with caplog.at_level(logging.WARNING):
        assert_error(scan_folder, tmp_path, on_bad="skip", contains=("all 1", "a.png"))


def test_scan_folder_bad_option(tmp_path):
    save_rgb(tmp_path / "a.png")
    with pytest.raises(ValueError, match="on_bad"):
        scan_folder(tmp_path, on_bad="ignore")  # type: ignore[arg-type]


# ------------------------------------------------------------------ crop_to_multiple


def test_crop_to_multiple():
    img = torch.arange(3 * 7 * 9, dtype=torch.uint8).reshape(3, 7, 9)
    out = crop_to_multiple(img, 2)
    assert out.shape == (3, 6, 8)
    assert torch.equal(out, img[:, :6, :8])
    assert out.data_ptr() == img.data_ptr()  # a view
    assert crop_to_multiple(img, 1).shape == img.shape
    assert crop_to_multiple(img.unsqueeze(0), 4).shape == (1, 3, 4, 8)
    with pytest.raises(ValueError):
        crop_to_multiple(img, 0)
    with pytest.raises(ValueError):
        crop_to_multiple(img, 8)


def test_scan_many_files_with_progress_bar(tmp_path):
    for i in range(60):  # above the progress-bar threshold
        Image.new("RGB", (4, 4), (i, i, i)).save(tmp_path / f"{i:03d}.bmp")
    assert len(scan_folder(tmp_path, num_threads=4)) == 60


def test_header_size_reads_the_header_and_names_a_bad_file(tmp_path):
    save_rgb(tmp_path / "a.png", 17, 9)
    assert header_size(tmp_path / "a.png") == (17, 9)
    (tmp_path / "bad.png").write_text("no")
    assert_error(header_size, tmp_path / "bad.png", contains=("bad.png",))


# ------------------------------------------------------------------ center_crop


def test_center_crop_fits_each_side_and_keeps_it_even():
    img = torch.arange(3 * 9 * 12).reshape(3, 9, 12)
    assert center_crop(img, None) is img and center_crop(img, 0) is img
    out = center_crop(img, 5)  # 5 -> 4 (even)
    assert out.shape == (3, 4, 4) and torch.equal(out, img[:, 2:6, 4:8])
    assert out.untyped_storage().data_ptr() == img.untyped_storage().data_ptr()  # a view, no copy
    assert center_crop(img, 10).shape == (3, 8, 10)  # H 9 -> 8; W 12 -> 10
    assert center_crop(img.unsqueeze(0), 100).shape == (1, 3, 8, 12)  # larger than the image: even sides
    assert center_crop(img, 5, even=False).shape == (3, 5, 5)


def test_center_crop_whole_if_smaller_is_the_evaluation_set_rule():
    img = torch.arange(3 * 10 * 14).reshape(3, 10, 14)
    assert center_crop(img, 12, even=False, whole_if_smaller=True) is img  # H 10 < 12: no crop
    out = center_crop(img, 7, even=False, whole_if_smaller=True)  # exactly 7 x 7, odd kept
    assert out.shape == (3, 7, 7) and torch.equal(out, img[:, 1:8, 3:10])


# ------------------------------------------------------------------ symbolic links (issue 15.6)


def _folder_with_bad_links(root: Path) -> Path:
    folder = root / "imgs"
    folder.mkdir()
    save_rgb(folder / "good.png")
    (folder / "dangling.png").symlink_to(root / "gone.png")
    (folder / "loop_a.png").symlink_to(folder / "loop_b.png")
    (folder / "loop_b.png").symlink_to(folder / "loop_a.png")
    (folder / "linked.png").symlink_to(folder / "good.png")  # a working link is an image like any other
    return folder


def test_dangling_and_looping_links_are_named_as_errors(tmp_path):
    folder = _folder_with_bad_links(tmp_path)
    err = assert_error(
        scan_folder,
        folder,
        contains=("3 of 5", "dangling.png' is a broken symbolic link", str(tmp_path / "gone.png"),
                  "loop_a.png' is a symbolic link loop", "loop_b.png' is a symbolic link loop"),
    )
    assert len(err.problems) == 3
    assert_error(check_image, folder / "dangling.png", contains=("broken symbolic link",))


def test_dangling_and_looping_links_are_skipped_with_a_warning_naming_them(tmp_path, caplog):
    folder = _folder_with_bad_links(tmp_path)
    with caplog.at_level(logging.WARNING, logger="cirlab.data.image_files"):
        good = scan_folder(folder, on_bad="skip")
    assert [p.name for p in good] == ["good.png", "linked.png"]
    warned = " ".join(r.getMessage() for r in caplog.records)
    for name in ("dangling.png", "loop_a.png", "loop_b.png"):
        assert f"{folder / name}'" in warned, warned


def test_fifos_and_sockets_named_like_images_are_named_not_opened(tmp_path, caplog):
    import socket

    folder = tmp_path / "imgs"
    folder.mkdir()
    save_rgb(folder / "good.png")
    os.mkfifo(folder / "pipe.png")  # opening it for reading would block forever
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(folder / "sock.jpg"))
    os.mkfifo(folder / "pipe.txt")  # not named like an image: ignored like any other non-image
    try:
        err = assert_error(scan_folder, folder, contains=("2 of 3", "pipe.png' is a FIFO", "sock.jpg' is a socket"))
        assert len(err.problems) == 2
        assert_error(check_image, folder / "pipe.png", contains=("FIFO (named pipe)", "not an image file"))
        with caplog.at_level(logging.WARNING, logger="cirlab.data.image_files"):
            good = scan_folder(folder, on_bad="skip")
        assert [p.name for p in good] == ["good.png"]
        warned = " ".join(r.getMessage() for r in caplog.records)
        assert f"{folder / 'pipe.png'}'" in warned and f"{folder / 'sock.jpg'}'" in warned, warned
    finally:
        server.close()
