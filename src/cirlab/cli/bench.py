"""`cirlab bench` (`cirlab-bench`): measured figures, written with their command, date, machine and revision.

    cirlab-bench data [--seconds 10] [--num-workers 2] [--pairs-on auto] [--threads N] [--out docs/bench/data.json]
    cirlab-bench search-step [--sizes tiny,full] [--out docs/bench/search_step.json]
    cirlab-bench cost [--cresmd C.ckpt] [--tasnet T.ckpt] [--tsnet S.ckpt] [--synthetic] [--naive 0.31,0.62,0.99]
                      [--resolutions 180x320,360x640] [--threads 1,all] [--repeats 3] [--out docs/bench/cost/]
    cirlab-bench sharing --cresmd C.ckpt [--seeds 1234,1,2] [--threads 1,2] [--out logs/sharing] [-- overrides]
    cirlab-bench train [--experiments cresmd_paper,...] [--device auto] [--variants fp32,bf16+cl] [--steps 2]
                       [--warmup 1] [--num-workers 0] [--out docs/bench/train.json] [-- overrides]

`data` measures the training pipeline's throughput in relative-GT pairs per second
(64x64 patches, batch 16, all three degradations): once for pair synthesis alone
(`make_pairs` on ready crops) and once for the whole pipeline (DataLoader workers cutting
crops from the decoded embedded photos + pair synthesis where training makes it: `--pairs-on`,
as `data.pairs_on`; `auto` = in the workers on the CPU with workers, on the device otherwise),
on the CPU and, when present, on the GPU. Results are merged into a JSON file keyed by machine,
devices, workers and `--pairs-on`, and printed as a Markdown table.

`search-step` measures one TASNet search training step against one plain CResMD training
step (same batch 16 and 64x64 patches, interleaved, medians), for the tiny and the full network,
on the CPU and, when present, the GPU.

`cost` measures FLOPs and latency of restoring one image under the 27 task vectors (TASNet
Table 1): CResMD against derived TASNet / TSNet checkpoints, a synthetic paper-scale TASNet
(`--synthetic`: random weights, paper-shaped widths, clearly labelled) and naively shared
CResMDs, models timed interleaved, speed-ups per round (docs in `cirlab/bench/cost.py`).

`sharing` runs the embedded pipeline's search, derivation, fine-tuning and evaluation from one
CResMD for each seed and torch thread count, and tabulates the derived shared maps, FLOPs
fraction, test PSNR and the agreement statistics of each search (`cirlab/bench/sharing.py`).

`train` times training steps of each module at paper size (the real training job of each paper
experiment: batch 16, 64x64; HyperRes 96x96, k = 4) on the device, for each variant (precision,
channels_last, torch.compile), warm-up excluded, and projects the wall time of every paper recipe
and of the TASNet pipeline from the fastest variant (`cirlab/bench/train.py`). CPU rates are
also given scaled to the reference matmul speed.

torch and the library are imported after the arguments are parsed, so `--help` is quick.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path


def run_data(args: argparse.Namespace) -> int:
    import torch

    from cirlab.bench.data import REFERENCE_GFLOPS, bench_pairs, bench_pipeline, matmul_gflops, scaled_to_reference
    from cirlab.bench.records import git_revision, machine_description
    from cirlab.utils.run import write_json_atomically

    if args.threads is not None and args.threads < 1:
        raise SystemExit(f"cirlab-bench data: --threads {args.threads} must be >= 1")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    matmul_before = matmul_gflops(threads=2)  # the CPU's speed now, to scale CPU figures to the reference
    rows = []
    previous_threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        for device in devices:
            synthesis = bench_pairs(device=device, seconds=args.seconds)
            pipeline = bench_pipeline(device, seconds=args.seconds, num_workers=args.num_workers,
                                      pairs_on=args.pairs_on)
            rows.append({"device": device, "synthesis_pairs_per_s": synthesis["pairs_per_s"],
                         "pipeline_pairs_per_s": pipeline["pairs_per_s"], "num_workers": args.num_workers,
                         "pairs_on": args.pairs_on, "pairs_made_on": pipeline["pairs_made_on"],
                         "torch_threads": torch.get_num_threads()})
    finally:
        torch.set_num_threads(previous_threads)
    matmul_after = matmul_gflops(threads=2)
    gflops = (matmul_before["gflops_median"] + matmul_after["gflops_median"]) / 2
    for row in rows:
        if row["device"] == "cpu":
            row["synthesis_pairs_per_s_at_reference"] = scaled_to_reference(row["synthesis_pairs_per_s"], gflops)
            row["pipeline_pairs_per_s_at_reference"] = scaled_to_reference(row["pipeline_pairs_per_s"], gflops)
    record = {
        "command": "cirlab-bench " + " ".join(args.argv),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "revision": git_revision(),
        "machine": machine_description(),
        "batch": 16, "patch": 64, "degradations": "blur+noise+jpeg, relative GT, 10 px context margin (data.degrade_margin)",
        "matmul": {"before": matmul_before, "after": matmul_after, "gflops_used": gflops,
                   "reference_gflops": REFERENCE_GFLOPS},
        "results": rows,
    }
    out = Path(args.out)
    existing = json.loads(out.read_text()) if out.exists() else {}
    key = f"{record['machine']['host']}/{'+'.join(devices)}/workers={args.num_workers}/pairs_on={args.pairs_on}"
    existing[key] = record
    write_json_atomically(out, existing)
    print(f"\n{record['command']}  ({record['date']}, rev {record['revision']}, "
          f"{record['machine']['cpu_count']} CPU cores{', ' + record['machine'].get('gpu', '') if 'gpu' in record['machine'] else ''})")
    print(f"2-thread fp32 2048x2048 matmul: {matmul_before['gflops_median']:.0f} GFLOP/s before, "
          f"{matmul_after['gflops_median']:.0f} after; CPU rates scaled to {REFERENCE_GFLOPS:.0f} GFLOP/s in brackets")
    print(f"pairs made with {rows[0]['torch_threads']} intra-op thread(s) (--threads; 1 is the relevant figure on "
          "a shared 2-core machine, where two threads on these small operations can be several times slower)")
    print("| device | pair synthesis (pairs/s) | whole pipeline (pairs/s) | pairs made in |\n|---|---|---|---|")
    for row in rows:
        scaled = row["device"] == "cpu"
        synthesis = f"{row['synthesis_pairs_per_s']:,.0f}" + (
            f" [{row['synthesis_pairs_per_s_at_reference']:,.0f}]" if scaled else "")
        pipeline = f"{row['pipeline_pairs_per_s']:,.0f}" + (
            f" [{row['pipeline_pairs_per_s_at_reference']:,.0f}]" if scaled else "")
        print(f"| {row['device']} | {synthesis} | {pipeline} | {row['pairs_made_on']} |")
    print(f"written to {out}")
    return 0


SEARCH_SIZES = {"tiny": (8, 2), "small": (32, 8), "full": (64, 32)}


def run_search_step(args: argparse.Namespace) -> int:
    import torch

    from cirlab.bench.records import git_revision, machine_description
    from cirlab.bench.search_step import bench_search_step
    from cirlab.utils.run import write_json_atomically

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for device in devices:
        for size in args.sizes.split(","):
            if size not in SEARCH_SIZES:
                raise SystemExit(f"--sizes: unknown size {size!r}; use {', '.join(SEARCH_SIZES)}")
            nf, nb = SEARCH_SIZES[size]
            rows.append({"size": size, **bench_search_step(nf=nf, nb=nb, repeats=args.repeats, device=device)})
    record = {
        "command": "cirlab-bench " + " ".join(args.argv),
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


def run_cost(args: argparse.Namespace) -> int:
    """``cost``: FLOPs and latency of CResMD, TSNet, TASNet and naive sharing (docs in bench/cost.py)."""
    import torch

    from cirlab.bench.cost import (
        CPU_RESOLUTIONS,
        PAPER_RESOLUTIONS,
        bench_cost,
        build_models,
    )
    from cirlab.bench.records import write_cost_outputs
    from cirlab.tasks import parse_resolutions

    device = args.device
    on_gpu = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if args.resolutions:
        try:
            resolutions = parse_resolutions(args.resolutions)
        except ValueError as error:
            raise SystemExit(f"cirlab-bench: {error}") from None
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


def run_sharing(args: argparse.Namespace) -> int:
    """``sharing``: is the derived architecture the same shape over seeds and thread counts?"""

    from cirlab.bench.records import git_revision, machine_description
    from cirlab.bench.sharing import agreement_markdown, markdown, run_study
    from cirlab.utils.run import write_json_atomically

    out = Path(args.out)
    seeds = [int(s) for s in args.seeds.split(",")]
    threads = [int(t) for t in args.threads.split(",")]
    extra = [o for o in args.overrides if o != "--"]
    rows = run_study(str(Path(args.cresmd).resolve()), out, seeds, threads, extra, args.search_extra)
    record = {"command": "cirlab-bench " + " ".join(getattr(args, "argv", None) or sys.argv[1:]),
              "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "revision": git_revision(), "machine": machine_description(), "cresmd_ckpt": args.cresmd,
              "overrides": extra, "search_extra": args.search_extra, "results": rows}
    write_json_atomically(out / "sharing.json", record)
    table = (f"{record['command']} ({record['date']}, rev {record['revision']})\n\n" + markdown(rows, args.title)
             + "\n" + agreement_markdown(rows))
    (out / "sharing.md").write_text(table)
    print(table)
    print(f"written to {out / 'sharing.json'}, {out / 'sharing.md'}")
    return 0


def run_train(args: argparse.Namespace) -> int:
    """``train``: steps/s of each module at paper size, and the projected wall time of the recipes."""
    import torch

    from cirlab.bench.data import REFERENCE_GFLOPS, matmul_gflops, scaled_to_reference
    from cirlab.bench.records import git_revision, machine_description, utc_now
    from cirlab.bench.train import bench_experiment, fastest, markdown, parse_variant, projections, recipes
    from cirlab.utils.run import write_json_atomically

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("cirlab-bench train: --device cuda but torch sees no CUDA device")
    from cirlab.bench.train import DEFAULT_EXPERIMENTS

    experiments = [e.strip() for e in (args.experiments or ",".join(DEFAULT_EXPERIMENTS)).split(",") if e.strip()]
    try:
        variants = [parse_variant(v) for v in args.variants.split(",")]
    except ValueError as error:
        raise SystemExit(f"cirlab-bench train: --variants: {error}") from None
    if args.steps < 1 or args.warmup < 0:
        raise SystemExit(f"cirlab-bench train: --steps {args.steps} must be >= 1 and --warmup {args.warmup} >= 0")
    extra = [o for o in args.overrides if o != "--"]
    on_cpu = device == "cpu"
    revision, date = git_revision(), utc_now()  # what ran: taken before the (long) measurements
    matmul_before = matmul_gflops(threads=2) if on_cpu else None
    results = []
    for experiment in experiments:
        for variant in variants:
            print(f"[bench train] {experiment} {variant['variant']} on {device} ...", flush=True)
            row = bench_experiment(experiment, device=device, steps=args.steps, warmup=args.warmup,
                                   precision=variant["precision"], channels_last=variant["channels_last"],
                                   compile=variant["compile"], num_workers=args.num_workers,
                                   cache_dir=args.cache_dir, extra=extra)
            row["variant"] = variant["variant"]
            print(f"[bench train]   {row['median_s']:.4g} s/step ({row['steps_per_s']:.3g} steps/s)", flush=True)
            results.append(row)
    matmul = None
    if on_cpu:
        matmul_after = matmul_gflops(threads=2)
        gflops = (matmul_before["gflops_median"] + matmul_after["gflops_median"]) / 2
        matmul = {"before": matmul_before, "after": matmul_after, "gflops_used": gflops,
                  "reference_gflops": REFERENCE_GFLOPS}
        for row in results:
            row["steps_per_s_at_reference"] = scaled_to_reference(row["steps_per_s"], gflops)
    best = fastest(results)
    recipe_rows, pipelines = projections({k: r["median_s"] for k, r in best.items()}, recipes(),
                                         {k: r["variant"] for k, r in best.items()})
    command = "cirlab-bench " + " ".join(getattr(args, "argv", None) or sys.argv[1:])
    record = {"command": command, "date": date, "revision": revision, "machine": machine_description(),
              "device": device, "matmul": matmul, "results": results, "recipes": recipe_rows, "pipelines": pipelines,
              "note": "CPU timings on a shared machine are loaded; compare CPU rates at the reference matmul speed"
                      if on_cpu else ""}
    out = Path(args.out)
    existing = json.loads(out.read_text()) if out.exists() else {}
    key = f"{record['machine']['host']}/{device}/{args.variants}/{','.join(experiments)}" + (
        f"/{' '.join(extra)}" if extra else "")
    existing[key] = record
    write_json_atomically(out, existing)
    reference = ""
    if matmul:
        reference = (f" (CPU: 2-thread fp32 2048x2048 matmul {matmul_before['gflops_median']:.0f} GFLOP/s before, "
                     f"{matmul['after']['gflops_median']:.0f} after; reference {REFERENCE_GFLOPS:.0f})")
    print(f"\n{command}  ({record['date']}, rev {record['revision']}, {record['machine']['cpu_count']} CPU cores"
          f"{', ' + record['machine']['gpu'] if 'gpu' in record['machine'] else ''})")
    if extra:
        print(f"NOT the paper recipes as they stand: every job ran with the overrides {' '.join(extra)}")
    print(markdown(results, recipe_rows, pipelines, reference))
    print(f"written to {out} (key {key})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The command line of `cirlab bench` (no torch import)."""
    parser = argparse.ArgumentParser(prog="cirlab-bench", description=__doc__.split("\n\n")[0].split(": ", 1)[1])
    sub = parser.add_subparsers(dest="what", required=True)
    data = sub.add_parser("data", help="training-pipeline throughput (pairs/s)")
    data.add_argument("--seconds", type=float, default=10.0, help="timed seconds per measurement")
    data.add_argument("--num-workers", type=int, default=2, help="DataLoader workers for the whole-pipeline figure")
    data.add_argument("--pairs-on", choices=("auto", "workers", "device"), default="auto",
                      help="where the whole pipeline makes the pairs (data.pairs_on): auto = the workers on the CPU "
                           "when --num-workers > 0, else the device")
    data.add_argument("--threads", type=int, default=None,
                      help="torch intra-op threads while pairs are made (default: torch's setting, e.g. OMP_NUM_THREADS)")
    data.add_argument("--out", default="docs/bench/data.json", help="JSON file the figures are merged into")
    data.set_defaults(func=run_data)
    search = sub.add_parser("search-step", help="TASNet search step vs plain CResMD step")
    search.add_argument("--sizes", default="tiny,full", help="comma list of tiny, small, full")
    search.add_argument("--repeats", type=int, default=7, help="timed steps per variant (median reported)")
    search.add_argument("--out", default="docs/bench/search_step.json", help="JSON file the figures are merged into")
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
                      help="Table 4's naive-sharing variants by their label (0.31, 0.62, 0.99: the first 24, 48, 67 "
                      "maps at nb 32, FLOPs as the paper's), one model each ('none': no such models)")
    cost.add_argument("--nf", type=int, default=64, help="width of the random CResMD (no checkpoint given) and of "
                      "the synthetic TASNet")
    cost.add_argument("--nb", type=int, default=32, help="blocks of the random CResMD (no checkpoint given) and of "
                      "the synthetic TASNet")
    cost.add_argument("--out", default="docs/bench/cost/", help="folder for cost.json, cost.md, flops_per_task.png")
    cost.set_defaults(func=run_cost)
    sharing = sub.add_parser("sharing", help="the embedded pipeline's derived architecture over seeds and threads")
    sharing.add_argument("--cresmd", required=True, help="the CResMD checkpoint every search starts from")
    sharing.add_argument("--seeds", default="1234,1,2", help="comma list of pipeline seeds")
    sharing.add_argument("--threads", default="1,2", help="comma list of torch thread counts")
    sharing.add_argument("--out", default="logs/sharing", help="folder of the runs, sharing.json and sharing.md (under logs/ with the other runs)")
    sharing.add_argument("--title", default="Sharing decision over seeds and threads", help="heading of the table")
    sharing.add_argument("--search-extra", default="", help="Hydra overrides added to the search stage, one string "
                         "(e.g. 'model.net.decision=batch' for the rule before declared task sets)")
    sharing.add_argument("overrides", nargs="*", help="extra cirlab-pipeline overrides (after --)")
    sharing.set_defaults(func=run_sharing)
    bench_train = sub.add_parser("train", help="training steps/s per module at paper size, projected recipe times")
    bench_train.add_argument("--experiments", default=None,
                             help="comma list of paper experiments to time (default: one per training module: "
                             "cresmd_paper, tasnet_search_paper, tasnet_finetune_paper, hyperres_denoise_paper, hyperres_3d_paper)")
    bench_train.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                             help="auto: CUDA when present, else CPU")
    bench_train.add_argument("--variants", default="fp32", help="comma list of fp32 or bf16, each optionally "
                             "+cl (channels_last) and +compile (torch.compile), e.g. fp32,bf16+cl,bf16+cl+compile")
    bench_train.add_argument("--steps", type=int, default=2, help="timed training steps per variant (median)")
    bench_train.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    bench_train.add_argument("--num-workers", type=int, default=0, help="DataLoader workers cutting crops")
    bench_train.add_argument("--cache-dir", default=None, help="where the embedded photos and the synthetic "
                             "derived TASNet are written (default: a temporary folder per experiment)")
    bench_train.add_argument("--out", default="docs/bench/train.json", help="JSON file the record is merged into")
    bench_train.add_argument("overrides", nargs="*", help="extra Hydra overrides for every job (after --)")
    bench_train.set_defaults(func=run_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Console entry point `cirlab-bench`."""
    args = build_parser().parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
