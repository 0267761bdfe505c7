"""Single-type degradation tasks at scalar levels (HyperRes): denoising, DeJPEG, super-resolution.

HyperRes (docs/method.md section 5) restores one degradation type at a time, at a scalar level:

=========  ================  ===================  ==================  ===============  =======
task       level             training levels (k)  sweep (evaluation)  test set         metric
=========  ================  ===================  ==================  ===============  =======
denoise    noise sigma       15, 35, 55, 75       5, 10, ..., 90      CBSD68           RGB
dejpeg     JPEG quality q    10, 30, 50, 80       10, 20, ..., 80     LIVE1            Y
sr         scale s           2, 3, 4, 5           2, 3, 4, 5, 6       Set5             Y
=========  ================  ===================  ==================  ===============  =======

The network sees the normalised level c = level / ``level_scale`` (255 for every task, as the
reference). :func:`degrade_level` makes the degraded image (uint8 in, uint8 out):

* ``denoise``: ``clean + sigma / 255 * n`` with n standard normal, then rounded and clipped to
  uint8 (:func:`~cirlab.metrics.conventions.quantize_uint8`). [choice] Rounding, as the rest of
  this suite; the reference's generator truncates (``astype(uint8)``). Sigma may exceed the
  CResMD range of ``add_gaussian_noise`` (50), so the addition is done here.
* ``dejpeg``: real JPEG at quality q (``jpeg_roundtrip``: libjpeg via torchvision, 4:2:0), q
  an integer in [10, 100].
* ``sr``: bicubic down to ``round(H / s) x round(W / s)``, rounded to uint8, then bicubic back up
  to ``H x W`` and rounded again; the network restores the upsampled image. Bicubic is PyTorch's
  (a = -0.75 and no antialiasing, the kernel of OpenCV's ``INTER_CUBIC`` that the reference's
  generator uses), with the reference's coordinates: ``cv2.resize(fx=1/s)`` maps output pixel
  ``i`` to input ``(i + 0.5) s - 0.5`` with s exactly (:func:`bicubic_resize` with ``scale``),
  and the way back, ``cv2.resize(dsize=(W, H))``, by the size ratio. (Resampling to a size maps
  with ``W / round(W / s)`` instead, which differs from s whenever s does not divide W.)

[choice] Every task trains and restores RGB (the 2,588,483-parameter RGB model); the DeJPEG and
SR tables score the BT.601 Y channel of the RGB output, rounded to integers as MATLAB does for
uint8 images (``y_rounded``), as the paper's tables. The reference's
README trains its DeJPEG model on luminance only; that variant is not provided here.

Training (:class:`LevelDataModule`): the crop stream of :mod:`cirlab.data.loading` (clean crops
keyed by sample id; the stream is a function of seed, batch index and rank, so resumed runs
continue it). :class:`LevelPairMaker` degrades each batch of clean crops at every one of the k
training levels, in the DataLoader workers' collate function or in ``on_after_batch_transfer``
on the batch's device (``data.pairs_on``, as :class:`~cirlab.data.datamodule.RestorationDataModule`;
``auto``: in the workers when training runs on the CPU with workers): the batch becomes
``inputs`` (k, B, 3, P, P) and
``target`` (B, 3, P, P), float in [0, 1] (the same crops, same flips, for every level), and
``levels`` (k, 1), the normalised levels. [choice] The
degradation is synthesised at every step (the reference degrades whole images once and crops
them), so each step sees new noise; but, as for the blur/noise/JPEG pairs, on a crop with
``degrade_margin`` pixels of context around the patch (:class:`~cirlab.data.loading.CropDataset`),
cut out afterwards: DeJPEG's block grid starts at the crop's corner, at a random phase to the
patch, and the blocks touching the patch hold real pixels; SR's bicubic reads real neighbours.
Training crops are resampled with s exactly both ways (``sr_upscale="scale"``: the geometry of a
whole image whose sides are multiples of s; resampling a crop back to its own size would stretch
it by ``S / (s round(S / s))``, shifting input against target by up to about a pixel). Denoising
needs no context (noise and rounding act per pixel): its default margin is 0.

Evaluation: :func:`build_level_set` makes a deterministic set (every image of a folder at every
level; image i at level L uses a generator seeded from (seed, i, L), so adding a level changes
no other input) cached on disk like :mod:`cirlab.data.evalsets`; :func:`iter_level_images` makes
the same inputs image by image without caching (the evaluation sweep of ``cirlab.evaluation.levels``).
Images are cropped to even size (the networks run their trunk at half resolution).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from cirlab.checkpoints import save_torch_file
from cirlab.data.degradations import KERNEL_SIZE, jpeg_roundtrip
from cirlab.data.image_files import center_crop
from cirlab.data.loading import (
    arrays_to_tensors,
    batch_offsets,
    check_crop_settings,
    check_margin,
    check_pairs_on,
    check_shards,
    crop_loader,
    cut_patches,
    decode_training_images,
    first_sample_id,
    mix_seed,
    pairs_in_workers,
    scan_training_folder,
    shard_loader,
)
from cirlab.metrics.conventions import quantize_uint8
from cirlab.metrics.fidelity import CHANNELS

log = logging.getLogger(__name__)

# 2: SR inputs map the downscale with s exactly (cv2.resize(fx=1/s)); version 1 sets are regenerated
FORMAT_VERSION = 3  # 3: keyed by content (sources)
#: Column of the level tables holding each level scored by the dedicated network trained at it.
ENVELOPE = "dedicated (own level)"


@dataclass(frozen=True)
class LevelTask:
    """One single-type restoration task: its level, defaults and conventions."""

    name: str
    unit: str
    prefix: str
    train_levels: tuple[float, ...]
    sweep_levels: tuple[float, ...]
    channel: str
    test_set: str
    low: float
    high: float
    integer: bool = False

    def label(self, level: float) -> str:
        """Readable name of a level, e.g. ``sigma15``, ``q30``, ``x2``."""
        return f"{self.prefix}{float(level):g}"

    def check(self, levels: Sequence[float], key: str) -> list[float]:
        values = [float(v) for v in levels]
        if not values:
            raise ValueError(f"{key} must hold at least one level")
        for value in values:
            if not self.low <= value <= self.high or (self.integer and value != int(value)):
                kind = "an integer" if self.integer else "a number"
                raise ValueError(f"{key}: {self.unit}={value:g} must be {kind} in [{self.low:g}, {self.high:g}] for task {self.name!r}")
        return values


TASKS: dict[str, LevelTask] = {
    "denoise": LevelTask("denoise", "noise sigma (0..255 scale)", "sigma", (15, 35, 55, 75), tuple(range(5, 95, 5)),
                         "rgb", "CBSD68", 0.0, 255.0),
    "dejpeg": LevelTask("dejpeg", "JPEG quality", "q", (10, 30, 50, 80), tuple(range(10, 90, 10)), "y_rounded", "LIVE1",
                        10.0, 100.0, integer=True),
    "sr": LevelTask("sr", "scale factor", "x", (2, 3, 4, 5), (2, 3, 4, 5, 6), "y_rounded", "Set5", 1.0, 16.0),
}


def get_task(name: str) -> LevelTask:
    if name not in TASKS:
        raise ValueError(f"data.task={name!r} is unknown; use one of {sorted(TASKS)}")
    return TASKS[name]


#: Default ``data.degrade_margin`` per task (None: :func:`sr_reach` of the largest training scale).
TASK_MARGINS: dict[str, int | None] = {"denoise": 0, "dejpeg": KERNEL_SIZE // 2, "sr": None}


def sr_reach(scale: float) -> int:
    """Pixels around a pixel that bicubic down and up by ``scale`` can read: < 2 s + 2 (4 taps each way)."""
    return math.ceil(2 * scale + 1)


def bicubic_resize(x: Tensor, size: tuple[int, int], scale: float | None = None) -> Tensor:
    """Bicubic resampling (a = -0.75, no antialiasing) of a uint8 batch to ``size``, rounded to uint8.

    ``scale`` None: coordinates map by the size ratio (``cv2.resize(dsize=...)``,
    ``F.interpolate(size=...)``). ``scale`` given (output / input): output pixel ``i`` reads
    input ``(i + 0.5) / scale - 0.5`` whatever the sizes (``cv2.resize(fx=scale)``;
    ``F.interpolate(scale_factor=scale, recompute_scale_factor=False)``, whose floor(in * scale)
    outputs are extended to ``size`` by first repeating the input's last row/column, which reads
    as the clamped border of the unpadded input).
    """
    x = x.float().div(255)
    if scale is None:
        out = F.interpolate(x, size=size, mode="bicubic", align_corners=False)
    else:
        pad_h, pad_w = (max(0, math.ceil(n / scale) + 2 - m) for n, m in zip(size, x.shape[-2:]))
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        out = F.interpolate(x, scale_factor=scale, mode="bicubic", align_corners=False,
                            recompute_scale_factor=False)[..., : size[0], : size[1]]
    return quantize_uint8(out)


def degrade_level(clean: Tensor, task: str, level: float, generator: torch.Generator | None = None,
                  sr_upscale: str = "size") -> Tensor:
    """Degrade a uint8 batch ``clean`` (B, 3, H, W) at one ``level`` of ``task``; returns uint8 (B, 3, H, W).

    ``generator`` (on ``clean``'s device) draws the noise field of ``denoise``; the other tasks
    are deterministic. See the module docstring for each task. ``sr_upscale``: how ``sr`` maps
    coordinates on the way back up: ``"size"`` by the size ratio (the reference's generator on a
    whole image), ``"scale"`` by s exactly (training crops).
    """
    if sr_upscale not in ("size", "scale"):
        raise ValueError(f"sr_upscale={sr_upscale!r} must be 'size' or 'scale'")
    spec = get_task(task)
    (level,) = spec.check([level], f"{task} level")
    if clean.dtype != torch.uint8 or clean.ndim != 4 or clean.shape[1] != 3:
        raise ValueError(f"clean must be a uint8 (B, 3, H, W) tensor, got {clean.dtype} {tuple(clean.shape)}")
    if task == "denoise":
        x = clean.float().div(255)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return quantize_uint8(x.add_(noise, alpha=level / 255.0))
    if task == "dejpeg":
        return jpeg_roundtrip(clean, int(level))
    height, width = clean.shape[-2:]
    # cv2.resize(fx=1/s): round(W * (1/s)) pixels (round half to even, as cvRound), coordinates mapped with s
    small = bicubic_resize(clean, (max(1, round(height * (1 / level))), max(1, round(width * (1 / level)))), 1 / level)
    return bicubic_resize(small, (height, width), level if sr_upscale == "scale" else None)


def level_seed(seed: int, index: int, level: float) -> int:
    """The generator seed of image ``index`` at ``level`` in an evaluation set."""
    digest = hashlib.sha256(f"{seed}/{index}/{float(level)!r}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def degrade_image_levels(image: Tensor, task: str, levels: Sequence[float], seed: int, index: int) -> Tensor:
    """Image ``index`` (uint8 (3, H, W)) at every level: uint8 (G, 3, H, W), deterministic."""
    out = []
    for level in levels:
        generator = torch.Generator(device=image.device).manual_seed(level_seed(seed, index, level))
        out.append(degrade_level(image[None], task, level, generator)[0])
    return torch.stack(out)


@dataclass
class LevelSetSpec:
    """What a level evaluation set is made of; every field but ``on_bad``/``config_key`` enters the cache key."""

    folder: str
    task: str
    levels: Sequence[float]
    max_images: int | None = None
    crop: int | None = None
    seed: int = 0
    on_bad: str = "error"
    config_key: str = "data.val_dir"


def _paths(spec: LevelSetSpec) -> list[Path]:
    from cirlab.data.image_files import scan_folder

    paths = scan_folder(spec.folder, on_bad=spec.on_bad, config_key=spec.config_key)
    return paths[: spec.max_images] if spec.max_images is not None else paths


def iter_level_images(spec: LevelSetSpec, paths: list[Path] | None = None) -> Iterator[tuple[str, Tensor, Tensor]]:
    """Yield ``(name, clean uint8 (3, H, W), inputs uint8 (G, 3, H, W))`` image by image, uncached."""
    from cirlab.data.image_files import crop_to_multiple, load_image

    levels = get_task(spec.task).check(spec.levels, f"{spec.config_key} levels")
    for index, path in enumerate(paths if paths is not None else _paths(spec)):
        image = center_crop(crop_to_multiple(load_image(path), 2), spec.crop).contiguous()
        yield path.name, image, degrade_image_levels(image, spec.task, levels, spec.seed, index)


def build_level_set(spec: LevelSetSpec, cache_dir: str | Path | None, progress: bool = True) -> dict:
    """Generate (or load from ``cache_dir``) the level set of ``spec``.

    Returns ``names``, ``clean`` (list of uint8 (3, H, W)), ``inputs`` (list of uint8 (G, 3, H, W)),
    ``levels`` ((G,) float64, physical) and ``task``.
    """
    from cirlab.data.evalsets import EvalSetSpec, check_eval_sizes, load_cache, source_fingerprint

    paths = _paths(spec)
    levels = get_task(spec.task).check(spec.levels, f"{spec.config_key} levels")
    # the grid's size checks (SSIM window, memory of the set), from the headers, before any work
    check_eval_sizes(paths, EvalSetSpec(folder=str(spec.folder), crop=spec.crop, config_key=spec.config_key), len(levels))
    cache_file = sources = None
    if cache_dir:
        # keyed by the images' content, as the grid's evaluation sets: two folders with the same
        # file names, sizes and times are two caches
        sources = source_fingerprint(paths)
        meta = {"version": FORMAT_VERSION, "task": spec.task, "levels": levels, "max_images": spec.max_images,
                "crop": spec.crop, "seed": spec.seed, "files": sources}
        key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:20]
        cache_file = Path(cache_dir) / f"{Path(spec.folder).name}-{spec.task}{len(levels)}-{key}.pt"
        cached = load_cache(cache_file, sources, spec.folder)
        if cached is not None:
            return cached
    from tqdm.auto import tqdm

    names, clean, inputs = [], [], []
    for name, image, degraded in tqdm(iter_level_images(spec, paths), total=len(paths), disable=not progress,
                                      desc=f"generating {Path(spec.folder).name} x {len(levels)} {spec.task} levels"):
        names.append(name)
        clean.append(image)
        inputs.append(degraded)
    data = {"names": names, "clean": clean, "inputs": inputs, "levels": torch.tensor(levels, dtype=torch.float64),
            "task": spec.task}
    if cache_file is not None:
        save_torch_file({**data, "sources": [list(x) for x in sources], "folder": str(Path(spec.folder).resolve())},
                        cache_file)
    return data


class LevelSetDataset(Dataset):
    """One item per image, all its levels at once: ``input`` (G, 3, H, W) float in [0, 1],
    ``target`` (G, 3, H, W), ``level`` (G, 1) normalised (level / ``level_scale``),
    ``grid_index`` (G,) and ``image_index`` (G,). Use with ``batch_size=None``."""

    def __init__(self, data: dict, level_scale: float = 255.0) -> None:
        self.names, self.clean, self.inputs = data["names"], data["clean"], data["inputs"]
        self.levels = data["levels"].float()
        self.level_scale = float(level_scale)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> dict:
        count = len(self.levels)
        inputs = self.inputs[index].float().div(255)
        return {
            "input": inputs,
            "target": self.clean[index].float().div(255).unsqueeze(0).expand_as(inputs),
            "level": (self.levels / self.level_scale).unsqueeze(1),
            "grid_index": torch.arange(count),
            "image_index": torch.full((count,), index, dtype=torch.long),
        }


class LevelPairMaker:
    """Crop batch -> k-level training batch: the one implementation behind both places it is made.

    Picklable (task, levels, level scale, seed, patch size, margin; not the DataModule), so
    DataLoader workers can run it under any start method. Called with a collated crop batch
    ``{"clean": (B, 3, S, S) uint8, "offset": (B, 2), "id": (B,)}`` on any device; returns
    ``inputs`` (k, B, 3, P, P), ``target`` (B, 3, P, P) float in [0, 1], ``levels`` (k, 1)
    normalised and ``id``, on that device. Every level degrades the whole crop (one generator
    seeded with ``mix_seed(seed, id[0])``, drawn level after level), then the patch is cut out.
    The call is ``from_codes(codes(batch))``: workers send :meth:`codes` (uint8, as
    :class:`~cirlab.data.datamodule.RestorationPairMaker` does).
    """

    def __init__(self, task: str, levels: Sequence[float], level_scale: float, seed: int, patch_size: int,
                 margin: int) -> None:
        self.task, self.levels, self.level_scale = task, list(levels), float(level_scale)
        self.seed, self.patch_size, self.margin = seed, patch_size, margin

    def codes(self, batch: dict) -> dict:
        """Crop batch -> ``{"codes": (k + 1, B, 3, P, P) uint8, "id": (B,)}``: the k degraded patches,
        then the clean one, on the batch's device."""
        offsets = batch_offsets(batch, self.patch_size, self.margin)
        clean = batch["clean"]
        generator = torch.Generator(device=clean.device)
        generator.manual_seed(mix_seed(self.seed, first_sample_id(batch)))
        inputs = [degrade_level(clean, self.task, level, generator, sr_upscale="scale") for level in self.levels]
        if offsets is not None:
            inputs = [cut_patches(x, offsets, self.patch_size) for x in inputs]
            clean = cut_patches(clean, offsets, self.patch_size)
        return {"codes": torch.stack([*inputs, clean]), "id": batch["id"]}

    def from_codes(self, packed: dict) -> dict:
        """:meth:`codes`' result -> the training batch (``inputs``, ``target``, ``levels``, ``id``)."""
        images = packed["codes"].float().div_(255)
        levels = torch.tensor(self.levels, dtype=torch.float32, device=images.device).div_(self.level_scale)
        return {"inputs": images[:-1], "target": images[-1], "levels": levels[:, None], "id": packed["id"]}

    def __call__(self, batch: dict) -> dict:
        return self.from_codes(self.codes(batch))


class LevelDataModule(L.LightningDataModule):
    """Training batches of k degraded versions of the same clean crops, one per training level.

    Args:
        task: ``denoise``, ``dejpeg`` or ``sr``.
        levels: the k training levels (physical units); default the reference's four.
        val_levels, test_levels: levels of the validation and test sets (default: the training
            levels and the sweep's ends; the task's sweep).
        level_scale: c = level / level_scale (255, the reference).
        metric_channel: ``rgb``, ``y`` or ``y_rounded`` for validation/test PSNR and SSIM (default per task).
        train_dir: folder of clean training images.
        val_dir, test_dir: folders of clean images for the level sets (None: no such set).
        patch_size: training crop size in pixels (even); batch_size: crops per batch (per rank);
            batches_per_epoch: length of one training epoch; num_workers: workers cutting crops.
        val_max_images, test_max_images: use only the first N images (None = all).
        val_crop, test_crop: centre crop of the evaluation images (None = whole image).
        cache_dir: where generated level sets are cached (``<cache_dir>/evalsets``).
        seed: the data seed; on_bad: ``"error"`` or ``"skip"`` (warn, naming each bad file).
        embedded_root: if set, the embedded scikit-image photos are written there first.
        pin_memory: passed to the DataLoaders; overfit_batches: if set, cycle the first N batches.
        degrade_margin: pixels of image context around each training patch while it is degraded
            (None: the task's default, :data:`TASK_MARGINS`: 0 for denoise, 10 for dejpeg,
            :func:`sr_reach` of the largest scale for sr).
        pairs_on: where the k-level batches are made: ``"device"`` (``on_after_batch_transfer``,
            on the batch's device), ``"workers"`` (the DataLoader's collate function, in the
            worker processes, or the main process at fetch time with ``num_workers=0``) or
            ``"auto"`` (default: ``workers`` when ``num_workers > 0`` and the trainer runs on the
            CPU, else ``device``; :func:`~cirlab.data.loading.resolve_pairs_on`). Same batches either way.

    Batches: ``inputs`` (k, B, 3, P, P), ``target`` (B, 3, P, P), both float in [0, 1],
    ``levels`` (k, 1) normalised, and ``id``. Evaluation items: see :class:`LevelSetDataset`.
    """

    def __init__(
        self,
        task: str = "denoise",
        levels: Sequence[float] | None = None,
        val_levels: Sequence[float] | None = None,
        test_levels: Sequence[float] | None = None,
        level_scale: float = 255.0,
        metric_channel: str | None = None,
        train_dir: str | None = None,
        val_dir: str | None = None,
        test_dir: str | None = None,
        patch_size: int = 96,
        batch_size: int = 16,
        batches_per_epoch: int = 1000,
        num_workers: int = 2,
        val_max_images: int | None = None,
        test_max_images: int | None = None,
        val_crop: int | None = None,
        test_crop: int | None = None,
        cache_dir: str | None = None,
        seed: int = 0,
        on_bad: str = "error",
        embedded_root: str | None = None,
        pin_memory: bool = False,
        overfit_batches: int | None = None,
        degrade_margin: int | None = None,
        pairs_on: str = "auto",
    ) -> None:
        super().__init__()
        check_crop_settings(patch_size, batch_size, batches_per_epoch, num_workers, on_bad, overfit_batches)
        self.pairs_on = check_pairs_on(pairs_on)
        self.pairs_made_on: str | None = None  # "workers" or "device" once the training loader is built
        self.train_dir, self.val_dir, self.test_dir = train_dir, val_dir, test_dir
        self.patch_size, self.batch_size = patch_size, batch_size
        self.batches_per_epoch, self.num_workers = batches_per_epoch, num_workers
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.seed, self.on_bad = seed, on_bad
        self.embedded_root = embedded_root
        self.pin_memory = pin_memory
        self.overfit_batches = overfit_batches
        self.train_images = None
        self.val_set: LevelSetDataset | None = None
        self.test_set: LevelSetDataset | None = None

        self.level_task = get_task(task)
        self.task = task
        spec = self.level_task
        self.levels = spec.check(levels if levels is not None else spec.train_levels, "data.levels")
        default_val = sorted({*self.levels, spec.sweep_levels[0], spec.sweep_levels[-1]})
        self.val_levels = spec.check(val_levels if val_levels is not None else default_val, "data.val_levels")
        self.test_levels = spec.check(test_levels if test_levels is not None else spec.sweep_levels, "data.test_levels")
        if not level_scale or level_scale <= 0:
            raise ValueError(f"data.level_scale={level_scale!r} must be > 0")
        self.level_scale = float(level_scale)
        channel = metric_channel or spec.channel
        if channel not in CHANNELS:
            raise ValueError(f"data.metric_channel={channel!r} must be one of {', '.join(CHANNELS)}")
        self.metric_channel = channel
        self.level_specs = {"val": (val_max_images, val_crop), "test": (test_max_images, test_crop)}
        needed = sr_reach(max(self.levels)) if task == "sr" else TASK_MARGINS[task]
        self.degrade_margin = needed if degrade_margin is None else check_margin(degrade_margin)
        if self.degrade_margin < needed:
            log.warning("data.degrade_margin=%d is less than the %d px that %s at level %g reads around a pixel: the "
                        "edges of a training patch are degraded against the crop's border", self.degrade_margin,
                        needed, task, max(self.levels))

    # ------------------------------------------------------------------ evaluation sets
    def level_spec(self, stage: str) -> LevelSetSpec | None:
        folder = self.val_dir if stage == "val" else self.test_dir
        if folder is None:
            return None
        max_images, crop = self.level_specs[stage]
        levels = self.val_levels if stage == "val" else self.test_levels
        return LevelSetSpec(folder=str(folder), task=self.task, levels=levels, max_images=max_images, crop=crop,
                            seed=self.seed, on_bad=self.on_bad, config_key=f"data.{stage}_dir")

    def _eval_cache_dir(self) -> Path | None:
        return self.cache_dir / "evalsets" if self.cache_dir else None

    def label(self, level: float) -> str:
        return self.level_task.label(level)

    def prepare_data(self) -> None:
        """Write the embedded images if requested; validate the training folder; generate the level sets."""
        if self.embedded_root:
            from cirlab.data.embedded import write_embedded

            write_embedded(self.embedded_root)
        self.check_inputs()
        for stage in ("val", "test"):
            spec = self.level_spec(stage)
            if spec is not None:
                build_level_set(spec, self._eval_cache_dir())

    def check_inputs(self) -> list[Path]:
        """Validate the training folder (every file, before training starts); return its images."""
        return scan_training_folder(self.train_dir, self.patch_size, self.on_bad)

    def setup(self, stage: str | None = None) -> None:
        """Decode the training images (first ``fit`` only) and load the level sets the stage needs."""
        if stage in (None, "fit") and self.train_images is None and self.train_dir is not None:
            store = self.cache_dir / "decoded" if self.cache_dir else None  # one decoded copy per node
            self.train_images = decode_training_images(self.check_inputs(), store_dir=store)
        for name, wanted in (("val", (None, "fit", "validate")), ("test", (None, "test"))):
            if stage in wanted and getattr(self, f"{name}_set") is None:
                spec = self.level_spec(name)
                if spec is not None:
                    data = build_level_set(spec, self._eval_cache_dir())
                    setattr(self, f"{name}_set", LevelSetDataset(data, self.level_scale))
                    check_shards(getattr(self, f"{name}_set"), name, self.trainer)  # before any work on it

    # ------------------------------------------------------------------ loaders
    def train_dataloader(self) -> DataLoader:
        return crop_loader(self.train_images, patch_size=self.patch_size, batch_size=self.batch_size,
                           batches_per_epoch=self.batches_per_epoch, seed=self.seed, num_workers=self.num_workers,
                           pin_memory=self.pin_memory, overfit_batches=self.overfit_batches,
                           trainer=lambda: self.trainer, margin=self.degrade_margin,
                           make_pairs=self.pair_maker.codes if pairs_in_workers(self) else None)

    def val_dataloader(self) -> DataLoader:
        return shard_loader(self.val_set, "val", trainer=self.trainer, num_workers=self.num_workers,
                            pin_memory=self.pin_memory)

    def test_dataloader(self) -> DataLoader:
        return shard_loader(self.test_set, "test", trainer=self.trainer, num_workers=self.num_workers,
                            pin_memory=self.pin_memory)

    # ------------------------------------------------------------------ training batches
    @property
    def pair_maker(self) -> LevelPairMaker:
        """The picklable k-level step of this DataModule's settings (workers and ``on_after_batch_transfer``)."""
        return LevelPairMaker(self.task, self.levels, self.level_scale, self.seed, self.patch_size,
                              self.degrade_margin)

    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """Numpy arrays of a batch from the workers (:class:`~cirlab.data.loading.PairCollate`) made tensors."""
        return arrays_to_tensors(batch)

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """Clean crops -> k degraded versions (one per training level), on the batch's device.

        The crops come from :func:`~cirlab.data.loading.crop_loader` (margin crops and each
        patch's ``offset``): every level degrades the whole crop, then the patch is cut out
        (:class:`LevelPairMaker`). A batch of ``codes`` (made in the workers) is converted to
        floats here; other batches (evaluation items) pass through unchanged.
        """
        if "clean" in batch:
            return self.pair_maker(batch)
        if "codes" in batch:
            return self.pair_maker.from_codes(batch)
        return batch

    def example_inputs(self, count: int = 1) -> None:
        """None: the 3-D task-grid picture does not apply to single-type levels (see ``level_example``)."""
        return None

    def level_example(self, count: int = 1) -> Tensor | None:
        """A few clean held-out images (N, 3, H, W) uint8 for level pictures."""
        dataset = self.val_set or self.test_set
        if dataset is None:
            return None
        return torch.stack([dataset.clean[i] for i in range(min(count, len(dataset)))])
