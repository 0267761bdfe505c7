"""Throughput of the training-pair pipeline (:func:`cirlab.data.sampling.make_pairs`).

CPU figures from shared machines are compared after scaling to a reference CPU speed:
:func:`matmul_gflops` measures the machine's fp32 matmul rate next to the pipeline figure, and
:func:`scaled_to_reference` rescales a rate to :data:`REFERENCE_GFLOPS`.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from cirlab.data.loading import JPEG_GRID, margin_crop_size
from cirlab.data.sampling import (
    DegradationConfig,
    PairSampler,
    SamplingConfig,
    make_pairs,
)

__all__ = ["REFERENCE_GFLOPS", "bench_pairs", "bench_pipeline", "matmul_gflops", "scaled_to_reference"]

#: The matmul rate (fp32 2048x2048, 2 threads, GFLOP/s) CPU throughput figures are scaled to.
REFERENCE_GFLOPS: float = 120.0


def matmul_gflops(threads: int = 2, n: int = 2048, repeats: int = 7, seed: int = 0) -> dict[str, float | int]:
    """The CPU's fp32 matrix-product rate right now: ``repeats`` timed ``a @ b`` of ``n x n`` matrices.

    torch's intra-op thread count is set to ``threads`` for the measurement and restored
    afterwards. One untimed product warms up; each timed product counts ``2 n^3`` FLOPs.
    On a shared machine the median tracks the CPU share a benchmark run next to it got; the best
    run is the machine's speed when it was least disturbed.

    Returns:
        dict with ``gflops_median``, ``gflops_best``, ``gflops_worst`` (GFLOP/s), ``threads``,
        ``n``, ``repeats``.
    """
    if threads < 1 or n < 1 or repeats < 1:
        raise ValueError(f"threads={threads}, n={n} and repeats={repeats} must all be >= 1")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(seed)
        a = torch.randn(n, n, generator=gen)
        b = torch.randn(n, n, generator=gen)
        a @ b
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)
    flops = 2.0 * n**3
    return {
        "gflops_median": flops / statistics.median(times) / 1e9,
        "gflops_best": flops / min(times) / 1e9,
        "gflops_worst": flops / max(times) / 1e9,
        "threads": threads,
        "n": n,
        "repeats": repeats,
    }


def scaled_to_reference(rate: float, gflops: float, reference: float = REFERENCE_GFLOPS) -> float:
    """``rate`` measured on a CPU doing ``gflops`` GFLOP/s, rescaled to one doing ``reference``."""
    if not gflops > 0:
        raise ValueError(f"gflops={gflops} must be > 0")
    return rate * reference / gflops


def _run(
    device: str | torch.device,
    batch_size: int,
    patch: int,
    seconds: float,
    warmup: int,
    seed: int,
    margin: int,
) -> tuple[int, float, torch.device]:
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    gen = torch.Generator(device=dev).manual_seed(seed)
    sampler = PairSampler(DegradationConfig(), SamplingConfig(ground_truth="relative"))
    # a few distinct clean batches so the timing does not hinge on one draw of content
    side = margin_crop_size(patch, margin)
    cleans = [
        torch.rand(batch_size, 3, side, side, generator=gen, device=dev)
        for _ in range(4)
    ]
    # patch offsets as CropDataset draws them: the margin plus a random phase to the JPEG grid
    offsets = None if margin == 0 else margin + torch.randint(0, JPEG_GRID, (batch_size, 2), generator=gen,
                                                               device=dev)
    kwargs = {} if offsets is None else {"offsets": offsets, "patch_size": patch}
    for i in range(max(0, warmup)):
        make_pairs(cleans[i % len(cleans)], sampler, generator=gen, **kwargs)
    sync()
    iters = 0
    start = time.perf_counter()
    elapsed = 0.0
    while iters == 0 or elapsed < seconds:
        make_pairs(cleans[iters % len(cleans)], sampler, generator=gen, **kwargs)
        iters += 1
        sync()
        elapsed = time.perf_counter() - start
    return iters, elapsed, dev


def bench_pairs(
    device: str | torch.device = "cpu",
    batch_size: int = 16,
    patch: int = 64,
    seconds: float = 5.0,
    warmup: int = 2,
    seed: int = 0,
    num_threads: int | None = None,
    margin: int = 10,
) -> dict[str, object]:
    """Measure relative-ground-truth pairs per second of ``make_pairs``, on margin crops as training
    makes them (``margin`` pixels of context, :func:`cirlab.data.loading.margin_crop_size`; 0: bare patches).

    All three degradations are enabled with the default sampling configuration (relative GT,
    p_multiple = p_binary = 0.5, uniform levels on the docs/method.md grids). Each call makes
    ``batch_size`` pairs (2 * batch_size degraded ``patch x patch`` images) from random clean
    crops in [0, 1]; ``warmup`` calls are discarded, then calls are timed until ``seconds`` have
    elapsed (at least one call). CUDA work is synchronised before the clock is read.

    ``num_threads``: if given, torch's intra-op thread count is set to it for the measurement
    and restored afterwards (``None``: leave it as it is). DataLoader workers run with one
    thread each, and on a busy 2-core machine 2 threads can be far slower than 1 for these
    small tensors (10-200 pairs/s against about 1,000 under the same load, 2026-11-29), so
    ``num_threads=1`` (or ``OMP_NUM_THREADS=1``) is the relevant figure on a shared machine.
    Pair synthesis on CPU uses a second core anyway: the noise field is drawn on a helper
    thread while the crops are blurred (:func:`cirlab.data.degradations.degrade_patches`).

    Returns:
        dict with ``pairs_per_s`` (float), ``images_per_s`` (2 per pair), ``iterations``,
        ``elapsed_s``, ``device``, ``batch``, ``patch``, ``torch_threads``.
    """
    previous_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        threads = torch.get_num_threads()
        iters, elapsed, dev = _run(device, batch_size, patch, seconds, warmup, seed, margin)
    finally:
        if num_threads is not None:
            torch.set_num_threads(previous_threads)
    pairs_per_s = iters * batch_size / elapsed
    return {
        "pairs_per_s": pairs_per_s,
        "images_per_s": 2.0 * pairs_per_s,
        "iterations": iters,
        "elapsed_s": elapsed,
        "device": str(dev),
        "batch": batch_size,
        "patch": patch,
        "margin": margin,
        "torch_threads": threads,
    }


def bench_pipeline(device: str, batch_size: int = 16, patch: int = 64, seconds: float = 10.0,
                   num_workers: int = 2, warmup: int = 3, pairs_on: str = "auto") -> dict:
    """Pairs/s of the whole training pipeline, the pairs made where training on ``device`` makes them.

    The embedded photos' :class:`~cirlab.data.datamodule.RestorationDataModule` (relative GT, all
    three degradations, the default 10 px margin) with ``num_workers`` DataLoader workers.
    ``pairs_on`` (``data.pairs_on``): ``auto`` resolves as a trainer on ``device`` would
    (:func:`~cirlab.data.loading.resolve_pairs_on`): ``workers`` on the CPU with workers, else
    ``device``. Each timed batch is fetched from the loader, passed through
    ``on_before_batch_transfer``, moved to ``device`` and passed to ``on_after_batch_transfer``,
    which makes the pairs (``device``) or converts the workers' uint8 codes to the float pairs
    (``workers``): every batch's pairs are made exactly once. ``warmup`` batches are
    discarded first (worker start-up; the workers' prefetched batches, at most ``2 num_workers``,
    then count towards the timed run).

    Returns:
        dict with ``pairs_per_s``, ``batches``, ``elapsed_s``, ``num_workers``, ``pairs_on`` (as
        given), ``pairs_made_on`` (``workers`` or ``device``), ``device``, ``batch``, ``patch``.
    """
    from cirlab.data.datamodule import RestorationDataModule
    from cirlab.data.loading import resolve_pairs_on

    dev = torch.device(device)
    where = resolve_pairs_on(pairs_on, num_workers, dev.type)
    cache = Path(tempfile.gettempdir()) / "cirlab-bench-cache"
    datamodule = RestorationDataModule(
        train_dir=str(cache / "embedded" / "train"), val_dir=None, embedded_root=str(cache / "embedded"),
        patch_size=patch, batch_size=batch_size, batches_per_epoch=10**6, num_workers=num_workers, seed=0,
        pairs_on=where,
    )
    datamodule.prepare_data()
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    from lightning.fabric.utilities.apply_func import move_data_to_device

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def step() -> None:  # the batch's way from the loader to the training step in Lightning
        batch = datamodule.on_before_batch_transfer(next(iterator), 0)
        datamodule.on_after_batch_transfer(move_data_to_device(batch, dev), 0)

    iterator = iter(loader)
    for _ in range(warmup):
        step()
    sync()
    batches, start = 0, time.perf_counter()
    while batches == 0 or time.perf_counter() - start < seconds:
        step()
        batches += 1
    sync()
    elapsed = time.perf_counter() - start
    return {"pairs_per_s": batches * batch_size / elapsed, "batches": batches, "elapsed_s": elapsed,
            "num_workers": num_workers, "pairs_on": pairs_on, "pairs_made_on": datamodule.pairs_made_on,
            "device": str(dev), "batch": batch_size, "patch": patch}
