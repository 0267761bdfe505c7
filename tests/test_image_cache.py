"""Tests for cirlab.data.image_cache: decoded images in shared memory or in one memory-mapped file per
node, seen by DataLoader workers and by every process of the machine without copies."""

from __future__ import annotations

import os
import pickle
import sys
from multiprocessing.reduction import ForkingPickler
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from cirlab.data.image_cache import DecodedImageCache
from cirlab.data.image_files import ImageFolderError, list_images, load_image


def save_rgb(path: Path, h: int, w: int, seed: int) -> None:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr, "RGB").save(path)


@pytest.fixture
def image_paths(tmp_path) -> list[Path]:
    folder = tmp_path / "imgs"
    folder.mkdir()
    sizes = [(20, 30), (17, 9), (32, 32), (5, 41)]
    for i, (h, w) in enumerate(sizes):
        save_rgb(folder / f"{i:02d}.png", h, w, seed=10 + i)
    return list_images(folder)


def test_cache_matches_load_image_and_is_shared(image_paths):
    cache = DecodedImageCache.from_paths(image_paths, num_threads=2)
    assert len(cache) == 4
    assert cache.names == [p.name for p in image_paths]
    assert cache.sizes == [(20, 30), (17, 9), (32, 32), (5, 41)]
    assert cache.total_bytes == sum(3 * h * w for h, w in cache.sizes)
    for i, p in enumerate(image_paths):
        t = cache[i]
        assert t.dtype == torch.uint8 and t.shape == (3, *cache.sizes[i])
        assert t.is_shared()
        assert torch.equal(t, load_image(p))
    assert torch.equal(cache[-1], cache[3])
    with pytest.raises(IndexError):
        cache[4]


def test_cache_pickles_as_handle_for_workers(image_paths):
    cache = DecodedImageCache.from_paths(image_paths)
    # torch.multiprocessing's pickler (used for spawned DataLoader workers) sends a handle
    assert len(ForkingPickler.dumps(cache)) < cache.total_bytes
    big = DecodedImageCache(
        torch.zeros(3 * 512 * 512, dtype=torch.uint8).share_memory_(),
        [(512, 512)],
        ["z.png"],
        ["/z.png"],
    )
    assert len(ForkingPickler.dumps(big)) < 4096


def test_cache_from_paths_reports_bad_file(image_paths, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("no")
    with pytest.raises(ImageFolderError, match="bad.png"):
        DecodedImageCache.from_paths([*image_paths, bad])


class _CacheDataset(Dataset):
    def __init__(self, cache: DecodedImageCache) -> None:
        self.cache = cache

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor]:
        return i, self.cache[i][:, :4, :4].clone()  # a fixed-size crop


@pytest.mark.parametrize("ctx", ["fork", "spawn"])
def test_dataloader_workers_see_cached_pixels(image_paths, ctx):
    cache = DecodedImageCache.from_paths(image_paths)
    loader = DataLoader(
        _CacheDataset(cache), batch_size=2, num_workers=2, multiprocessing_context=ctx
    )
    seen = {}
    for idx, crops in loader:
        for i, c in zip(idx.tolist(), crops):
            seen[i] = c
    assert sorted(seen) == [0, 1, 2, 3]
    for i, p in enumerate(image_paths):
        assert torch.equal(seen[i], load_image(p)[:, :4, :4])


# ------------------------------------------------------------------ one file per node (store_dir)
def _open_in_child(paths: list[str], store: str, start, results) -> None:
    """Child process: open the cache from ``store`` (after ``start`` is set), touch every byte,
    report what it did and how the kernel accounts the mapped file's pages in this process."""
    start.wait()
    cache = DecodedImageCache.from_paths(paths, store_dir=store)
    checksum = int(sum(int(cache[i].sum()) for i in range(len(cache))))
    private_dirty = rss = 0
    if os.path.exists("/proc/self/smaps"):
        inside = False
        for line in Path("/proc/self/smaps").read_text().splitlines():
            if line and not line[0].isupper():  # a mapping's header line (address range ... path)
                inside = line.endswith(str(cache.file))
            elif inside and line.startswith("Private_Dirty:"):
                private_dirty += int(line.split()[1])
            elif inside and line.startswith("Rss:"):
                rss += int(line.split()[1])
    results.put({"pid": os.getpid(), "built": cache.built, "file": str(cache.file), "inode": os.stat(cache.file).st_ino,
                 "checksum": checksum, "rss_kb": rss, "private_dirty_kb": private_dirty})


