"""`cirlab compare` (= `make compare`): train CResMD, TASNet and the 3-D HyperRes on the same data at
the same scale and score them side by side (`cirlab.evaluation.recipe`).

    cirlab compare --out logs/compare/run1
    cirlab compare --out logs/compare/run1 --protocols grid   # the grid only
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from cirlab.evaluation.recipe import run_compare


def build_parser() -> argparse.ArgumentParser:
    """The command line of `cirlab compare`."""
    summary, _, examples = __doc__.partition("\n\n")
    summary = summary.split(": ", 1)[1]
    parser = argparse.ArgumentParser(prog="cirlab compare", formatter_class=argparse.RawDescriptionHelpFormatter,
                                     description=summary[:1].upper() + summary[1:] + "\n\n" + examples)
    parser.add_argument("--out", help="run folder (default: logs/compare/<date>_<time>); reusing one keeps finished steps")
    parser.add_argument("--protocols", help="comma-separated protocols of conf/protocol/ (default: grid and blind_*)")
    parser.add_argument("--pipeline", action="append", default=[], metavar="OVERRIDE",
                        help="Hydra override for cirlab-pipeline (repeat)")
    parser.add_argument("--hyperres", action="append", default=[], metavar="OVERRIDE",
                        help="Hydra override for the 3-D HyperRes's cirlab-train (repeat)")
    parser.add_argument("--eval", action="append", default=["data=embedded"], metavar="OVERRIDE",
                        help="Hydra override for every cirlab-eval (repeat; default data=embedded)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point `cirlab compare` (`python -m cirlab.cli.compare`)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    out = Path(args.out) if args.out else Path("logs") / "compare" / f"{dt.datetime.now():%Y-%m-%d_%H-%M-%S}"
    protocols = [p.strip() for p in args.protocols.split(",") if p.strip()] if args.protocols else None
    try:
        result = run_compare(out, protocols=protocols, pipeline_overrides=args.pipeline,
                             hyperres_overrides=args.hyperres, eval_overrides=args.eval)
    except (ValueError, RuntimeError) as error:
        print(f"cirlab-compare: {error}", file=sys.stderr)
        return 2
    print(Path(result["summary"]).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
