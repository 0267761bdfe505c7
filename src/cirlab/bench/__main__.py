"""``cirlab-bench``: measured figures, written with their command, date, machine and revision.

    cirlab-bench data [--seconds 10] [--out docs/bench/data.json]
    cirlab-bench search-step [--sizes tiny,full] [--out docs/bench/search_step.json]
    cirlab-bench cost [--cresmd C.ckpt] [--tasnet T.ckpt] [--tsnet S.ckpt] [--synthetic] [--naive 0.31,0.62,0.99]
                      [--resolutions 180x320,360x640] [--threads 1,all] [--repeats 3] [--out docs/bench/cost/]

``data`` measures the training pipeline's throughput in relative-GT pairs per second
(64x64 patches, batch 16, all three degradations): once for pair synthesis alone
(``make_pairs`` on ready crops) and once for the whole pipeline (DataLoader workers cutting
crops from the decoded embedded photos + synthesis on the device), on the CPU and, when
present, on the GPU. Results are merged into a JSON file keyed by machine and device and
printed as a Markdown table.

``search-step`` measures one TASNet search training step against one plain CResMD training
step (same batch 16 and 64x64 patches, interleaved, medians), for the tiny and the full network,
on the CPU and, when present, the GPU.

``cost`` measures FLOPs and latency of restoring one image under the 27 task vectors (TASNet
Table 1): CResMD against derived TASNet / TSNet checkpoints, a synthetic paper-scale TASNet
(``--synthetic``: random weights, paper-shaped widths, clearly labelled) and naively shared
CResMDs, models timed interleaved, speed-ups per round (docs in ``cirlab/bench/cost.py``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from cirlab.utils.run import write_json_atomically, write_text_atomically


def machine_description() -> dict:
    info = {
        "host": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def git_revision() -> str:
    """The checkout's short commit, ``+dirty`` when tracked files outside ``docs/`` differ from
    it (``docs/`` holds results, including the files earlier benchmarks of a series just wrote)."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).resolve().parent)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":/",
                                ":(top,exclude)docs"], capture_output=True,
                               text=True, cwd=Path(__file__).resolve().parent).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def bench_pipeline(device: str, batch_size: int = 16, patch: int = 64, seconds: float = 10.0,
                   num_workers: int = 2, warmup: int = 3) -> dict:
    """Pairs/s of the DataModule: workers cut crops, ``on_after_batch_transfer`` makes pairs."""
    from cirlab.data.datamodule import RestorationDataModule

    cache = Path(tempfile.gettempdir()) / "cirlab-bench-cache"
    datamodule = RestorationDataModule(
        train_dir=str(cache / "embedded" / "train"), val_dir=None, embedded_root=str(cache / "embedded"),
        patch_size=patch, batch_size=batch_size, batches_per_epoch=10**6, num_workers=num_workers, seed=0,
    )
    datamodule.prepare_data()
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    iterator = iter(loader)
    for _ in range(warmup):
        datamodule.on_after_batch_transfer({k: v.to(dev) for k, v in next(iterator).items()}, 0)
    sync()
    batches, start = 0, time.perf_counter()
    while batches == 0 or time.perf_counter() - start < seconds:
        batch = {k: v.to(dev, non_blocking=True) for k, v in next(iterator).items()}
        datamodule.on_after_batch_transfer(batch, 0)
        batches += 1
    sync()
    elapsed = time.perf_counter() - start
    return {"pairs_per_s": batches * batch_size / elapsed, "batches": batches, "elapsed_s": elapsed,
            "num_workers": num_workers, "device": str(dev), "batch": batch_size, "patch": patch}


