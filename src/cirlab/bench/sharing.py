"""How robust is the search's sharing decision? The embedded pipeline over seeds and thread counts.

``cirlab-bench sharing --cresmd <ckpt>`` runs ``cirlab-pipeline
'pipeline.stages=[search,derive,finetune,evaluate]' pipeline.inputs.cresmd_ckpt=<ckpt>`` once per
(seed, torch thread count), each in a fresh process with ``OMP_NUM_THREADS`` and
``pipeline.threads`` set to that count, all from the same CResMD, and collects per run: the
derived shared maps, the FLOPs fraction of CResMD on the 27-point workload at HD, test PSNR of
TASNet and CResMD, and the agreement statistics of the search (per map, over its training steps:
mean, min and max of the agreement ratio of eq. 6 against gamma, and how often eta was 1).

Every run writes the search's per-step metrics with the CSV logger (``trainer.log_every_n_steps=1``);
neither the logger nor the logging interval changes what is computed.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def run_one(cresmd_ckpt: str, seed: int, threads: int, run_dir: Path, extra: list[str], search_extra: str = "") -> dict:
    """One pipeline run (search to evaluate) in a subprocess; returns its collected figures."""
    manifest = run_dir / "pipeline.json"
    if not manifest.is_file():
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        env = {k: v for k, v in env.items() if not k.startswith("WANDB_")}
        command = [sys.executable, "-m", "cirlab.cli.pipeline", "pipeline.stages=[search,derive,finetune,evaluate]",
                   f"pipeline.inputs.cresmd_ckpt={cresmd_ckpt}", f"seed={seed}", f"pipeline.threads={threads}",
                   f"hydra.run.dir={run_dir}", 'pipeline.train_common="logger=csv callbacks.progress_bar.refresh_rate=0"',
                   f'pipeline.search.extra="trainer.log_every_n_steps=1 {search_extra}"', *extra]
        started = time.perf_counter()
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir.parent / f"{run_dir.name}.log", "w") as log:
            done = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            raise RuntimeError(f"pipeline run {run_dir} failed (exit {done.returncode}); see {run_dir.parent / (run_dir.name + '.log')}")
        (run_dir / "wall_seconds.txt").write_text(f"{time.perf_counter() - started:.0f}\n")
    return collect(run_dir, seed, threads)


def agreement_statistics(search_dir: Path) -> dict:
    """Per map, over the search's logged training steps: mean/min/max agreement ratio and the
    fraction of steps with eta = 1 (ratio > gamma), plus the logged shared maps per step."""
    files = sorted(search_dir.glob("csv/version_*/metrics.csv"))
    rows = []
    for path in files:
        with open(path) as handle:
            rows += [r for r in csv.DictReader(handle) if r.get("search/shared_maps") and r.get("train/l1")]
    if not rows:
        return {}
    names = [k for k in rows[0] if k.startswith("agreement/")]
    gamma = _gamma(search_dir)
    maps = {}
    for name in names:
        values = [float(r[name]) for r in rows if r.get(name)]
        maps[name.removeprefix("agreement/")] = {
            "mean": sum(values) / len(values), "min": min(values), "max": max(values), "last": values[-1],
            "eta_fraction": sum(v > gamma for v in values) / len(values)}
    shared = [int(float(r["search/shared_maps"])) for r in rows]
    return {"gamma": gamma, "steps": len(rows), "maps": maps, "shared_maps_per_step": shared}


def _gamma(search_dir: Path) -> float:
    import yaml

    config = yaml.safe_load((search_dir / ".hydra" / "config.yaml").read_text()) if (search_dir / ".hydra" / "config.yaml").is_file() \
        else yaml.safe_load((search_dir / "config.yaml").read_text())
    return float(config["model"]["net"]["gamma"])


def collect(run_dir: Path, seed: int, threads: int) -> dict:
    manifest = json.loads((run_dir / "pipeline.json").read_text())
    stages = manifest["stages"]
    summary = stages["derive"]["products"]["summary"]
    metrics = stages["evaluate"]["products"]["metrics"]
    arch = json.loads(Path(stages["derive"]["products"]["architecture_json"]).read_text())
    specific = [m for m in arch["summary"]["maps"] if not m["shared"]]
    wall = run_dir / "wall_seconds.txt"
    return {"seed": seed, "threads": threads, "torch_threads": manifest.get("torch_threads"), "run_dir": str(run_dir),
            "shared_maps": summary["shared_maps"], "num_maps": summary["num_maps"], "flops_ratio": summary["flops_ratio"],
            "task_specific_channels_mean": (sum(m["channels_mean"] for m in specific) / len(specific)) if specific else None,
            "tasnet_psnr": metrics["TASNet"].get("test/psnr"), "cresmd_psnr": metrics["CResMD"].get("test/psnr"),
            "decision": arch.get("decision"),
            "agreement": agreement_statistics(Path(stages["search"]["products"]["run_dir"])),
            "wall_seconds": float(wall.read_text()) if wall.is_file() else None}


def tasnet_shape(row: dict) -> bool:
    """TASNet's shape: a shared prefix and a task-specific part (neither 0 nor every map shared)."""
    return 0 < row["shared_maps"] < row["num_maps"]


def markdown(rows: list[dict], title: str) -> str:
    lines = [f"### {title}", "", "| seed | threads | shared maps | FLOPs vs CResMD (27 tasks, HD) | task-specific channels "
             "(mean) | TASNet test PSNR (dB) | CResMD test PSNR (dB) | TASNet's shape |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        channels = f"{r['task_specific_channels_mean']:.1f}" if r["task_specific_channels_mean"] is not None else "-"
        lines.append(f"| {r['seed']} | {r['threads']} | {r['shared_maps']}/{r['num_maps']} | {100 * r['flops_ratio']:.1f}% | "
                     f"{channels} | {r['tasnet_psnr']:.2f} | {r['cresmd_psnr']:.2f} | {'yes' if tasnet_shape(r) else 'no'} |")
    return "\n".join(lines) + "\n"


def agreement_markdown(rows: list[dict]) -> str:
    """Per run and map: agreement ratio over the search (mean [min, max]) and eta's frequency."""
    if not rows or not rows[0]["agreement"]:
        return ""
    names = list(rows[0]["agreement"]["maps"])
    gamma = rows[0]["agreement"]["gamma"]
    header = ["map"] + [f"s{r['seed']} t{r['threads']}" for r in rows]
    lines = [f"Agreement ratio of eq. 6 during the search (mean [min-max] over the logged training steps; "
             f"eta = 1 when above gamma = {gamma}; % = fraction of steps with eta = 1):", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in names:
        cells = [name]
        for r in rows:
            m = r["agreement"]["maps"][name]
            cells.append(f"{m['mean']:.2f} [{m['min']:.2f}-{m['max']:.2f}] {100 * m['eta_fraction']:.0f}%")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_study(cresmd_ckpt: str, out: Path, seeds: list[int], threads: list[int], extra: list[str],
              search_extra: str = "") -> list[dict]:
    rows = []
    for seed in seeds:
        for count in threads:
            row = run_one(cresmd_ckpt, seed, count, out / f"seed{seed}_threads{count}", extra, search_extra)
            rows.append(row)
            print(f"seed {seed}, {count} threads: {row['shared_maps']}/{row['num_maps']} shared, "
                  f"{100 * row['flops_ratio']:.1f}% FLOPs, TASNet {row['tasnet_psnr']:.2f} dB", flush=True)
    return rows
