"""Stamping benchmark records with what makes them reproducible: command, date, machine, revision."""

from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
from pathlib import Path

import torch

from cirlab.utils.run import write_json_atomically, write_text_atomically


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


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


def write_cost_outputs(record: dict, out: Path, command: str, notes: list[str], **meta) -> str:
    """Stamp a :func:`cirlab.bench.cost.bench_cost` record (command, date, revision, machine,
    notes, ``meta``) and write ``cost.json``, ``cost.md`` and ``flops_per_task.png`` into
    ``out``; returns the Markdown table."""
    from cirlab.bench.cost import markdown_table, plot_flops_per_task

    record.update({"command": command, "date": utc_now(),
                   "revision": git_revision(), "machine": machine_description(), "notes": notes, **meta})
    write_json_atomically(out / "cost.json", record)
    table = markdown_table(record, notes)
    write_text_atomically(out / "cost.md", table + "\n")
    plot_flops_per_task(record, out / "flops_per_task.png")
    return table
