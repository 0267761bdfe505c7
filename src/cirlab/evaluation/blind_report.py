"""Files and W&B records of a blind-setting study (:mod:`cirlab.evaluation.blind`).

:func:`write_study` writes into the study's own folder, every file atomically:

* ``blind_<study>_per_image.csv``: one row per (image, model, level) (modulation: per step);
* ``blind_<study>_per_image_summary.csv`` (modulation): one row per (image, model) with ``cv``,
  ``total_change``;
* ``blind_<study>.md`` / ``.json``: the config, one row per model and level (means over images)
  and the study's summary numbers per model (with GFLOPs per inference on the study's images);
* ``blind_<study>.png``: the study's measures against the swept level, one curve per model
  (Figure 10);
* ``blind_<study>_strips/<image>.png``: input, the outputs across the swept level, reference
  (Figures 6-8), one row per model (study (a) adds the row of relative ground truths).

:func:`log_to_wandb` sends the tables (``wandb.Table``) and pictures (``wandb.Image``) to the
active W&B run under ``blind_<study>/...``; without an active run it does nothing.
"""

from __future__ import annotations

import csv
import io
import math
import sys
from pathlib import Path

from cirlab.figures import contact_sheet, plot_curves
from cirlab.utils.files import atomic_path
from cirlab.utils.run import write_json_atomically, write_text_atomically

__all__ = ["STATIC_CHANGE", "log_to_wandb", "write_study"]

#: modulation: a total change (RMS on 0..255, summed over the sweep) below this is flagged as "barely modulates"
STATIC_CHANGE = 1.0


def _csv_text(rows: list[dict]) -> str:
    buffer = io.StringIO()
    columns = list(rows[0]) if rows else []
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    return buffer.getvalue()


def _cell(value) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def _markdown(result) -> str:
    cfg = ", ".join(f"{k}={v}" for k, v in result.config.items())
    measures = list(next(iter(result.per_level.values())))
    lines = [f"# {result.title}", "", f"Settings: {cfg}. Images: {len(result.images)} "
             f"({', '.join(result.images[:8])}{', ...' if len(result.images) > 8 else ''}). "
             "Definitions: docs/method.md section 7.", "", "## Per level (mean over images)", "",
             f"| model | {result.level_name} | " + " | ".join(measures) + " |",
             "|---|---|" + "---|" * len(measures)]
    for model in result.models:
        for i, x in enumerate(result.x):
            values = [_cell(result.per_level[model][m][i]) for m in measures]
            lines.append(f"| {model} | {x:g} | " + " | ".join(values) + " |")
    keys = list(next(iter(result.summary.values())))
    lines += ["", "## Summary per model", "", "| model | kind | " + " | ".join(keys) + " |",
              "|---|---|" + "---|" * len(keys)]
    for model in result.models:
        lines.append(f"| {model} | {result.kinds[model]} | "
                     + " | ".join(_cell(result.summary[model][k]) for k in keys) + " |")
    static = [m for m in result.models if result.summary[m].get("total_change", math.inf) < STATIC_CHANGE]
    if static:
        lines += ["", f"Note: {', '.join(static)} moved less than {STATIC_CHANGE:g} grey level (RMS, summed over "
                  "the sweep): the output barely modulates, so its CV describes rounding-level changes, not a "
                  "visible modulation."]
    return "\n".join(lines) + "\n"


def _json(result) -> dict:
    def clean(v):
        return None if isinstance(v, float) and math.isnan(v) else v

    return {
        "study": result.study, "title": result.title, "level_name": result.level_name, "config": result.config,
        "images": result.images, "models": result.models, "kinds": result.kinds, "x": result.x,
        "per_level": {m: {k: [clean(v) for v in vs] for k, vs in t.items()} for m, t in result.per_level.items()},
        "summary": {m: {k: clean(v) for k, v in t.items()} for m, t in result.summary.items()},
    }


def _strip(labels: list[str], rows: dict, path: Path) -> Path:
    images, names = [], []
    for row, pictures in rows.items():
        images += [p.cpu() for p in pictures]
        names += [f"{row}: {labels[0]}"] + labels[1:]
    sheet = contact_sheet(images, names, thumb=160, columns=len(labels))
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
    return path


def write_study(result, out_dir: Path) -> dict[str, Path | list[Path]]:
    """Write the study's files into ``out_dir`` (see the module docstring); returns their paths
    (``strips`` a list) and logs them to the active W&B run."""
    out_dir = Path(out_dir)
    stem = f"blind_{result.study}"
    paths: dict[str, Path | list[Path]] = {}
    paths["per_image"] = out_dir / f"{stem}_per_image.csv"
    write_text_atomically(paths["per_image"], _csv_text(result.rows))
    if result.image_rows:
        paths["per_image_summary"] = out_dir / f"{stem}_per_image_summary.csv"
        write_text_atomically(paths["per_image_summary"], _csv_text(result.image_rows))
    paths["markdown"] = out_dir / f"{stem}.md"
    write_text_atomically(paths["markdown"], _markdown(result))
    paths["json"] = out_dir / f"{stem}.json"
    write_json_atomically(paths["json"], _json(result))
    panels = []
    for measure, label in result.plots:
        curves = {}
        for model in result.models:
            key = next(iter(result.summary[model]))
            curves[f"{model} ({key} {result.summary[model][key]:.3g})"] = result.per_level[model][measure]
        panels.append((label, curves))
    reference = {0: 1.0 / len(result.x)} if result.study == "modulation" else None
    paths["plot"] = plot_curves(result.x, panels, out_dir / f"{stem}.png", result.level_name, result.title, reference)
    paths["strips"] = [_strip(labels, rows, out_dir / f"{stem}_strips" / f"{name}.png")
                       for name, (labels, rows) in result.strips.items()]
    log_to_wandb(result, paths)
    return paths


def log_to_wandb(result, paths: dict) -> bool:
    """Log the per-level and summary tables and the pictures to the active W&B run (keys
    ``blind_<study>/per_level``, ``/summary``, ``/plot``, ``/strip/<image>``); False when no run
    is active (W&B not imported or no ``wandb.run``)."""
    wandb = sys.modules.get("wandb")
    if wandb is None or getattr(wandb, "run", None) is None:
        return False
    data = _json(result)
    measures = list(next(iter(result.per_level.values())))
    per_level = wandb.Table(columns=["model", result.level_name, *measures],
                            data=[[m, x, *[data["per_level"][m][k][i] for k in measures]]
                                  for m in result.models for i, x in enumerate(result.x)])
    keys = list(next(iter(result.summary.values())))
    summary = wandb.Table(columns=["model", "kind", *keys],
                          data=[[m, result.kinds[m], *[data["summary"][m][k] for k in keys]] for m in result.models])
    prefix = f"blind_{result.study}"
    record = {f"{prefix}/per_level": per_level, f"{prefix}/summary": summary,
              f"{prefix}/plot": wandb.Image(str(paths["plot"]))}
    for path in paths["strips"]:
        record[f"{prefix}/strip/{Path(path).stem}"] = wandb.Image(str(path))
    wandb.run.log(record)
    return True
