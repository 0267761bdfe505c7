"""Result tables of an evaluation grid: one row per task vector, plus the average.

The test step logs ``<stage>_grid/<metric>/<label>`` for every grid point (label e.g.
``r1.0_s15_q80``, ``qnone`` = no JPEG); these functions turn such a metrics dict into
``<stage>_per_task.md`` / ``.csv`` and ``<stage>_average.md`` in a run directory.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from cirlab.utils.run import write_text_atomically

_LABEL = re.compile(r"r(?P<r>[0-9.]+)_s(?P<s>[0-9]+)_q(?P<q>none|[0-9]+)")


def grid_rows(metrics: dict[str, float], stage: str = "test") -> tuple[list[str], list[dict]]:
    """Rows ``{"label", "r", "sigma", "q", <metric>: value}`` in logging order, and the metric names."""
    prefix = f"{stage}_grid/"
    rows: dict[str, dict] = {}
    names: list[str] = []
    for key, value in metrics.items():
        if not key.startswith(prefix):
            continue
        metric, label = key[len(prefix):].split("/", 1)
        if metric not in names:
            names.append(metric)
        match = _LABEL.fullmatch(label)
        row = rows.setdefault(label, {"label": label, "r": match["r"] if match else "", "sigma": match["s"] if match else "",
                                       "q": match["q"] if match else ""})
        row[metric] = value
    return names, list(rows.values())


def write_grid_tables(metrics: dict[str, float], out_dir: Path, stage: str = "test") -> list[Path]:
    """Write the per-task and average tables; returns the written paths (none if no grid metrics)."""
    names, rows = grid_rows(metrics, stage)
    if not rows:
        return []
    out_dir = Path(out_dir)
    header = ["task (r, sigma, q)", *[n.upper() for n in names]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    csv = ["label,r,sigma,q," + ",".join(names)]
    for row in rows:
        values = [f"{row[n]:.4f}" if n in row else "" for n in names]
        lines.append(f"| r={row['r']}, sigma={row['sigma']}, q={row['q']} | " + " | ".join(values) + " |")
        csv.append(",".join([row["label"], row["r"], row["sigma"], row["q"], *values]))
    per_task_md, per_task_csv = out_dir / f"{stage}_per_task.md", out_dir / f"{stage}_per_task.csv"
    write_text_atomically(per_task_md, "\n".join(lines) + "\n")
    write_text_atomically(per_task_csv, "\n".join(csv) + "\n")

    average = [f"Grid of {len(rows)} task vectors. `{stage}/psnr` and `{stage}/ssim` average the restoration "
               "tasks (points with some degradation); `_all_points` includes the clean point.", "",
               "| metric | value |", "|---|---|"]
    for key in sorted(k for k in metrics if k.startswith(f"{stage}/")):
        average.append(f"| {key} | {metrics[key]:.4f} |")
    average_md = out_dir / f"{stage}_average.md"
    write_text_atomically(average_md, "\n".join(average) + "\n")
    return [per_task_md, per_task_csv, average_md]


def write_level_tables(out_dir: Path, stem: str, levels: Sequence[float], columns: dict[str, Sequence[float]],
                       title: str = "") -> list[Path]:
    """``<stem>.md`` and ``<stem>.csv``: one row per level, one column per entry of ``columns``."""
    out_dir = Path(out_dir)
    names = list(columns)
    lines = ([f"{title}", ""] if title else []) + ["| level | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    csv = ["level," + ",".join(f'"{n}"' if "," in n else n for n in names)]
    for i, level in enumerate(levels):
        values = [f"{float(columns[n][i]):.4f}" for n in names]
        lines.append(f"| {float(level):g} | " + " | ".join(v if v != "nan" else "" for v in values) + " |")
        csv.append(f"{float(level):g}," + ",".join(values))
    md, csv_path = out_dir / f"{stem}.md", out_dir / f"{stem}.csv"
    write_text_atomically(md, "\n".join(lines) + "\n")
    write_text_atomically(csv_path, "\n".join(csv) + "\n")
    return [md, csv_path]