def run_data(args: argparse.Namespace) -> int:
    from cirlab.bench.data import bench_pairs

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for device in devices:
        synthesis = bench_pairs(device=device, seconds=args.seconds)
        pipeline = bench_pipeline(device, seconds=args.seconds, num_workers=args.num_workers)
        rows.append({"device": device, "synthesis_pairs_per_s": synthesis["pairs_per_s"],
                     "pipeline_pairs_per_s": pipeline["pairs_per_s"], "num_workers": args.num_workers})
    record = {
        "command": "cirlab-bench data " + " ".join(sys.argv[2:]),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "revision": git_revision(),
        "machine": machine_description(),
        "batch": 16, "patch": 64, "degradations": "blur+noise+jpeg, relative GT",
        "results": rows,
    }
    out = Path(args.out)
    existing = json.loads(out.read_text()) if out.exists() else {}
    key = f"{record['machine']['host']}/{'+'.join(devices)}/workers={args.num_workers}"
    existing[key] = record
    write_json_atomically(out, existing)
    print(f"\n{record['command']}  ({record['date']}, rev {record['revision']}, "
          f"{record['machine']['cpu_count']} CPU cores{', ' + record['machine'].get('gpu', '') if 'gpu' in record['machine'] else ''})")
    print("| device | pair synthesis (pairs/s) | whole pipeline (pairs/s) |\n|---|---|---|")
    for row in rows:
        print(f"| {row['device']} | {row['synthesis_pairs_per_s']:,.0f} | {row['pipeline_pairs_per_s']:,.0f} |")
    print(f"written to {out}")
    return 0


SEARCH_SIZES = {"tiny": (8, 2), "small": (32, 8), "full": (64, 32)}


def run_search_step(args: argparse.Namespace) -> int:
    from cirlab.bench.search import bench_search_step

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for device in devices:
        for size in args.sizes.split(","):
            if size not in SEARCH_SIZES:
                raise SystemExit(f"--sizes: unknown size {size!r}; use {', '.join(SEARCH_SIZES)}")
            nf, nb = SEARCH_SIZES[size]
            rows.append({"size": size, **bench_search_step(nf=nf, nb=nb, repeats=args.repeats, device=device)})
    record = {
        "command": "cirlab-bench search-step " + " ".join(sys.argv[2:]),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "revision": git_revision(), "machine": machine_description(), "results": rows,
    }
    out = Path(args.out)
    existing = json.loads(out.read_text()) if out.exists() else {}
    existing[f"{record['machine']['host']}/{'+'.join(devices)}"] = record
    write_json_atomically(out, existing)
    print(f"\n{record['command']}  ({record['date']}, rev {record['revision']})")
    print("| device | network | plain step (s) | search, all shared (s) | ratio | search, none shared (s) | ratio |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['device']} | {row['size']} (nf {row['nf']}, nb {row['nb']}) | {row['plain_s']:.4f} "
              f"| {row['search_shared_s']:.4f} | {row['ratio_shared']:.2f}x "
              f"| {row['search_unshared_s']:.4f} | {row['ratio_unshared']:.2f}x |")
    print(f"written to {out}")
    return 0


def _parse_resolutions(text: str) -> list[tuple[int, int]]:
    named = {"hd": (720, 1280), "2k": (1080, 1920), "4k": (2160, 3840)}
    out = []
    for part in (p.strip().lower() for p in text.split(",") if p.strip()):
        if part in named:
            out.append(named[part])
            continue
        try:
            height, width = (int(v) for v in part.split("x"))
        except ValueError:
            raise SystemExit(f"--resolutions: {part!r} is not HxW (e.g. 180x320) or one of hd, 2k, 4k") from None
        out.append((height, width))
    return out


def run_cost(args: argparse.Namespace) -> int:
    """``cost``: FLOPs and latency of CResMD, TSNet, TASNet and naive sharing (docs in bench/cost.py)."""
    from cirlab.bench.cost import (
        CPU_RESOLUTIONS,
        PAPER_RESOLUTIONS,
        bench_cost,
        build_models,
    )

    device = args.device
    on_gpu = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if args.resolutions:
        resolutions = _parse_resolutions(args.resolutions)
    else:
        resolutions = PAPER_RESOLUTIONS if on_gpu else CPU_RESOLUTIONS
    naive = args.naive.strip().lower()
    fractions = [] if naive in ("", "none") else [float(f) for f in naive.split(",")]
    models, notes = build_models(args.cresmd, args.tasnet, args.tsnet, nf=args.nf, nb=args.nb, fractions=fractions,
                                 synthetic=args.synthetic)
    threads = [int(t) if t not in ("all", "") else None for t in args.threads.split(",")]
    record = bench_cost(models, resolutions, grid=args.grid, repeats=args.repeats, warmup=args.warmup,
                        threads=threads, device=device, progress=True)
    out = Path(args.out)
    table = write_cost_outputs(record, out, "cirlab-bench " + " ".join(getattr(args, "argv", None) or sys.argv[1:]),
                               notes, checkpoints={"cresmd": args.cresmd, "tasnet": args.tasnet, "tsnet": args.tsnet},
                               synthetic=bool(args.synthetic))
    print(table)
    print(f"written to {out / 'cost.json'}, {out / 'cost.md'}, {out / 'flops_per_task.png'}")
    return 0


