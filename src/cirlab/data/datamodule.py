"""The restoration DataModule: blur/noise/JPEG pairs made from clean crops of a folder.

Training batches (after ``on_after_batch_transfer``): the pairs of
:func:`~cirlab.data.sampling.make_pairs` (float ``(B, 3, P, P)`` images in ``[0, 1]`` and their
task-space levels, relative or absolute ground truth) plus the sample ``id``. The DataLoader's
dataset cuts clean uint8 crops out of the training images (:mod:`cirlab.data.loading`: keyed by
sample id, disjoint over ranks, resumable), each with ``degrade_margin`` pixels of the image
around its patch. :class:`RestorationPairMaker` turns a crop batch into pairs, either in the
DataLoader workers' collate function or in ``on_after_batch_transfer`` on the batch's device
(``data.pairs_on``; ``auto``: in the workers when training runs on the CPU with workers, on the
device otherwise, :func:`~cirlab.data.loading.resolve_pairs_on`; workers send the pairs' uint8
codes, made floats on the training device); both give the same pairs. The pair step degrades the
whole crop and then cuts the patch out, so a training patch is blurred and JPEG-compressed as the
same window of a whole degraded image is (blur reads the real neighbours, not replicate padding
at the patch's edge; the JPEG block grid sits at a random phase to the patch);
:meth:`RestorationDataModule.setup` decodes those images once per node into a file under
``<cache_dir>/decoded``
(:class:`~cirlab.data.image_cache.DecodedImageCache`) that every DDP rank of the node and every
later run memory-maps (without ``cache_dir``: into the process's shared memory), and keeps them
for the DataModule's lifetime. The degradations are synthesised batched, on the batch's device
(the GPU when training runs there and ``pairs_on`` resolves to ``device``) or in the workers on
the CPU, from a generator seeded with ``mix_seed(seed, first id of the batch)``.

Validation / test items: the deterministic sets of :mod:`cirlab.data.evalsets` (every image at
every point of a level grid, generated once and cached on disk under ``cache_dir``), one whole
image per item, sharded over ranks without padding.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from cirlab.data.degradations import KERNEL_SIZE
from cirlab.data.evalsets import EvalSetDataset, EvalSetSpec, build_eval_set
from cirlab.data.loading import (
    arrays_to_tensors,
    batch_offsets,
    check_crop_settings,
    check_margin,
    check_pairs_on,
    check_shards,
    crop_loader,
    decode_training_images,
    first_sample_id,
    mix_seed,
    pairs_in_workers,
    scan_training_folder,
    shard_loader,
)
from cirlab.data.sampling import DegradationConfig, PairSampler, SamplingConfig, make_pair_codes, pairs_from_codes

log = logging.getLogger(__name__)


def _typed(value: Any, cls: type, key: str):
    """``value`` as a ``cls`` instance: None gives the defaults, an instance is kept, a mapping
    of its fields is passed to ``cls`` (whose checks name ``key``).

    The Hydra configs hand over instances (``_convert_: object`` in ``conf/data/embedded.yaml``
    turns the typed ``degradation``/``sampling`` groups into their dataclasses); mappings are
    for code and tests that build the DataModule directly.
    """
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        try:
            return cls(**value)
        except TypeError as error:  # an unknown field
            raise ValueError(f"{key}: {error}") from None
    raise ValueError(f"{key} must be a {cls.__name__} or a mapping of its fields, got {type(value).__name__}")


class RestorationPairMaker:
    """Crop batch -> training pairs: the one implementation behind both places pairs are made.

    A small picklable object (the sampler, seed, patch size and margin; never the DataModule, which
    holds the trainer), so DataLoader workers can run it under any start method. Called with a
    collated crop batch ``{"clean": (B, 3, S, S) uint8, "offset": (B, 2), "id": (B,)}`` on any
    device; returns :func:`~cirlab.data.sampling.make_pairs`'s dict plus ``id``, on that device.
    The generator is seeded with ``mix_seed(seed, id[0])``, so the pairs are a function of the
    crop batch: a worker (one intra-op thread) gives the same bytes as the main process at one
    thread (another thread count may round some float sums differently).

    The call is ``from_codes(codes(batch))``. Workers run :meth:`codes` only and send its compact
    result (uint8 codes, a quarter of the float bytes, with levels and ids;
    :class:`~cirlab.data.loading.PairCollate`), and ``on_after_batch_transfer`` runs
    :meth:`from_codes` on the training device, so both places give the same batches.
    """

    def __init__(self, sampler: PairSampler, seed: int, patch_size: int, margin: int) -> None:
        self.sampler, self.seed, self.patch_size, self.margin = sampler, seed, patch_size, margin

    def codes(self, batch: dict) -> dict:
        """Crop batch -> ``{"codes": (2B, 3, P, P) uint8, "levels": (2B, 3), "id": (B,)}``
        (:func:`~cirlab.data.sampling.make_pair_codes`), on the batch's device."""
        offsets = batch_offsets(batch, self.patch_size, self.margin)
        clean = batch["clean"].float().div_(255)
        generator = torch.Generator(device=clean.device)
        generator.manual_seed(mix_seed(self.seed, first_sample_id(batch)))
        packed = make_pair_codes(clean, self.sampler, generator=generator, offsets=offsets,
                                 patch_size=self.patch_size)
        packed["id"] = batch["id"]
        return packed

    @staticmethod
    def from_codes(packed: dict) -> dict:
        """:meth:`codes`' result -> the training batch (float32 pairs, levels, physical levels, ``id``)."""
        pairs = pairs_from_codes(packed["codes"], packed["levels"])
        pairs["id"] = packed["id"]
        return pairs

    def __call__(self, batch: dict) -> dict:
        return self.from_codes(self.codes(batch))


