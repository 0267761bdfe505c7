"""The restoration DataModule: clean crops from a folder, degraded into pairs on the batch's device.

Training
    Workers only cut clean crops (with flips and transpose, identical for input and target
    since both come from the same crop) out of decoded images held in shared memory
    (``DecodedImageCache``), so no worker decodes a PNG per sample. The degradation pairs
    (relative or absolute ground truth, ``cirlab.data.sampling``) are synthesised batched in
    ``on_after_batch_transfer``, i.e. on the GPU when training runs there.

    [choice] The paired augmentation is plain flips/transpose of the uint8 clean crop in the
    worker, not kornia: input and target are both made from that one crop afterwards, so they
    share the augmentation by construction, and flipping a 64x64 uint8 view costs nothing.

    The stream is a pure function of ``(seed, global batch index, rank)``: sample ``j`` of the
    batch ``b`` of rank ``k`` in a world of ``W`` ranks has the id ``(b * W + k) * B + j``; its
    crop and flips are drawn from a generator seeded with that id, and the degradation of a
    batch from one seeded with its first id. Ranks therefore never draw the same pairs, and a
    run resumed from a checkpoint continues the stream where it stopped (the batch sampler
    starts at the number of batches already trained).

Validation / test
    Deterministic sets (``cirlab.data.evalsets``) generated once from folders of clean images
    and cached on disk. Distributed evaluation shards whole images over ranks without padding,
    so reported numbers contain every image exactly once.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset, Sampler

from cirlab.data.evalsets import EvalSetDataset, EvalSetSpec, build_eval_set
from cirlab.data.sampling import DegradationConfig, PairSampler, SamplingConfig, make_pairs

log = logging.getLogger(__name__)

_ID_STRIDE = 1_000_003  # mixes the global seed into per-sample ids


def _as_config(value: Any, cls: type, key: str):
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, DictConfig):
        value = OmegaConf.to_object(value)
        if isinstance(value, cls):
            return value
    if is_dataclass(value):
        value = asdict(value)
    if isinstance(value, Mapping) or hasattr(value, "items"):
        try:
            return cls(**{k: v for k, v in dict(value).items()})
        except TypeError as error:
            raise ValueError(f"{key}: {error}") from None
    raise ValueError(f"{key} must be a mapping of {cls.__name__} fields, got {type(value).__name__}")


class CropDataset(Dataset):
    """Random clean crops keyed by a sample id: ``dataset[id]`` is always the same crop.

    Returns ``{"clean": (3, P, P) uint8, "id": int64}``. The crop position, the image and the
    flips/transpose are drawn from ``numpy.random.default_rng([seed, id])``.
    """

    def __init__(self, images, patch_size: int, seed: int, augment: bool = True) -> None:
        self.images = images
        self.patch_size = patch_size
        self.seed = seed
        self.augment = augment

    def __len__(self) -> int:  # ids are unbounded; the batch sampler decides how many
        return 2**62

    def __getitem__(self, sample_id: int) -> dict:
        rng = np.random.default_rng([self.seed, int(sample_id)])
        image = self.images[int(rng.integers(len(self.images)))]
        height, width = image.shape[-2:]
        top = int(rng.integers(height - self.patch_size + 1))
        left = int(rng.integers(width - self.patch_size + 1))
        crop = image[:, top : top + self.patch_size, left : left + self.patch_size]
        if self.augment:
            flip_h, flip_v, transpose = rng.integers(2, size=3)
            if flip_h:
                crop = crop.flip(-1)
            if flip_v:
                crop = crop.flip(-2)
            if transpose:
                crop = crop.transpose(-1, -2)
        return {"clean": crop.contiguous(), "id": torch.tensor(int(sample_id), dtype=torch.long)}


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
    """Contiguous-free, padding-free sharding of an evaluation set: rank k gets k, k+W, ..."""

    def __init__(self, length: int, rank: int, world_size: int) -> None:
        self.indices = list(range(rank, length, world_size))

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)


class RestorationDataModule(L.LightningDataModule):
    """Relative-ground-truth blur/noise/JPEG pairs for controllable restoration.

    Args:
        train_dir: folder of clean training images (e.g. ``DIV2K/DIV2K_train_HR``).
        val_dir, test_dir: folders of clean images for the deterministic evaluation sets.
        patch_size: training crop size in pixels (must be even).
        batch_size: training pairs per batch (per rank).
        batches_per_epoch: length of one training epoch in batches.
        num_workers: DataLoader workers cutting crops.
        degradation, sampling: ``DegradationConfig`` / ``SamplingConfig`` (or mappings of their fields).
        val_grid, test_grid: level grid names (``cresmd27``) or lists of task-space triples.
        val_max_images, test_max_images: use only the first N images (None = all).
        val_crop, test_crop: centre crop size for evaluation images (None = whole image).
        cache_dir: where decoded training images and generated evaluation sets are cached.
        seed: the data seed (independent of the model-initialisation seed).
        on_bad: ``"error"`` (default) or ``"skip"`` (warn, naming each bad file).
        embedded_root: if set, the embedded scikit-image photos are written there first
            (``make train``'s offline default); ``train_dir``/``val_dir`` then point inside it.
        overfit_batches: if set, train on the first N batches over and over.
    """

    def __init__(
        self,
        train_dir: str | None,
        val_dir: str | None,
        test_dir: str | None = None,
        patch_size: int = 64,
        batch_size: int = 16,
        batches_per_epoch: int = 1000,
        num_workers: int = 2,
        degradation: Any = None,
        sampling: Any = None,
        val_grid: str | list = "cresmd27",
        test_grid: str | list = "cresmd27",
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
    ) -> None:
        super().__init__()
        for key, value, low in (("patch_size", patch_size, 2), ("batch_size", batch_size, 1), ("batches_per_epoch", batches_per_epoch, 1)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"data.{key}={value!r} must be an integer >= {low}")
        if patch_size % 2:
            raise ValueError(f"data.patch_size={patch_size} must be even (the networks run their trunk at half resolution)")
        if num_workers < 0:
            raise ValueError(f"data.num_workers={num_workers} must be >= 0")
        if on_bad not in ("error", "skip"):
            raise ValueError(f"data.on_bad={on_bad!r} must be 'error' or 'skip'")
        self.degradation = _as_config(degradation, DegradationConfig, "degradation")
        self.sampling = _as_config(sampling, SamplingConfig, "sampling")
        self.sampler = PairSampler(self.degradation, self.sampling)
        self.train_dir, self.val_dir, self.test_dir = train_dir, val_dir, test_dir
        self.patch_size, self.batch_size = patch_size, batch_size
        self.batches_per_epoch, self.num_workers = batches_per_epoch, num_workers
        self.val_spec = (val_grid, val_max_images, val_crop)
        self.test_spec = (test_grid, test_max_images, test_crop)
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.seed, self.on_bad = seed, on_bad
        self.embedded_root = embedded_root
        self.pin_memory = pin_memory
        if overfit_batches is not None and overfit_batches < 1:
            raise ValueError(f"data.overfit_batches={overfit_batches} must be >= 1 or null")
        self.overfit_batches = overfit_batches
        self.train_images = None
        self.val_set: EvalSetDataset | None = None
        self.test_set: EvalSetDataset | None = None

    # ----------------------------------------------------------------------------- preparation
    def _eval_spec(self, stage: str) -> EvalSetSpec | None:
        folder = self.val_dir if stage == "val" else self.test_dir
        if folder is None:
            return None
        grid, max_images, crop = self.val_spec if stage == "val" else self.test_spec
        return EvalSetSpec(folder=str(folder), grid=grid, max_images=max_images, crop=crop, seed=self.seed,
                           on_bad=self.on_bad, config_key=f"data.{stage}_dir")

    def _eval_cache_dir(self) -> Path | None:
        return self.cache_dir / "evalsets" if self.cache_dir else None

    def prepare_data(self) -> None:
        """Write the embedded images if requested; validate the folders; generate evaluation sets."""
        if self.embedded_root:
            from cirlab.data.embedded import write_embedded

            write_embedded(self.embedded_root)
        self.check_inputs()
        for stage in ("val", "test"):
            spec = self._eval_spec(stage)
            if spec is not None:
                build_eval_set(spec, self._eval_cache_dir())

    def check_inputs(self) -> list[Path]:
        """Validate the training folder (every file, before training starts); return its images."""
        from cirlab.data.images import scan_folder

        if self.train_dir is None:
            return []
        return scan_folder(self.train_dir, min_size=self.patch_size, on_bad=self.on_bad, config_key="data.train_dir")

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and self.train_images is None and self.train_dir is not None:
            from cirlab.data.images import DecodedImageCache

            paths = self.check_inputs()
            self.train_images = DecodedImageCache.from_paths(paths)
            log.info("training images: %d decoded (%.1f MB in shared memory)", len(paths), self.train_images.total_bytes / 2**20)
        if stage in (None, "fit", "validate") and self.val_set is None:
            spec = self._eval_spec("val")
            if spec is not None:
                self.val_set = EvalSetDataset(build_eval_set(spec, self._eval_cache_dir()))
        if stage in (None, "test") and self.test_set is None:
            spec = self._eval_spec("test")
            if spec is not None:
                self.test_set = EvalSetDataset(build_eval_set(spec, self._eval_cache_dir()))

    # ----------------------------------------------------------------------------- loaders
    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    def _completed_batches(self) -> int:
        trainer = self.trainer
        if trainer is None:
            return 0
        return trainer.fit_loop.epoch_loop.batch_progress.total.completed

    def _processed_batches(self) -> int:
        trainer = self.trainer
        if trainer is None:
            return 0
        return trainer.fit_loop.epoch_loop.batch_progress.total.processed

    def train_dataloader(self) -> DataLoader:
        if self.train_images is None:
            raise RuntimeError("data.train_dir is not set: cannot train without a folder of clean images")
        rank, world = self._rank_world()
        dataset = CropDataset(self.train_images, self.patch_size, self.seed)
        batch_sampler = SteppedBatchSampler(self.batch_size, self.batches_per_epoch, rank, world, self._completed_batches,
                                            repeat=self.overfit_batches)
        return SteppedDataLoader(dataset, batch_sampler=batch_sampler, num_workers=self.num_workers,
                          pin_memory=self.pin_memory, persistent_workers=False, position=self._processed_batches)

    def _eval_loader(self, dataset: EvalSetDataset | None, stage: str) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"data.{stage}_dir is not set: no {stage} set to evaluate on")
        rank, world = self._rank_world()
        return DataLoader(dataset, batch_size=None, sampler=ShardSampler(len(dataset), rank, world),
                          num_workers=min(self.num_workers, 1), pin_memory=self.pin_memory)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_set, "val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.test_set, "test")

    # ----------------------------------------------------------------------------- pairs
    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """Turn a training batch of clean crops into degraded pairs, on the batch's device."""
        if "clean" not in batch:
            return batch
        clean = batch["clean"].float().div_(255)
        generator = torch.Generator(device=clean.device)
        generator.manual_seed(self.seed * _ID_STRIDE + int(batch["id"][0]))
        pairs = make_pairs(clean, self.sampler, generator=generator)
        pairs["id"] = batch["id"]
        return pairs

    def example_inputs(self, count: int = 1) -> torch.Tensor | None:
        """A few clean validation images (N, 3, H, W) in [0, 1] for output pictures."""
        dataset = self.val_set or self.test_set
        if dataset is None:
            return None
        return torch.stack([dataset.clean[i].float().div(255) for i in range(min(count, len(dataset)))])

    @property
    def steps_per_epoch(self) -> int:
        return self.batches_per_epoch

    def describe(self) -> dict:
        return {"batches_per_epoch": self.batches_per_epoch, "batch_size": self.batch_size,
                "patch_size": self.patch_size, "epochs_for_1M_steps": math.ceil(1_000_000 / self.batches_per_epoch)}
