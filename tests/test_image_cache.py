"""Tests for cirlab.data.image_cache: decoded images in shared memory, seen by DataLoader workers."""

from __future__ import annotations

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