@pytest.mark.skipif(sys.platform != "linux", reason="the page accounting of /proc/self/smaps is Linux's")
def test_two_processes_on_one_machine_share_one_decoded_copy(tmp_path):
    """Two processes started together: one decodes into the node's file, the other waits on the
    lock and maps that same file (same inode) without decoding; neither holds a private copy."""
    import multiprocessing

    folder = tmp_path / "big"
    folder.mkdir()
    for i in range(3):
        save_rgb(folder / f"{i}.png", 160, 200, seed=i)  # 3 x 96 000 bytes: many pages
    paths = [str(p) for p in list_images(folder)]
    store = tmp_path / "decoded"
    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Event(), ctx.Queue()
    children = [ctx.Process(target=_open_in_child, args=(paths, str(store), start, results)) for _ in range(2)]
    for child in children:
        child.start()
    start.set()
    reports = [results.get(timeout=120) for _ in children]
    for child in children:
        child.join(timeout=60)
        assert child.exitcode == 0
    assert sorted(r["built"] for r in reports) == [False, True]  # decoded once
    assert reports[0]["file"] == reports[1]["file"] and reports[0]["inode"] == reports[1]["inode"]
    expected = sum(int(load_image(p).sum()) for p in paths)
    assert all(r["checksum"] == expected for r in reports)
    for r in reports:  # the pixels are the file's pages, not a private copy
        assert r["rss_kb"] > 0 and r["private_dirty_kb"] == 0, r
    assert [p.name for p in store.iterdir() if p.suffix == ".u8"] == [Path(reports[0]["file"]).name]
    assert not list(store.glob(".*.tmp"))


def test_stored_cache_reopens_without_decoding_and_rebuilds_for_changed_files(image_paths, tmp_path):
    store = tmp_path / "decoded"
    first = DecodedImageCache.from_paths(image_paths, store_dir=store)
    again = DecodedImageCache.from_paths(image_paths, store_dir=store)
    assert first.built and not again.built and again.file == first.file and again.is_shared()
    for i, p in enumerate(image_paths):
        assert torch.equal(again[i], load_image(p))
    save_rgb(image_paths[0], 20, 30, seed=99)  # same name and size, new pixels: a new key
    os.utime(image_paths[0], ns=(1, 1))
    changed = DecodedImageCache.from_paths(image_paths, store_dir=store)
    assert changed.built and changed.file != first.file and torch.equal(changed[0], load_image(image_paths[0]))


def test_stored_cache_reaches_spawned_workers_as_a_path_and_a_damaged_file_is_named(image_paths, tmp_path):
    cache = DecodedImageCache.from_paths(image_paths, store_dir=tmp_path / "decoded")
    assert len(ForkingPickler.dumps(cache)) < 4096 and len(pickle.dumps(cache)) < 4096  # no pixels travel
    loader = DataLoader(_CacheDataset(cache), batch_size=2, num_workers=1, multiprocessing_context="spawn")
    seen = {i: c for idx, crops in loader for i, c in zip(idx.tolist(), crops)}
    assert all(torch.equal(seen[i], load_image(p)[:, :4, :4]) for i, p in enumerate(image_paths))
    with open(cache.file, "r+b") as handle:
        handle.truncate(10)
    with pytest.raises(RuntimeError, match=rf"{cache.file.name}.*damaged; delete it"):
        DecodedImageCache.from_paths(image_paths, store_dir=tmp_path / "decoded")
