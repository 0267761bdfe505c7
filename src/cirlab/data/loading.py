"""Loading shared by the DataModules: keyed clean crops, a resumable batch stream, sharded evaluation.

The training stream's samples are clean crops: ``{"clean": (B, 3, S, S) uint8, "offset": (B, 2)
int64, "id": (B,) int64, "first_id": int}`` once collated (:func:`collate_crops`; ``first_id`` is
``id[0]`` as a host int, the pair step's seed). Each DataModule turns a crop batch into its pairs with a
small picklable pair maker, in one of two places (``data.pairs_on``, :func:`resolve_pairs_on`):
``device``, in ``on_after_batch_transfer`` on the batch's device (the GPU when training runs
there), or ``workers``, in the DataLoader's collate function (:class:`PairCollate`), so the
worker processes make the pairs (with ``num_workers=0``: the main process, at fetch time) and
``on_after_batch_transfer`` passes the pair batch through. The pair step is seeded from the
batch's first sample id, so both places give the same pairs.
With a degradation margin ``m > 0`` a crop is larger than the training patch (``S = P + 2 m +
JPEG_GRID - 1``, :func:`margin_crop_size`): the pair step degrades the whole crop, so blur and
JPEG see the image around the patch as they do on a whole image, and then cuts the ``P x P``
patch at ``offset`` (:func:`cut_patches`). Without a margin ``S = P`` and ``offset = (0, 0)``.

The stream is a pure function of ``(seed, global batch index, rank)``: sample ``j`` of batch ``b`` of rank ``k`` in a
world of ``W`` ranks has the id ``(b * W + k) * B + j``, and :class:`CropDataset` draws its crop
from ``(seed, id)``. Ranks therefore never draw the same crops, and a run resumed from a
checkpoint continues the stream where it stopped (:class:`SteppedDataLoader` stores its position
in the checkpoint). Evaluation sets are sharded by whole items over ranks without padding
(:class:`ShardSampler`), so every image is scored exactly once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

if TYPE_CHECKING:
    import lightning as L

    from cirlab.data.image_cache import DecodedImageCache

log = logging.getLogger(__name__)

__all__ = [
    "INLINE_MAX_BYTES",
    "JPEG_GRID",
    "PAIRS_ON",
    "SEED_STRIDE",
    "CropDataset",
    "PairCollate",
    "ShardSampler",
    "SteppedBatchSampler",
    "SteppedDataLoader",
    "arrays_to_tensors",
    "batch_offsets",
    "check_crop_settings",
    "check_margin",
    "check_pairs_on",
    "check_shards",
    "collate_crops",
    "crop_loader",
    "cut_patches",
    "decode_training_images",
    "first_sample_id",
    "margin_crop_size",
    "mix_seed",
    "pairs_in_workers",
    "rank_and_world",
    "resolve_pairs_on",
    "scan_training_folder",
    "shard_loader",
    "stack_crops",
]

#: Multiplier that mixes a run's seed into per-sample (or per-image) indices: ``seed * SEED_STRIDE + index``.
SEED_STRIDE = 1_000_003

#: Period in pixels of the JPEG block grid: the 16x16 MCU of torchvision's encoder (4:2:0 chroma
#: subsampling; the 8x8 luma blocks divide it). A patch's phase is drawn modulo this period.
JPEG_GRID = 16


def mix_seed(seed: int, index: int) -> int:
    """The generator seed of item ``index`` (a sample id or an image index) under ``seed``."""
    return int(seed) * SEED_STRIDE + int(index)


def margin_crop_size(patch_size: int, margin: int) -> int:
    """Side of the clean crop cut for a ``patch_size`` patch: ``P`` without margin, else
    ``P + 2 margin + JPEG_GRID - 1`` (the margin on both sides plus room for the grid phase)."""
    return patch_size if margin == 0 else patch_size + 2 * margin + JPEG_GRID - 1


def _window_start(position: int, before: int, length: int, size: int) -> int:
    """Start of a ``size`` window that puts ``before`` pixels ahead of ``position``, moved to lie
    inside ``[0, length)``; 0 when the image is shorter than the window (it is padded at the end)."""
    return min(max(position - before, 0), max(length - size, 0))


def _cut_window(image: Tensor, top: int, left: int, size: int) -> Tensor:
    """``image[:, top:top + size, left:left + size]``, rows/columns past the end repeating the last one."""
    height, width = image.shape[-2:]
    if top + size <= height and left + size <= width:
        return image[:, top : top + size, left : left + size]
    rows = torch.arange(top, top + size).clamp_(max=height - 1)
    cols = torch.arange(left, left + size).clamp_(max=width - 1)
    return image.index_select(1, rows).index_select(2, cols)


class CropDataset(Dataset):
    """Random clean crops keyed by a sample id: ``dataset[id]`` is always the same crop.

    ``images`` is a sequence of uint8 ``(3, H, W)`` tensors, each at least ``patch_size`` on both
    sides (e.g. a :class:`~cirlab.data.image_cache.DecodedImageCache`). Returns
    ``{"clean": (3, S, S) uint8, "offset": (2,) int64, "id": int64}``: the patch is
    ``clean[:, oy:oy + P, ox:ox + P]`` with ``(oy, ox) = offset``, ``S`` is
    :func:`margin_crop_size`. Everything is drawn from ``numpy.random.default_rng([seed, id])``:
    the image, the patch position (uniform over the image, as without margin), the grid phase
    and the flips/transpose.

    Margin (``margin > 0``): the crop holds ``margin + phase`` pixels of the image above and left
    of the patch, with ``phase`` uniform in ``[0, JPEG_GRID)`` per axis, and the rest below and
    right. The crop's corner is where JPEG's block grid starts once it is degraded, so the patch
    sits at a random phase to that grid, as a random crop of a whole compressed image does; and
    the margin holds the pixels a blur (or resampling) of the patch reads. At the image's own
    borders the crop stops at the border (it is moved inside the image, the patch keeping its
    place), so a patch there is blurred against the border exactly as the whole image is
    (replicate padding); at the top/left border the block grid then starts at the image's
    corner, as on the whole image, at the bottom/right border ``S`` pixels before the border.
    Only an image smaller than the crop is padded, at its bottom/right, by repeating its last
    row/column (what the blur's replicate border reads anyway). ``margin = 0``: the crop is the
    patch (the draws are those of earlier releases).

    [choice] The augmentation is plain flips/transpose of the uint8 crop in the worker, not
    kornia: inputs and targets are all made from that one crop afterwards, so they share it by
    construction, and flipping a uint8 view costs nothing. The offset is flipped with the crop.
    """

    def __init__(self, images, patch_size: int, seed: int, augment: bool = True, margin: int = 0) -> None:
        self.images = images
        self.patch_size = patch_size
        self.seed = seed
        self.augment = augment
        self.margin = check_margin(margin, "margin")
        self.crop_size = margin_crop_size(patch_size, self.margin)

    def __len__(self) -> int:  # ids are unbounded; the batch sampler decides how many
        return 2**62

    def __getitem__(self, sample_id: int) -> dict:
        rng = np.random.default_rng([self.seed, int(sample_id)])
        image = self.images[int(rng.integers(len(self.images)))]
        height, width = image.shape[-2:]
        patch, size = self.patch_size, self.crop_size
        top = int(rng.integers(height - patch + 1))
        left = int(rng.integers(width - patch + 1))
        if self.margin:
            phase_y, phase_x = (int(v) for v in rng.integers(JPEG_GRID, size=2))
            y0 = _window_start(top, self.margin + phase_y, height, size)
            x0 = _window_start(left, self.margin + phase_x, width, size)
            crop = _cut_window(image, y0, x0, size)
            oy, ox = top - y0, left - x0
        else:
            crop = image[:, top : top + patch, left : left + patch]
            oy = ox = 0
        if self.augment:
            flip_h, flip_v, transpose = rng.integers(2, size=3)
            if flip_h:
                crop, ox = crop.flip(-1), size - patch - ox
            if flip_v:
                crop, oy = crop.flip(-2), size - patch - oy
            if transpose:
                crop, oy, ox = crop.transpose(-1, -2), ox, oy
        return {"clean": crop.contiguous(), "offset": torch.tensor([oy, ox], dtype=torch.long),
                "id": torch.tensor(int(sample_id), dtype=torch.long)}


def cut_patches(images: Tensor, offsets: Tensor, patch_size: int) -> Tensor:
    """The ``patch_size`` square of each image at its ``(top, left)`` offset: ``(B, C, S, S)`` -> ``(B, C, P, P)``.

    Raises:
        ValueError: ``offsets`` is not ``(B, 2)`` or a patch does not lie inside its image.
    """
    b, _, height, width = images.shape
    if offsets.shape != (b, 2):
        raise ValueError(f"offsets must have shape ({b}, 2) to match the images, got {tuple(offsets.shape)}")
    offsets = offsets.to(device=images.device, dtype=torch.long)
    limit = torch.tensor([height - patch_size, width - patch_size], device=images.device)
    if bool(((offsets < 0) | (offsets > limit)).any()):
        raise ValueError(f"a {patch_size}x{patch_size} patch at the given offsets leaves the {height}x{width} crop "
                         f"(offsets from {int(offsets.min())} to {int(offsets.max())})")
    if height == width == patch_size:
        return images
    # slicing views and stacking them copies each patch once (~5x faster than two gathers on CPU)
    return torch.stack([images[i, :, top : top + patch_size, left : left + patch_size]
                        for i, (top, left) in enumerate(offsets.tolist())])


class SteppedBatchSampler(Sampler[list[int]]):
    """Yields the sample ids of global batches ``start .. end of the current epoch``.

    ``start_batch`` is a callable read at each ``iter()``: the number of training batches the
    trainer has already completed (0 on a fresh run, more after a resume), so a resumed run
    continues the data stream exactly. ``repeat=N`` cycles through the first N batches
    (overfitting checks).
    """

    def __init__(self, batch_size: int, batches_per_epoch: int, rank: int, world_size: int, start_batch,
                 repeat: int | None = None) -> None:
        self.repeat = repeat
        self.resume_from: int | None = None
        self.batch_size = batch_size
        self.batches_per_epoch = batches_per_epoch
        self.rank = rank
        self.world_size = world_size
        self.start_batch = start_batch

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[list[int]]:
        start = int(self.start_batch()) if self.resume_from is None else self.resume_from
        self.resume_from = None
        end = (start // self.batches_per_epoch + 1) * self.batches_per_epoch
        for batch in range(start, end):
            if self.repeat:
                batch %= self.repeat
            first = (batch * self.world_size + self.rank) * self.batch_size
            yield list(range(first, first + self.batch_size))


class SteppedDataLoader(DataLoader):
    """A DataLoader whose position is part of the checkpoint (Lightning's ``_Stateful`` protocol).

    The position is the number of global batches already trained; on resume the batch sampler
    restarts there, so the run sees exactly the batches it would have seen without stopping.
    """

    def __init__(self, *args, position=None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.position = position  # callable: batches fetched by the training loop so far

    def state_dict(self) -> dict:
        # Checkpoints are written inside on_train_batch_end, after the batch was processed but
        # before it counts as completed: the processed count is the next batch to train.
        return {"next_batch": int(self.position())}

    def load_state_dict(self, state: dict) -> None:
        self.batch_sampler.resume_from = int(state["next_batch"])


class ShardSampler(Sampler[int]):
    """Padding-free sharding of an evaluation set: rank k of W gets items k, k + W, k + 2W, ..."""

    def __init__(self, length: int, rank: int, world_size: int) -> None:
        self.indices = list(range(rank, length, world_size))

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)


def batch_offsets(batch: dict, patch_size: int, margin: int) -> Tensor | None:
    """The patch offsets of a training batch of crops, checked against ``patch_size`` and ``margin``.

    None when the crops are the patches (``margin`` 0 and ``P x P`` crops).

    Raises:
        ValueError: the crops do not have the size ``data.degrade_margin`` implies, or margin
            crops come without their ``offset`` (they must come from :func:`crop_loader`).
    """
    size = margin_crop_size(patch_size, margin)
    shape = tuple(batch["clean"].shape[-2:])
    if shape != (size, size):
        raise ValueError(f"training crops are {shape[0]}x{shape[1]} but data.patch_size={patch_size} with "
                         f"data.degrade_margin={margin} needs {size}x{size} crops (cut them with crop_loader)")
    if size == patch_size:
        return None
    if "offset" not in batch:
        raise ValueError(f"training crops with data.degrade_margin={margin} need their patch 'offset' "
                         "(cut them with crop_loader)")
    return batch["offset"]


# ---------------------------------------------------------------------------------- settings
def check_crop_settings(patch_size: int, batch_size: int, batches_per_epoch: int, num_workers: int, on_bad: str,
                        overfit_batches: int | None) -> None:
    """Raise ``ValueError`` naming the ``data.*`` key of the first bad training-stream setting."""
    for key, value, low in (("patch_size", patch_size, 2), ("batch_size", batch_size, 1),
                            ("batches_per_epoch", batches_per_epoch, 1)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"data.{key}={value!r} must be an integer >= {low}")
    if patch_size % 2:
        raise ValueError(f"data.patch_size={patch_size} must be even (the networks run their trunk at half resolution)")
    if num_workers < 0:
        raise ValueError(f"data.num_workers={num_workers} must be >= 0")
    if on_bad not in ("error", "skip"):
        raise ValueError(f"data.on_bad={on_bad!r} must be 'error' or 'skip'")
    if overfit_batches is not None and overfit_batches < 1:
        raise ValueError(f"data.overfit_batches={overfit_batches} must be >= 1 or null")


def check_margin(margin: object, key: str = "data.degrade_margin") -> int:
    """``margin`` as an int; ``ValueError`` naming ``key`` unless it is an integer >= 0."""
    if isinstance(margin, bool) or not isinstance(margin, (int, np.integer)) or margin < 0:
        raise ValueError(f"{key}={margin!r} must be an integer >= 0 (pixels of context around a training patch)")
    return int(margin)


#: Values of ``data.pairs_on``: where training pairs are made (see :func:`resolve_pairs_on`).
PAIRS_ON = ("auto", "workers", "device")


def check_pairs_on(value: object, key: str = "data.pairs_on") -> str:
    """``value`` if it is one of :data:`PAIRS_ON`; ``ValueError`` naming ``key`` otherwise."""
    if not isinstance(value, str) or value not in PAIRS_ON:
        raise ValueError(f"{key}={value!r} must be one of {', '.join(PAIRS_ON)} (where training pairs are made)")
    return value


def resolve_pairs_on(pairs_on: str, num_workers: int, device_type: str = "cpu") -> str:
    """Where the training pairs are made: ``"workers"`` or ``"device"``.

    ``auto`` is ``workers`` when there are DataLoader workers (``num_workers > 0``) and training
    runs on the CPU (``device_type``, the trainer's root device type), ``device`` otherwise.

    [choice] On the CPU, ``device`` makes the pairs in the main process between training steps,
    on about one core (TorchCodec's JPEG encoder holds the GIL, so threads do not help); worker
    processes make them on the other cores, overlapped with the step (they send uint8 codes, see
    :class:`PairCollate`; on 2 cores two workers make pairs 1.1-1.5x as fast as the main process,
    docs/method.md). On a GPU the batched degradations run much faster on
    the device, and the uint8 margin crops are a third of the bytes of the float pairs, so
    ``auto`` keeps them there. ``workers`` with a GPU trainer is allowed (the pairs are then made
    on the CPU, with the same libjpeg codec the evaluation sets use).
    """
    check_pairs_on(pairs_on)
    if pairs_on != "auto":
        return pairs_on
    return "workers" if num_workers > 0 and device_type == "cpu" else "device"


def pairs_in_workers(datamodule: L.LightningDataModule) -> bool:
    """Whether ``datamodule``'s training loader makes the pairs: its ``pairs_on`` resolved against
    its ``num_workers`` and its trainer's root device (no trainer: the CPU), stored as
    ``datamodule.pairs_made_on``. Logs once per DataModule when the pairs are made on the CPU
    for a trainer on another device."""
    trainer = datamodule.trainer
    device = "cpu" if trainer is None else trainer.strategy.root_device.type
    where = resolve_pairs_on(datamodule.pairs_on, datamodule.num_workers, device)
    datamodule.pairs_made_on = where
    log.info("training pairs made in %s (data.pairs_on=%s, data.num_workers=%d, trainer on %s)",
             "the DataLoader's collate function" if where == "workers" else "on_after_batch_transfer",
             datamodule.pairs_on, datamodule.num_workers, device)
    if where == "workers" and device != "cpu" and not getattr(datamodule, "_logged_cpu_pairs", False):
        datamodule._logged_cpu_pairs = True
        log.info("data.pairs_on=workers: training pairs are made on the CPU (in %s) while training runs on %s",
                 "the DataLoader workers" if datamodule.num_workers else "the main process",
                 trainer.strategy.root_device)
    return where == "workers"


def collate_crops(samples: list[dict]) -> dict:
    """``default_collate`` of crop samples plus ``first_id``: the batch's first sample id as a
    Python int, read here on the CPU. The pair step seeds its generator from it
    (:func:`first_sample_id`), so making pairs on a GPU never copies the ``id`` tensor back to the
    host (that read would wait for every queued kernel)."""
    return _with_first_id(default_collate(samples))


def _with_first_id(batch: dict) -> dict:
    batch["first_id"] = int(batch["id"][0])
    return batch


def first_sample_id(batch: dict) -> int:
    """The first sample id of a crop batch: its ``first_id`` (set by :func:`collate_crops`) or, for
    a batch collated elsewhere, ``int(batch["id"][0])`` (a host synchronisation on a GPU)."""
    first = batch.get("first_id")
    return int(batch["id"][0]) if first is None else int(first)


def stack_crops(samples: list[dict]) -> dict:
    """:func:`collate_crops` for a batch that stays in this process: plain ``torch.stack`` (in a
    worker ``default_collate`` allocates the batch in shared memory, for sending it)."""
    return _with_first_id({key: torch.stack([sample[key] for sample in samples]) for key in samples[0]})


#: Tensors of at most this many bytes leave a worker as numpy arrays (see :class:`PairCollate`).
INLINE_MAX_BYTES = 1 << 21


def arrays_to_tensors(batch: object) -> object:
    """A batch from :class:`PairCollate` with its numpy arrays made tensors again (``torch.from_numpy``:
    no copy); any other batch is returned as it is. For ``on_before_batch_transfer``, so that the
    trainer moves them to its device with the rest of the batch."""
    if not isinstance(batch, dict) or not any(isinstance(v, np.ndarray) for v in batch.values()):
        return batch
    return {key: torch.from_numpy(value) if isinstance(value, np.ndarray) else value for key, value in batch.items()}


class PairCollate:
    """Collate function that makes the training pairs where the batch is collated (the workers).

    ``make_pairs`` is a picklable callable (a pair maker's ``codes`` method, never the DataModule,
    which holds the trainer): it takes a collated crop batch (``clean``, ``offset``, ``id``) and
    returns the compact pair batch that the DataModule's ``on_after_batch_transfer`` completes.
    Pairs are made in the worker with one intra-op thread (PyTorch's worker default).

    [choice] Tensors of the batch up to :data:`INLINE_MAX_BYTES` (the uint8 codes of a usual
    batch, levels, ids) are returned as numpy arrays, which travel inside the pickled batch
    through the worker's pipe; ``on_before_batch_transfer`` makes them tensors again
    (:func:`arrays_to_tensors`). A tensor would leave the worker through its own shared-memory
    segment, whose file descriptor the main process fetches over a socket handshake with the
    worker: for 0.4 / 1 MB of uint8 that costs the receiving process 0.64 / 1.46 ms against
    0.27 / 0.55 ms through the pipe; from about 4 MB shared memory is faster (2026-11-30, 2-core
    machine, docs/results.md).
    """

    def __init__(self, make_pairs: Callable[[dict], dict]) -> None:
        self.make_pairs = make_pairs

    def __call__(self, samples: list[dict]) -> dict:
        batch = self.make_pairs(stack_crops(samples))
        return {key: value.numpy() if isinstance(value, Tensor) and value.nbytes <= INLINE_MAX_BYTES else value
                for key, value in batch.items()}


# ---------------------------------------------------------------------------------- training
def scan_training_folder(train_dir: str | None, patch_size: int, on_bad: str) -> list[Path]:
    """Validate every file of the training folder (before training starts); return its usable images.

    ``train_dir`` None gives ``[]``. Images smaller than ``patch_size`` are bad files.
    """
    from cirlab.data.image_files import scan_folder

    if train_dir is None:
        return []
    return scan_folder(train_dir, min_size=patch_size, on_bad=on_bad, config_key="data.train_dir")


def decode_training_images(paths: Sequence[Path], store_dir: str | Path | None = None) -> DecodedImageCache:
    """The training images, decoded once per node: with ``store_dir`` into a file there that every
    process of the node (DDP ranks, later runs) memory-maps, built by the first process to get to it
    (:class:`~cirlab.data.image_cache.DecodedImageCache`); without, into this process's shared memory."""
    from cirlab.data.image_cache import DecodedImageCache

    images = DecodedImageCache.from_paths(paths, store_dir=store_dir)
    where = f"mapped from {images.file}" if images.file is not None else "in shared memory"
    log.info("training images: %d, %.1f MB %s%s", len(paths), images.total_bytes / 2**20, where,
             "" if images.built else " (decoded by another process)")
    return images


def rank_and_world(trainer: L.Trainer | None) -> tuple[int, int]:
    """``(global rank, world size)`` of ``trainer``; ``(0, 1)`` without one."""
    if trainer is None:
        return 0, 1
    return trainer.global_rank, trainer.world_size


def _batches(trainer: L.Trainer | None, count: str) -> int:
    if trainer is None:
        return 0
    return getattr(trainer.fit_loop.epoch_loop.batch_progress.total, count)


def crop_loader(images, *, patch_size: int, batch_size: int, batches_per_epoch: int, seed: int, num_workers: int,
                pin_memory: bool, overfit_batches: int | None,
                trainer: Callable[[], L.Trainer | None], margin: int = 0,
                make_pairs: Callable[[dict], dict] | None = None) -> SteppedDataLoader:
    """The training stream over ``images`` (see the module docstring); ``margin``: see :class:`CropDataset`.

    ``trainer`` returns the current trainer (or None); it is read when the loader is built (rank,
    world size) and at each epoch start and checkpoint (batches completed / processed so far).
    ``make_pairs``: None, the loader yields crop batches; else a picklable pair maker that the
    collate function applies (:class:`PairCollate`), so the loader yields pair batches.

    Raises:
        RuntimeError: ``images`` is None (no training folder configured).
    """
    if images is None:
        raise RuntimeError("data.train_dir is not set: cannot train without a folder of clean images")
    rank, world = rank_and_world(trainer())
    dataset = CropDataset(images, patch_size, seed, margin=margin)
    batch_sampler = SteppedBatchSampler(batch_size, batches_per_epoch, rank, world,
                                        lambda: _batches(trainer(), "completed"), repeat=overfit_batches)
    collate = collate_crops if make_pairs is None else PairCollate(make_pairs)
    return SteppedDataLoader(dataset, batch_sampler=batch_sampler, num_workers=num_workers, pin_memory=pin_memory,
                             persistent_workers=False, collate_fn=collate,
                             position=lambda: _batches(trainer(), "processed"))


# ---------------------------------------------------------------------------------- evaluation
def check_shards(dataset: Dataset | None, stage: str, trainer: L.Trainer | None) -> None:
    """``ValueError`` naming ``data.<stage>_max_images`` when an evaluation set has fewer images than
    the run has processes: a rank without an image would log nothing, and the ranks' metric
    reductions would stop (or wait forever) instead of reporting. No-op without a set or trainer."""
    if dataset is None:
        return
    _, world = rank_and_world(trainer)
    if len(dataset) < world:
        raise ValueError(f"the {stage} set has {len(dataset)} image(s) but the run has {world} processes: every "
                         f"process evaluates whole images and needs at least one (raise or unset "
                         f"data.{stage}_max_images, or add images to data.{stage}_dir)")


def shard_loader(dataset: Dataset | None, stage: str, *, trainer: L.Trainer | None, num_workers: int,
                 pin_memory: bool) -> DataLoader:
    """Loader of an evaluation set whose items are whole images (``batch_size=None``), sharded over ranks.

    Raises:
        RuntimeError: ``dataset`` is None (``data.<stage>_dir`` not configured).
    """
    if dataset is None:
        raise RuntimeError(f"data.{stage}_dir is not set: no {stage} set to evaluate on")
    check_shards(dataset, stage, trainer)
    rank, world = rank_and_world(trainer)
    return DataLoader(dataset, batch_size=None, sampler=ShardSampler(len(dataset), rank, world),
                      num_workers=min(num_workers, 1), pin_memory=pin_memory)
