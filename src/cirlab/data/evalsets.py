"""Deterministic validation and test sets, generated once from clean images and cached on disk.

An evaluation set is every clean image of a folder degraded at every point of a level grid
(default: CResMD's 27-point grid, docs/method.md section 1). The target is the clean image and
the task vector is the full input level (absolute ground truth), as in the papers' tables.
:func:`build_eval_set` returns uint8 images (clean ``(3, H, W)``, inputs ``(G, 3, H, W)``) and
the ``(G, 3)`` task-space levels; :class:`EvalSetDataset` serves them as float in ``[0, 1]``.

Generation is deterministic: image ``i`` uses a generator seeded with
``mix_seed(seed, i)``, so two runs (or two machines) score the same inputs. The result is cached
as one file whose name carries a fingerprint of what it holds: the SHA-256 of every source file's
bytes, their names, and every setting (:func:`source_fingerprint`). Names, sizes and times are not
trusted: two folders with same-named, same-sized files of equal mtimes (``setA/val`` and
``setB/val``) get two caches. A reused cache is announced in the log with the folder it was built
from; a damaged one is an error naming the file to delete. Files are written atomically: no
half-written cache is ever read.

Images of odd size are cropped (bottom/right) to even size, as the networks need
(docs/method.md section 6); an optional centre crop (``crop``: exactly ``crop x crop`` when the
image holds it, else the whole image) keeps validation cheap during training.

Sizes are checked from the file headers when the folder is scanned, before any image is decoded,
degraded or restored (:func:`check_eval_sizes`): an image whose evaluated size (after the even and
centre crops) is under :data:`MIN_EVAL_SIDE` on a side (SSIM's 11 x 11 valid window needs it) or
over :data:`MAX_EVAL_PIXELS` pixels is refused with its file, its size and the limit. The set holds
every grid point of every image in memory at once (27 uint8 copies, and float copies while they are
made: about 650 bytes per pixel), so the limit bounds memory; a larger image is evaluated by
cropping it (``protocol.crop`` / ``data.test_crop``) or by restoring it with ``cirlab-restore``,
which tiles.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset

from cirlab.checkpoints import CheckpointError, read_torch_file, save_torch_file
from cirlab.data.image_files import ImageFolderError, center_crop
from cirlab.data.loading import mix_seed
from cirlab.metrics.conventions import quantize_uint8
from cirlab.metrics.fidelity import SSIM_WINDOW
from cirlab.tasks import level_grid

#: Largest evaluated image, in pixels (H x W after the crops): 2048 x 2048. At about 650 bytes per
#: pixel while the 27 degraded copies are made (float) this bounds one image's set to ~2.7 GB;
#: DIV2K's validation images (at most 2040 x 1536) and every standard test set fit.
MAX_EVAL_PIXELS = 2048 * 2048
#: Smallest evaluated side: SSIM's Gaussian window (11, "valid" windows only) must fit.
MIN_EVAL_SIDE = SSIM_WINDOW

#: 2: keyed by the content of the source files (1 was keyed by names, sizes and mtimes).
FORMAT_VERSION = 2

log = logging.getLogger(__name__)


class EvalCacheError(RuntimeError):
    """A cached evaluation set that cannot be used; the message names the file to delete."""


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes (hex)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def source_fingerprint(paths: Sequence[Path]) -> list[tuple[str, str]]:
    """``(name, sha256 of the bytes)`` of each source image, in order: what a cache of images
    generated from ``paths`` depends on (the names are kept because the tables show them)."""
    return [(Path(p).name, file_digest(Path(p))) for p in paths]


def load_cache(cache_file: Path, sources: list[tuple[str, str]], folder: str | Path) -> dict | None:
    """The cached set in ``cache_file`` if it exists and was built from ``sources`` (else None,
    and it is regenerated). A file that cannot be read is an :class:`EvalCacheError` naming it."""
    if not cache_file.exists():
        return None
    try:
        data = read_torch_file(cache_file, what="cached evaluation set")
    except CheckpointError as error:
        raise EvalCacheError(f"evaluation-set cache {cache_file} is damaged ({error}); delete that file "
                             f"(rm '{cache_file}') and run again to regenerate it from {folder}") from None
    if not isinstance(data, dict) or data.get("sources") != [list(s) for s in sources]:
        log.warning("evaluation-set cache %s does not hold the images of %s now: regenerating it", cache_file, folder)
        return None
    log.info("reusing the evaluation set cached in %s (built from %s, %d images checked by content)", cache_file,
             data.get("folder", "?"), len(sources))
    return data


@dataclass
class EvalSetSpec:
    """What an evaluation set is made of; every field enters the cache fingerprint."""

    folder: str
    grid: str | list = "cresmd27"
    max_images: int | None = None
    crop: int | None = None
    seed: int = 0
    on_bad: str = "error"
    config_key: str = "data.val_dir"
    extra: dict = field(default_factory=dict)
    #: per-image pixel limit (:data:`MAX_EVAL_PIXELS`); not in the cache key (it changes no pixel)
    max_pixels: int = MAX_EVAL_PIXELS

    def __post_init__(self) -> None:
        # the config keys of these values: data.val_dir -> data.val_max_images, data.val_crop
        stem = self.config_key[: -len("_dir")] if self.config_key.endswith("_dir") else self.config_key
        if self.max_images is not None and (isinstance(self.max_images, bool) or not isinstance(self.max_images, int)
                                            or self.max_images < 1):
            raise ValueError(f"{stem}_max_images={self.max_images!r} must be an integer >= 1 (the first N images) "
                             "or null for all")
        if self.crop is not None and (isinstance(self.crop, bool) or not isinstance(self.crop, int) or self.crop < 1):
            raise ValueError(f"{stem}_crop={self.crop!r} must be an integer >= 1 (pixels) or null for whole images")


def _fingerprint(spec: EvalSetSpec, sources: list[tuple[str, str]], levels: torch.Tensor) -> str:
    digest = hashlib.sha256()
    meta = {
        "version": FORMAT_VERSION,
        "grid": levels.tolist(),
        "max_images": spec.max_images,
        "crop": spec.crop,
        "seed": spec.seed,
        "extra": spec.extra,
        "files": sources,
    }
    digest.update(json.dumps(meta, sort_keys=True).encode())
    return digest.hexdigest()[:20]


def evaluated_size(height: int, width: int, crop: int | None) -> tuple[int, int]:
    """``(H, W)`` an image of ``height x width`` is evaluated at: cropped to even sides, then the
    centre crop of :func:`~cirlab.data.image_files.center_crop` (whole when smaller than ``crop``)."""
    h, w = height - height % 2, width - width % 2
    if crop and h >= crop and w >= crop:
        h, w = crop, crop
    return h, w


def check_eval_sizes(paths: Sequence[Path], spec: EvalSetSpec, copies: int) -> None:
    """Refuse, before any decoding, images too small for SSIM or too large to hold as a set.

    ``copies`` is the number of grid points (for the message). Reads only the headers. Raises :class:`~cirlab.data.image_files.ImageFolderError` listing every
    refused file with its size, the evaluated size and the limit, and what to do.
    """
    from cirlab.data.image_files import header_size

    stem = spec.config_key[: -len("_dir")] if spec.config_key.endswith("_dir") else spec.config_key
    problems = []
    for path in paths:
        height, width = header_size(path)
        h, w = evaluated_size(height, width, spec.crop)
        if min(h, w) < MIN_EVAL_SIDE:
            problems.append(f"image '{path}' is {height}x{width} (HxW), evaluated at {h}x{w}: smaller than "
                            f"{MIN_EVAL_SIDE}x{MIN_EVAL_SIDE}, the SSIM window (after cropping to even sides)")
        elif h * w > spec.max_pixels:
            problems.append(f"image '{path}' is {height}x{width} (HxW), evaluated at {h}x{w} = {h * w / 1e6:.1f} MP: "
                            f"over the limit of {spec.max_pixels / 1e6:.1f} MP ({spec.max_pixels} pixels) per image "
                            f"(its {copies} degraded copies are held in memory at once); set {stem}_crop (or "
                            "protocol.crop for cirlab-eval) to evaluate a centre crop, or restore it with "
                            "cirlab-restore, which tiles")
    if problems:
        listed = "\n".join(f"  - {p}" for p in problems)
        raise ImageFolderError(f"{spec.config_key}: {len(problems)} image(s) in '{spec.folder}' cannot be evaluated:"
                               f"\n{listed}", path=spec.folder, problems=problems)


def build_eval_set(spec: EvalSetSpec, cache_dir: str | Path | None, progress: bool = True) -> dict:
    """Generate (or load from ``cache_dir``) the evaluation set described by ``spec``.

    Returns a dict with ``names`` (list of str), ``clean`` (list of uint8 (3, H, W)),
    ``inputs`` (list of uint8 (G, 3, H, W), one per image) and ``levels`` ((G, 3) task space).

    Raises:
        ImageFolderError: a bad image file, or one too small / too large (:func:`check_eval_sizes`),
            before any image is degraded.
    """
    from cirlab.data.degradations import degrade
    from cirlab.data.image_files import crop_to_multiple, load_image, scan_folder

    levels = level_grid(spec.grid)
    paths = scan_folder(spec.folder, on_bad=spec.on_bad, config_key=spec.config_key)
    if spec.max_images is not None:
        paths = paths[: spec.max_images]
    check_eval_sizes(paths, spec, len(levels))
    grid_name = spec.grid if isinstance(spec.grid, str) else f"custom{len(levels)}"
    cache_file = None
    if cache_dir:
        sources = source_fingerprint(paths)
        key = _fingerprint(spec, sources, levels)
        cache_file = Path(cache_dir) / f"{Path(spec.folder).name}-{grid_name}-{key}.pt"
        cached = load_cache(cache_file, sources, spec.folder)
        if cached is not None:
            return cached

    from tqdm.auto import tqdm

    clean_images, inputs = [], []
    for index, path in enumerate(tqdm(paths, desc=f"generating {Path(spec.folder).name} x {len(levels)} levels", disable=not progress)):
        image = center_crop(crop_to_multiple(load_image(path), 2), spec.crop, even=False, whole_if_smaller=True)
        clean = image.float().div(255).unsqueeze(0).expand(len(levels), -1, -1, -1).contiguous()
        generator = torch.Generator().manual_seed(mix_seed(spec.seed, index))
        degraded = degrade(clean, levels, generator=generator)
        clean_images.append(image)
        inputs.append(quantize_uint8(degraded))
    data = {"names": [p.name for p in paths], "clean": clean_images, "inputs": inputs, "levels": levels}
    if cache_file is not None:
        save_torch_file({**data, "sources": [list(s) for s in sources], "folder": str(Path(spec.folder).resolve())},
                        cache_file)
        log.info("cached the evaluation set of %s in %s", spec.folder, cache_file)
    return data


class EvalSetDataset(Dataset):
    """One item per clean image: all its grid points at once.

    Item: ``input`` (G, 3, H, W) float in [0, 1], ``target`` (G, 3, H, W) (the clean image),
    ``task`` (G, 3), ``grid_index`` (G,) long, ``image_index`` (G,) long. Use it with
    ``batch_size=None``; a rank of a distributed run gets whole images, so no sample is
    duplicated or dropped.
    """

    def __init__(self, data: dict) -> None:
        self.names = data["names"]
        self.clean = data["clean"]
        self.inputs = data["inputs"]
        self.levels = data["levels"]

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> dict:
        count = len(self.levels)
        inputs = self.inputs[index].float().div(255)
        target = self.clean[index].float().div(255).unsqueeze(0).expand_as(inputs)
        return {
            "input": inputs,
            "target": target,
            "task": self.levels.clone(),
            "grid_index": torch.arange(count),
            "image_index": torch.full((count,), index, dtype=torch.long),
        }
