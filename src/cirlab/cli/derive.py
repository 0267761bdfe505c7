"""`cirlab derive` (`cirlab-derive`): turn a TASNet search checkpoint into a standalone TASNet (tasnet.ckpt).

torch and the library are imported after the arguments are parsed, so `--help` is quick."""

from __future__ import annotations

import argparse
import sys

#: default (height, width) of the FLOPs summary: cirlab.tasks.HD, written here so that `--help` needs no torch
#: (tests/test_cli.py checks that the two agree)
HD = (720, 1280)


def check_options(args: argparse.Namespace) -> None:
    """``ValueError`` naming the first bad option, before the checkpoint is read or anything derived."""
    from pathlib import Path

    from cirlab.tasks import level_grid

    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ValueError(f"--out={args.out!r} is an existing file; give a folder (it is created if missing)")
    for name, value in (("--height", args.height), ("--width", args.width)):
        if value < 1:
            raise ValueError(f"{name}={value} must be >= 1 (pixels of the FLOPs summary)")
    try:
        level_grid(args.grid)
    except ValueError as error:
        raise ValueError(f"--grid={args.grid!r}: {error}") from None


def build_parser() -> argparse.ArgumentParser:
    """The command line of `cirlab derive` (no torch import)."""
    parser = argparse.ArgumentParser(prog="cirlab-derive", description="Turn a TASNet search checkpoint into a "
                                     "standalone TASNet: tasnet.ckpt, architecture.json and architecture.png in --out.")
    parser.add_argument("--ckpt", required=True, help="TASNetSearch checkpoint (e.g. checkpoints/last.ckpt)")
    parser.add_argument("--out", required=True, help="output folder (tasnet.ckpt, architecture.json, architecture.png)")
    parser.add_argument("--grid", default="cresmd27", help="task grid of the summary (cresmd27 or single)")
    parser.add_argument("--height", type=int, default=HD[0], help=f"image height of the FLOPs summary (default {HD[0]})")
    parser.add_argument("--width", type=int, default=HD[1], help=f"image width of the FLOPs summary (default {HD[1]})")
    parser.add_argument("--no-figure", action="store_true", help="skip architecture.png")
    parser.add_argument("--weights", help="a CResMD checkpoint whose weights the derived architecture takes instead of "
                        "the search's (TASNet-A: the absolute-GT CResMD, then experiment=tasnet_a_paper)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Console entry point ``cirlab-derive``."""
    args = build_parser().parse_args(argv)
    from cirlab.derivation import derive_checkpoint

    try:
        check_options(args)
        result = derive_checkpoint(args.ckpt, args.out, args.grid, args.height, args.width, figure=not args.no_figure,
                                   weights=args.weights)
    except (FileNotFoundError, ValueError) as error:
        print(f"cirlab-derive: {error}", file=sys.stderr)
        return 2
    s = result.summary
    print(f"derived TASNet: {s['shared_maps']}/{s['num_maps']} maps shared, {s['parameters']:,} parameters, "
          f"{s['flops_per_inference'] / 1e9:.2f} GFLOPs per inference on {s['tasks']} tasks at {s['width']}x{s['height']} "
          f"({100 * s['flops_ratio']:.1f}% of CResMD)")
    print(f"checkpoint:   {result.ckpt_path}")
    print(f"architecture: {result.json_path}")
    if result.figure_path:
        print(f"figure:       {result.figure_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