class RestorationDataModule(L.LightningDataModule):
    """Relative-ground-truth blur/noise/JPEG pairs for controllable restoration.

    Args:
        train_dir: folder of clean training images (e.g. ``DIV2K/DIV2K_train_HR``).
        val_dir, test_dir: folders of clean images for the deterministic evaluation sets.
        patch_size: training crop size in pixels (must be even).
        batch_size: training pairs per batch (per rank).
        batches_per_epoch: length of one training epoch in batches.
        num_workers: DataLoader workers cutting crops (and making the pairs, see ``pairs_on``).
        degradation, sampling: ``DegradationConfig`` / ``SamplingConfig``, or mappings of their
            fields (None: the defaults).
        val_grid, test_grid: level grid names (``cresmd27``) or lists of task-space triples.
        val_max_images, test_max_images: use only the first N images (None = all).
        val_crop, test_crop: centre crop size for evaluation images (None = whole image).
        cache_dir: where generated evaluation sets (``<cache_dir>/evalsets``) and the decoded
            training images (``<cache_dir>/decoded``, one file per node shared by its processes) are kept.
        seed: the data seed (independent of the model-initialisation seed).
        on_bad: ``"error"`` (default) or ``"skip"`` (warn, naming each bad file).
        embedded_root: if set, the embedded scikit-image photos are written there first
            (``make train``'s offline default); ``train_dir``/``val_dir`` then point inside it.
        pin_memory: passed to the DataLoaders.
        overfit_batches: if set, train on the first N batches over and over.
        degrade_margin: pixels of image context around each training patch while it is degraded
            (default 10, the reach of the 21x21 blur kernel, so even r = 4 reads only real pixels;
            0: degrade the bare patch, the JPEG grid at its corner, as earlier releases).
        pairs_on: where training pairs are made: ``"device"`` in ``on_after_batch_transfer`` on
            the batch's device (the GPU when training runs there); ``"workers"`` in the
            DataLoader's collate function, i.e. in the worker processes (the main process at fetch
            time with ``num_workers=0``), on the CPU; ``"auto"`` (default) ``workers`` when
            ``num_workers > 0`` and the trainer runs on the CPU, ``device`` otherwise
            (:func:`~cirlab.data.loading.resolve_pairs_on`, resolved when the training loader
            is built, stored in ``pairs_made_on``). Both give the same pairs.
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
        degradation: DegradationConfig | Mapping | None = None,
        sampling: SamplingConfig | Mapping | None = None,
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
        degrade_margin: int = KERNEL_SIZE // 2,
        pairs_on: str = "auto",
    ) -> None:
        super().__init__()
        check_crop_settings(patch_size, batch_size, batches_per_epoch, num_workers, on_bad, overfit_batches)
        self.pairs_on = check_pairs_on(pairs_on)
        self.pairs_made_on: str | None = None  # "workers" or "device" once the training loader is built
        self.degrade_margin = check_margin(degrade_margin)
        self.degradation = _typed(degradation, DegradationConfig, "degradation")
        if 0 < self.degrade_margin < KERNEL_SIZE // 2 and "blur" in self.degradation.types:
            log.warning("data.degrade_margin=%d is less than the blur kernel's reach (%d px): the edges of a "
                        "training patch are blurred against the crop's replicated border", self.degrade_margin,
                        KERNEL_SIZE // 2)
        self.sampling = _typed(sampling, SamplingConfig, "sampling")
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
        return scan_training_folder(self.train_dir, self.patch_size, self.on_bad)

    def setup(self, stage: str | None = None) -> None:
        """Decode the training images (first ``fit`` only) and load the evaluation sets the stage needs."""
        if stage in (None, "fit") and self.train_images is None and self.train_dir is not None:
            store = self.cache_dir / "decoded" if self.cache_dir else None
            self.train_images = decode_training_images(self.check_inputs(), store_dir=store)
        if stage in (None, "fit", "validate") and self.val_set is None:
            spec = self._eval_spec("val")
            if spec is not None:
                self.val_set = EvalSetDataset(build_eval_set(spec, self._eval_cache_dir()))
                check_shards(self.val_set, "val", self.trainer)  # before training, not at the first validation
        if stage in (None, "test") and self.test_set is None:
            spec = self._eval_spec("test")
            if spec is not None:
                self.test_set = EvalSetDataset(build_eval_set(spec, self._eval_cache_dir()))
                check_shards(self.test_set, "test", self.trainer)

    def eval_levels(self, stage: str) -> torch.Tensor | None:
        """Task vectors (G, 3) of the ``"val"`` or ``"test"`` grid, as the set loaded by :meth:`setup`
        holds them (None before that, or without that set)."""
        dataset = self.val_set if stage == "val" else self.test_set
        return None if dataset is None else dataset.levels

    # ----------------------------------------------------------------------------- loaders
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

    # ----------------------------------------------------------------------------- pairs
    @property
    def pair_maker(self) -> RestorationPairMaker:
        """The picklable pair step of this DataModule's settings (used by workers and ``on_after_batch_transfer``)."""
        return RestorationPairMaker(self.sampler, self.seed, self.patch_size, self.degrade_margin)

    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """A batch from the workers' pair step arrives with numpy arrays (pickled through the
        worker's pipe, :class:`~cirlab.data.loading.PairCollate`): made tensors, so the trainer
        moves them to its device."""
        return arrays_to_tensors(batch)

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """Turn a training batch of clean crops into degraded pairs, on the batch's device.

        The crops come from :func:`~cirlab.data.loading.crop_loader` (``clean`` margin crops and
        each patch's ``offset``); the whole crop is degraded and the ``patch_size`` patch cut out
        (:class:`RestorationPairMaker`). A batch of ``codes`` (pairs made in the workers) is
        converted to floats here, on the training device; other batches (evaluation items) pass
        through unchanged.
        """
        if "clean" in batch:
            return self.pair_maker(batch)
        if "codes" in batch:
            return RestorationPairMaker.from_codes(batch)
        return batch

    def example_inputs(self, count: int = 1) -> torch.Tensor | None:
        """A few clean validation images (N, 3, H, W) in [0, 1] for output pictures."""
        dataset = self.val_set or self.test_set
        if dataset is None:
            return None
        return torch.stack([dataset.clean[i].float().div(255) for i in range(min(count, len(dataset)))])