def write_cost_outputs(record: dict, out: Path, command: str, notes: list[str], **meta) -> str:
    """Stamp a :func:`cirlab.bench.cost.bench_cost` record (command, date, revision, machine,
    notes, ``meta``) and write ``cost.json``, ``cost.md`` and ``flops_per_task.png`` into
    ``out``; returns the Markdown table."""
    from cirlab.bench.cost import markdown_table, plot_flops_per_task

    record.update({"command": command, "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                   "revision": git_revision(), "machine": machine_description(), "notes": notes, **meta})
    write_json_atomically(out / "cost.json", record)
    table = markdown_table(record, notes)
    write_text_atomically(out / "cost.md", table + "\n")
    plot_flops_per_task(record, out / "flops_per_task.png")
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cirlab-bench", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    data = sub.add_parser("data", help="training-pipeline throughput (pairs/s)")
    data.add_argument("--seconds", type=float, default=10.0, help="timed seconds per measurement")
    data.add_argument("--num-workers", type=int, default=2, help="DataLoader workers for the whole-pipeline figure")
    data.add_argument("--out", default="docs/bench/data.json", help="JSON file the figures are merged into")
    data.set_defaults(func=run_data)
    search = sub.add_parser("search-step", help="TASNet search step vs plain CResMD step")
    search.add_argument("--sizes", default="tiny,full", help="comma list of tiny, small, full")
    search.add_argument("--repeats", type=int, default=7, help="timed steps per variant (median reported)")
    search.add_argument("--out", default="docs/bench/search_step.json")
    search.set_defaults(func=run_search_step)
    cost = sub.add_parser("cost", help="FLOPs and latency on the 27-point workload (TASNet Table 1, Fig. 11)")
    cost.add_argument("--cresmd", help="CResMD checkpoint (default: random init; FLOPs still exact)")
    cost.add_argument("--tasnet", help="derived TASNet checkpoint (cirlab-derive)")
    cost.add_argument("--tsnet", help="derived TSNet checkpoint (search with sharing disabled)")
    cost.add_argument("--resolutions", help="comma list of HxW or hd,2k,4k (default: hd,2k,4k on GPU, "
                      "180x320,360x640 on CPU)")
    cost.add_argument("--grid", default="cresmd27", help="task grid of the workload")
    cost.add_argument("--repeats", type=int, default=3, help="timed runs of the workload (median, min, max)")
    cost.add_argument("--warmup", type=int, default=1, help="untimed runs before timing")
    cost.add_argument("--threads", default="1,all", help="CPU thread counts to time (all = every core)")
    cost.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                      help="auto: CPU timings plus CUDA when present")
    cost.add_argument("--synthetic", action="store_true",
                      help="add TASNet-synthetic: a derived TASNet of paper-shaped widths (nf, nb below) with random "
                           "weights, for latency only")
    cost.add_argument("--naive", default="0.31,0.62,0.99",
                      help="fractions of CResMD layers naively shared, one model each ('none': no such models)")
    cost.add_argument("--nf", type=int, default=64, help="width of the random CResMD (no checkpoint given) and of "
                      "the synthetic TASNet")
    cost.add_argument("--nb", type=int, default=32, help="blocks of the random CResMD (no checkpoint given) and of "
                      "the synthetic TASNet")
    cost.add_argument("--out", default="docs/bench/cost/", help="folder for cost.json, cost.md, flops_per_task.png")
    cost.set_defaults(func=run_cost)
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
