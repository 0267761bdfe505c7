"""Result tables written from structured per-task results (never parsed back from metric names).

A test run of a grid (CResMD's 27 task vectors, a HyperRes level sweep) yields a
:class:`PerTaskResult`: one value per grid point and metric, with the grid's task vectors. The
writers turn it into Markdown and CSV files in a run directory, each written atomically.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cirlab.utils.run import write_text_atomically


@dataclass
class PerTaskResult:
    """Per-grid-point means of one evaluation.

    ``labels[i]`` names point i (``r1.0_s15_q80``, ``sigma15``); ``values[metric][i]`` is its
    mean over the images (``psnr``, ``ssim``, ``psnr_input``: the degraded input's own PSNR);
    ``levels`` (G, 3) holds the task vectors of a blur/noise/JPEG grid, None for other grids.
    """

    labels: list[str]
    values: dict[str, list[float]] = field(default_factory=dict)
    levels: torch.Tensor | None = None

    def __post_init__(self) -> None:
        for name, column in self.values.items():
            if len(column) != len(self.labels):
                raise ValueError(f"per-task column {name!r} has {len(column)} values for {len(self.labels)} points")
        if self.levels is not None and tuple(self.levels.shape) != (len(self.labels), 3):
            raise ValueError(f"levels of shape {tuple(self.levels.shape)} for {len(self.labels)} grid points")

    def write_json(self, path: Path) -> Path:
        """The result as JSON (labels, values, task vectors), atomically."""
        from cirlab.utils.run import write_json_atomically

        levels = None if self.levels is None else self.levels.tolist()
        write_json_atomically(Path(path), {"labels": self.labels, "values": self.values, "levels": levels})
        return Path(path)

    @classmethod
    def read_json(cls, path: Path) -> PerTaskResult:
        """A result written by :meth:`write_json`."""
        import json

        data = json.loads(Path(path).read_text())
        levels = None if data.get("levels") is None else torch.tensor(data["levels"], dtype=torch.float32)
        return cls(labels=list(data["labels"]), values={k: list(v) for k, v in data["values"].items()}, levels=levels)

    def rows(self) -> list[dict]:
        """One dict per point: ``label``, the physical levels ``r``, ``sigma``, ``q`` as text
        (empty without task vectors; ``q`` is ``none`` for no JPEG) and every metric."""
        physical = [("", "", "")] * len(self.labels)
        if self.levels is not None:
            from cirlab.tasks import NO_JPEG, task_to_physical

            physical = [(f"{r:.1f}", f"{int(round(sigma))}", "none" if q == NO_JPEG else f"{int(round(q))}")
                        for r, sigma, q in task_to_physical(self.levels.double().cpu()).tolist()]
        return [{"label": label, "r": r, "sigma": sigma, "q": q, **{m: v[i] for m, v in self.values.items()}}
                for i, (label, (r, sigma, q)) in enumerate(zip(self.labels, physical))]


def _task_name(row: dict) -> str:
    return f"r={row['r']}, sigma={row['sigma']}, q={row['q']}" if row["r"] != "" else row["label"]


def write_grid_tables(result: PerTaskResult, averages: dict[str, float], out_dir: Path, stage: str = "test") -> list[Path]:
    """``<stage>_per_task.md`` / ``.csv`` (one row per grid point) and ``<stage>_average.md``
    (every ``<stage>/...`` entry of ``averages``); returns the written paths."""
    out_dir = Path(out_dir)
    names = list(result.values)
    rows = result.rows()
    header = ["task (r, sigma, q)", *[n.upper() for n in names]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    csv = ["label,r,sigma,q," + ",".join(names)]
    for row in rows:
        values = [f"{row[n]:.4f}" for n in names]
        lines.append(f"| {_task_name(row)} | " + " | ".join(values) + " |")
        csv.append(",".join([row["label"], row["r"], row["sigma"], row["q"], *values]))
    per_task_md, per_task_csv = out_dir / f"{stage}_per_task.md", out_dir / f"{stage}_per_task.csv"
    write_text_atomically(per_task_md, "\n".join(lines) + "\n")
    write_text_atomically(per_task_csv, "\n".join(csv) + "\n")

    average = [f"Grid of {len(rows)} task vectors. `{stage}/psnr` and `{stage}/ssim` average the restoration "
               "tasks (points with some degradation); `_all_points` includes the clean point.", "",
               "| metric | value |", "|---|---|"]
    for key in sorted(k for k in averages if k.startswith(f"{stage}/")):
        average.append(f"| {key} | {averages[key]:.4f} |")
    average_md = out_dir / f"{stage}_average.md"
    write_text_atomically(average_md, "\n".join(average) + "\n")
    return [per_task_md, per_task_csv, average_md]


def comparison_table(averages: dict[str, dict[str, float]], results: dict[str, PerTaskResult],
                     flops: dict[str, dict], labels: dict[str, str] | None = None,
                     title: str = "CResMD and TASNet on the same test grid",
                     workload: str = "the whole 27-point workload on one 1280x720 image",
                     resolution: tuple[int, int] = (720, 1280)) -> str:
    """Markdown comparing models scored on the same grid: their averages, then one row per task
    with each model's PSNR, SSIM and GFLOPs (``flops[name]``: ``labels``, ``first_pass`` per task
    and ``total`` of the workload, in FLOPs). ``labels[name]`` says what each model is (e.g. which
    ground truth a CResMD was trained with); the first model is the FLOPs reference, and the
    per-task PSNR differences are the last model's against each other one. ``title``,
    ``workload`` (its description) and ``resolution`` (height, width) describe the FLOPs figures."""
    names = list(averages)
    size = f"{resolution[1]}x{resolution[0]}"
    short = "HD" if tuple(resolution) == (720, 1280) else size
    labels = {name: (labels or {}).get(name, name) for name in names}
    lines = [f"# {title}", "",
             f"Averages over the degraded task vectors (the clean point apart); FLOPs of {workload} "
             "(2 per MAC, convolutions only; TASNet's shared prefix once).", ""]
    if any(labels[name] != name for name in names):
        lines += ["Models: " + "; ".join(f"**{name}** = {labels[name]}" for name in names) + ".", ""]
    tasks = len(results[names[0]].labels)
    lines += [f"| model | PSNR (dB) | SSIM | GFLOPs ({tasks} tasks, {short}) | FLOPs vs " + names[0] + " |",
              "|---|---|---|---|---|"]
    base = flops[names[0]]["total"]
    for name in names:
        m = averages[name]
        total = flops[name]["total"]
        shown = name if labels[name] == name else f"{name}: {labels[name]}"
        lines.append(f"| {shown} | {m.get('test/psnr', float('nan')):.2f} | {m.get('test/ssim', float('nan')):.4f} | "
                     f"{total / 1e9:,.1f} | {100 * total / base:.1f}% |")
    by_label = {name: {row["label"]: row for row in results[name].rows()} for name in names}
    task_labels = results[names[0]].labels
    last, others = names[-1], names[:-1]
    header = ["task (r, sigma, q)"]
    for name in names:
        header += [f"{name} PSNR", f"{name} SSIM", f"{name} GFLOPs"]
    header += [f"PSNR {last} - {name}" for name in others]
    lines += ["", f"Per task (GFLOPs: that task alone, prefix included, at {size}):", "",
              "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    flops_by_label = {name: dict(zip(flops[name]["labels"], flops[name]["first_pass"])) for name in names}
    for label in task_labels:
        cells = [_task_name(by_label[names[0]][label])]
        for name in names:
            row = by_label[name].get(label, {})
            g = flops_by_label[name].get(label)
            cells += [f"{row['psnr']:.2f}" if "psnr" in row else "", f"{row['ssim']:.4f}" if "ssim" in row else "",
                      f"{g / 1e9:.2f}" if g is not None else ""]
        b = by_label[last].get(label, {})
        for name in others:
            a = by_label[name].get(label, {})
            cells.append(f"{b['psnr'] - a['psnr']:+.2f}" if "psnr" in a and "psnr" in b else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


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


def quality_flops_tables(result) -> tuple[str, str]:
    """Markdown and CSV of a protocol's comparison (a :class:`cirlab.evaluation.protocols.
    ProtocolResult`): one row per model with its quality metrics, its FLOPs on the protocol's
    workload, per inference, and relative to the first model."""
    metrics = list(result.metrics)
    names = result.models
    workload = result.workload
    lines = [f"# {result.protocol}: quality and FLOPs", "",
             f"Workload: {workload['text']}. FLOPs: analytic, 2 per multiply-add, convolutions (and HyperRes's "
             "weight generation); TASNet's shared prefix once per image; per inference = workload / "
             f"{workload['tasks']} task vectors.", ""]
    lines += list(result.notes) + ([""] if result.notes else [])
    header = ["model", "kind", *[m.upper() if m in ("psnr", "ssim") else m for m in metrics],
              "GFLOPs (workload)", "GFLOPs / inference", f"FLOPs vs {names[0]}" if names else "FLOPs vs first"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    csv = ["model,kind," + ",".join(metrics) + ",flops,flops_per_inference,flops_ratio"]
    base = result.flops[names[0]] if names else 0
    for name in names:
        values = [float(result.quality[name][m]) for m in metrics]
        flops = int(result.flops[name])
        ratio = flops / base if base else float("nan")
        shown = [f"{v:.2f}" if m.startswith("psnr") else f"{v:.4f}" for m, v in zip(metrics, values)]
        lines.append(f"| {name} | {result.kinds.get(name, '')} | " + " | ".join(shown)
                     + f" | {flops / 1e9:,.3f} | {result.per_inference(name) / 1e9:,.3f} | {100 * ratio:.1f}% |")
        quoted = f'"{name}"' if "," in name or '"' in name else name
        csv.append(f"{quoted},{result.kinds.get(name, '')}," + ",".join(f"{v:.6f}" for v in values)
                   + f",{flops},{result.per_inference(name):.1f},{ratio:.6f}")
    return "\n".join(lines) + "\n", "\n".join(csv) + "\n"
