"""Sweep summaries: one table per study or Hydra multirun, its Pareto front, and ``pareto.png``.

:func:`write_summary` (and :func:`summarize`, its rows only) reads an Optuna study (a ``.db``
file, a ``*.journal`` file, a storage URL, or the driver's sweep folder holding ``study.json``) or a ``cirlab-train -m``
multirun folder (each job's ``.hydra/overrides.yaml`` and ``metrics.json``) and writes
``summary.md``, ``summary.csv`` and ``pareto.png`` (:data:`SUMMARY_FILES`). Only COMPLETE
trials/jobs with every objective take part in the front; ties are all on it.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from omegaconf import OmegaConf

from cirlab.sweeps.spec import normalize_direction
from cirlab.sweeps.storage import JOURNAL_PREFIX, JOURNAL_SUFFIX, STUDY_POINTER, load_study, masked_url
from cirlab.utils.files import atomic_path
from cirlab.utils.run import write_text_atomically

# metrics shown in every summary when a run produced them (besides the objectives)
SUMMARY_METRICS = ("val/psnr", "search/gflops_27_hd", "search/shared_maps")
# objectives of a Hydra multirun summary when --objectives is not given
DEFAULT_MULTIRUN_OBJECTIVES = (("val/psnr", "maximize"), ("model/params_total", "minimize"))
SUMMARY_FILES = ("summary.md", "summary.csv", "pareto.png")


def pareto_front(points: Sequence[Sequence[float | None]], directions: Sequence[str]) -> list[int]:
    """Indices (ascending) of the points that no other point dominates.

    ``a`` dominates ``b`` when it is at least as good in every objective and strictly better in
    one, so equal points never dominate each other (ties are all on the front). Points with a
    missing or NaN coordinate take no part.
    """
    signs = [1.0 if normalize_direction(d) == "maximize" else -1.0 for d in directions]
    scored: dict[int, tuple[float, ...]] = {}
    for index, point in enumerate(points):
        if len(point) != len(signs):
            raise ValueError(f"point {index} has {len(point)} values for {len(signs)} directions")
        if all(v is not None and not math.isnan(float(v)) for v in point):
            scored[index] = tuple(s * float(v) for s, v in zip(signs, point))

    def dominates(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
        return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))

    return [i for i, p in scored.items() if not any(dominates(q, p) for j, q in scored.items() if j != i)]


@dataclass
class _Table:
    title: str
    source: str
    id_column: str
    swept: list[str]
    objectives: list[tuple[str, str]]
    rows: list[dict]


def _study_table(study: optuna.Study, objectives: list[tuple[str, str]] | None, source: str) -> _Table:
    names = study.metric_names or [f"objective_{i}" for i in range(len(study.directions))]
    own = [(name, d.name.lower()) for name, d in zip(names, study.directions)]
    trials = study.get_trials(deepcopy=False)
    swept: list[str] = []
    for trial in trials:
        swept += [name for name in trial.params if name not in swept]
    rows = []
    for trial in trials:
        metrics = dict(trial.user_attrs.get("metrics") or {})
        if trial.values is not None:
            metrics.update({name: value for (name, _), value in zip(own, trial.values)})
        rows.append({"trial": trial.number, "state": trial.state.name,
                     **{name: trial.params.get(name) for name in swept}, "_metrics": metrics,
                     "run_dir": trial.user_attrs.get("run_dir", ""),
                     "note": trial.user_attrs.get("fail_reason") or trial.user_attrs.get("pruned_reason") or ""})
    return _Table(f"study {study.study_name}", source, "trial", swept, objectives or own, rows)


def _parse_override(text: str) -> tuple[str, str]:
    key, _, value = str(text).partition("=")
    return key.lstrip("+~"), value


def _multirun_table(folder: Path, objectives: list[tuple[str, str]] | None) -> _Table:
    jobs = [p for p in folder.iterdir() if (p / ".hydra" / "overrides.yaml").is_file()]
    jobs.sort(key=lambda p: (0, int(p.name), "") if p.name.isdigit() else (1, 0, p.name))
    if not jobs:
        raise FileNotFoundError(f"{folder}: neither a study ({STUDY_POINTER}, .db) nor a multirun folder "
                                "(job folders with .hydra/overrides.yaml)")
    job_overrides = [dict(_parse_override(o) for o in OmegaConf.load(job / ".hydra" / "overrides.yaml")) for job in jobs]
    keys: list[str] = []
    for overrides in job_overrides:
        keys += [k for k in overrides if k not in keys]
    swept = {k for k in keys if len({o.get(k) for o in job_overrides}) > 1}
    multirun = folder / "multirun.yaml"
    if multirun.is_file():  # a sweep of one value per key still names its swept keys here
        hydra_node = OmegaConf.load(multirun).get("hydra") or {}
        swept |= set((hydra_node.get("sweeper") or {}).get("params") or {})
        sweep_syntax = re.compile(r",|^(range|choice|glob|interval)\(")
        swept |= {k for k, v in map(_parse_override, (hydra_node.get("overrides") or {}).get("task") or [])
                  if sweep_syntax.search(v)}
    swept_keys = [k for k in keys if k in swept]
    rows = []
    for job, overrides in zip(jobs, job_overrides):
        metrics_file = job / "metrics.json"
        metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
        rows.append({"job": job.name, "state": "COMPLETE" if metrics_file.is_file() else "NO_METRICS",
                     **{k: overrides.get(k) for k in swept_keys}, "_metrics": metrics, "run_dir": str(job), "note": ""})
    return _Table(f"multirun {folder.name}", str(folder), "job", swept_keys,
                  objectives or list(DEFAULT_MULTIRUN_OBJECTIVES), rows)


def _finalize_rows(table: _Table) -> list[dict]:
    """Plain rows: id, state, swept values, objectives, extra metrics, pareto, run_dir, note."""
    objective_names = [m for m, _ in table.objectives]
    extras = [m for m in SUMMARY_METRICS if m not in objective_names and any(m in r["_metrics"] for r in table.rows)]
    points = []
    for row in table.rows:
        usable = row["state"] == "COMPLETE"
        points.append([row["_metrics"].get(m) if usable else None for m in objective_names])
    front = set(pareto_front(points, [d for _, d in table.objectives]))
    rows = []
    for index, row in enumerate(table.rows):
        metrics = row["_metrics"]
        rows.append({
            table.id_column: row[table.id_column], "state": row["state"],
            **{k: row.get(k) for k in table.swept},
            **{m: metrics.get(m) for m in objective_names},
            **{m: metrics.get(m) for m in extras},
            "pareto": index in front, "run_dir": row["run_dir"], "note": row["note"],
        })
    return rows


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _markdown(table: _Table, rows: list[dict]) -> str:
    states: dict[str, int] = {}
    for row in rows:
        states[row["state"]] = states.get(row["state"], 0) + 1
    front = [str(r[table.id_column]) for r in rows if r["pareto"]]
    lines = [f"# Sweep summary: {table.title}", "",
             f"- source: `{table.source}`",
             "- objectives: " + ", ".join(f"`{m}` ({d})" for m, d in table.objectives),
             f"- {table.id_column}s: {len(rows)} (" + ", ".join(f"{s} {n}" for s, n in sorted(states.items())) + ")",
             f"- Pareto front ({table.id_column}s): {', '.join(front) or 'none'}", ""]
    columns = [c for c in (rows[0] if rows else {table.id_column: 0, "state": 0})
               if c != "run_dir" and not (c == "note" and not any(r["note"] for r in rows))]
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "---|" * len(columns))
    for row in rows:
        cells = [_cell(row[c]) for c in columns]
        cells = [c if len(c) <= 120 else c[:117] + "..." for c in cells]
        lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return buffer.getvalue()


def _axis_label(metric: str, direction: str) -> str:
    return f"{metric} ({direction}: {'higher' if direction == 'maximize' else 'lower'} is better)"


def _plot(table: _Table, rows: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator, ScalarFormatter

    names = [m for m, _ in table.objectives]
    complete = [r for r in rows if r["state"] == "COMPLETE" and all(r[m] is not None for m in names)]
    figure = Figure(figsize=(7, 5), layout="constrained")
    ax = figure.add_subplot()
    ident = table.id_column
    if len(names) == 1:  # one objective: value per trial/job, the best marked
        xs = [r[ident] if isinstance(r[ident], int) else i for i, r in enumerate(complete)]
        ax.scatter(xs, [r[names[0]] for r in complete], color="tab:blue", label=f"{ident}s")
        best = [(x, r) for x, r in zip(xs, complete) if r["pareto"]]
        ax.scatter([x for x, _ in best], [r[names[0]] for _, r in best], color="tab:red", s=80, label="best")
        for x, r in best:
            ax.annotate(f"#{r[ident]}", (x, r[names[0]]), textcoords="offset points", xytext=(5, 5))
        ax.set_xlabel(ident)
        ax.set_ylabel(_axis_label(*table.objectives[0]))
    else:
        (mx, dx), (my, dy) = table.objectives[:2]
        others = [r for r in complete if not r["pareto"]]
        front = sorted((r for r in complete if r["pareto"]), key=lambda r: r[mx])
        ax.scatter([r[mx] for r in others], [r[my] for r in others], color="tab:blue", alpha=0.7, label=f"{ident}s")
        ax.plot([r[mx] for r in front], [r[my] for r in front], "o--", color="tab:red", label="Pareto front")
        labels: dict[tuple[float, float], list[str]] = {}  # equal points share one label
        for r in front:
            labels.setdefault((r[mx], r[my]), []).append(f"#{r[ident]}")
        for xy, ids in labels.items():
            ax.annotate(", ".join(ids), xy, textcoords="offset points", xytext=(5, 5))
        ax.set_xlabel(_axis_label(mx, dx))
        ax.set_ylabel(_axis_label(my, dy))
        if len(names) > 2:
            ax.set_title("front over all objectives: " + ", ".join(names), fontsize=8)
    if not complete:
        ax.text(0.5, 0.5, f"no complete {ident} with every objective yet", ha="center", va="center",
                transform=ax.transAxes)
    else:
        ax.legend()
    ax.grid(alpha=0.3)
    for axis in (ax.xaxis, ax.yaxis):  # plain numbers (no "+2.34e1" offsets), whole trial numbers
        if isinstance(axis.get_major_formatter(), ScalarFormatter):
            axis.get_major_formatter().set_useOffset(False)
    if len(names) == 1:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    figure.suptitle(f"{table.title}: {len(complete)} complete {ident}s")
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120)



def _write_table(table: _Table, out_dir: Path) -> list[dict]:
    rows = _finalize_rows(table)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomically(out_dir / "summary.md", _markdown(table, rows))
    write_text_atomically(out_dir / "summary.csv", _csv(rows))
    _plot(table, rows, out_dir / "pareto.png")
    return rows


def summarize_study(study: optuna.Study, out_dir: Path, source: str,
                    objectives: list[tuple[str, str]] | None = None) -> Path:
    """Write the summary of ``study`` (read from storage ``source``) into ``out_dir``; return summary.md."""
    _write_table(_study_table(study, objectives, masked_url(source)), out_dir)
    return out_dir / "summary.md"


def summarize(path: str | Path, objectives: Sequence[tuple[str, str]] | None = None, *,
              study_name: str | None = None, out_dir: str | Path | None = None) -> list[dict]:
    """Summarize a sweep: an Optuna study or a Hydra multirun folder; return one row per trial/job.

    ``path``: a study database file (``*.db``), a storage URL, the driver's sweep folder (it holds
    ``study.json``) or a multirun folder (job folders with ``.hydra/overrides.yaml`` and
    ``metrics.json``). ``objectives``: ``[(metric, maximize|minimize), ...]``; by default the
    study's own, or val/psnr up and model/params_total down for a multirun. Writes
    ``summary.md``, ``summary.csv`` and ``pareto.png`` into the sweep folder (or ``out_dir``).
    Each row: the trial number (``trial``) or job folder name (``job``), ``state``, the swept
    values, each objective, any of ``SUMMARY_METRICS`` present, ``pareto``, ``run_dir``, ``note``
    (why a trial failed or was pruned).
    """
    return write_summary(path, objectives, study_name=study_name, out_dir=out_dir)[0]


def write_summary(path: str | Path, objectives: Sequence[tuple[str, str]] | None = None, *,
                  study_name: str | None = None, out_dir: str | Path | None = None) -> tuple[list[dict], Path]:
    """:func:`summarize`, also returning the folder the summary files were written into.

    A study file or storage URL without ``out_dir`` writes into the sweep folder the driver
    recorded in the study, else next to the file (``<folder>/<study_name>``); a storage URL with
    neither raises ``ValueError``.
    """
    objectives = [(m, normalize_direction(d)) for m, d in objectives] if objectives else None
    text = str(path)
    folder = Path(text)
    if "://" in text or text.startswith(JOURNAL_PREFIX) or folder.is_file():
        if "://" in text or text.startswith(JOURNAL_PREFIX):
            storage = text
        elif folder.suffix == JOURNAL_SUFFIX:
            storage = f"{JOURNAL_PREFIX}{folder.resolve()}"
        else:
            storage = f"sqlite:///{folder.resolve()}"
        study = load_study(storage, study_name)
        if out_dir is None:
            recorded = study.user_attrs.get("sweep_dir")
            if recorded and Path(recorded).is_dir():
                out_dir = recorded
            elif folder.is_file():
                out_dir = folder.parent / study.study_name
            else:
                raise ValueError(f"{text}: say where the summary goes (out_dir / --out)")
        table = _study_table(study, objectives, masked_url(storage))
    elif (folder / STUDY_POINTER).is_file():
        pointer = json.loads((folder / STUDY_POINTER).read_text())
        study = load_study(pointer["storage"], study_name or pointer["study_name"])
        table = _study_table(study, objectives, pointer["storage"])
        out_dir = out_dir or folder
    elif folder.is_dir():
        table = _multirun_table(folder, objectives)
        out_dir = out_dir or folder
    else:
        raise FileNotFoundError(f"{text}: no such study file, storage URL or sweep folder")
    return _write_table(table, Path(out_dir)), Path(out_dir)


def parse_objectives(text: str) -> list[tuple[str, str]]:
    """``val/psnr:max,model/params_total:min`` -> ``[("val/psnr", "maximize"), ...]``."""
    objectives = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        metric, sep, direction = item.rpartition(":")
        if not sep or not metric:
            raise ValueError(f"--objectives: {item!r} must be metric:max or metric:min")
        objectives.append((metric, normalize_direction(direction)))
    return objectives

