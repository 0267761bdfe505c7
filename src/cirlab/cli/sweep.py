"""`cirlab sweep` (`cirlab-sweep`): run (or resume) an Optuna study, or summarize any sweep.

Every argument but `summarize` is a Hydra override of `conf/sweep.yaml`
(`cirlab.sweeps.driver.run_sweep`); `summarize` writes the table and Pareto plot of a study or
multirun (`cirlab.sweeps.summary.write_summary`). Exit status 1: the study stopped short of
`n_trials` (too many failed trials in a row). The driver (torch, Lightning) is imported only when a
study runs, so `--help` is quick.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from cirlab.sweeps.summary import parse_objectives, write_summary

USAGE = """\
usage: cirlab-sweep hparams_search=<study> [hydra overrides of the training config...]
       cirlab-sweep summarize <study.db | storage URL | sweep folder | multirun folder>
                    [--objectives val/psnr:max,model/params_total:min] [--study NAME] [--out DIR]

Runs (or resumes: same command again) the Optuna study of conf/hparams_search/<study>.yaml,
one cirlab-train job per trial, then writes summary.md, summary.csv and pareto.png.
"""


def build_summarize_parser() -> argparse.ArgumentParser:
    """The command line of `cirlab sweep summarize`."""
    parser = argparse.ArgumentParser(prog="cirlab-sweep summarize", description="Summarize a sweep: summary.md, "
                                     "summary.csv and pareto.png of an Optuna study or a Hydra multirun.")
    parser.add_argument("path", help="study .db file, storage URL, sweep folder or Hydra multirun folder")
    parser.add_argument("--objectives", type=parse_objectives, default=None,
                        help="metric:max|min,... (default: the study's; val/psnr:max,model/params_total:min "
                             "for a multirun)")
    parser.add_argument("--study", default=None, help="study name, when the storage holds several")
    parser.add_argument("--out", default=None, help="folder for the summary (default: the sweep folder)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point ``cirlab-sweep``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0
    if argv and argv[0] == "summarize":
        args = build_summarize_parser().parse_args(argv[1:])
        rows, out = write_summary(args.path, args.objectives, study_name=args.study, out_dir=args.out)
        print(f"{len(rows)} rows; sweep summary: {out / 'summary.md'}")
        return 0
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    from cirlab.sweeps.driver import run_sweep

    result = run_sweep(argv)
    return 0 if result.complete else 1


# The trial that OptunaPruning reports to lives in cirlab.sweeps.pruning (imported under its own
# name by the driver), not here, so running this module as __main__ needs no re-import.
if __name__ == "__main__":
    sys.exit(main())
