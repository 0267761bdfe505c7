"""``cirlab-derive``: turn a TASNet search checkpoint into a standalone TASNet (``tasnet.ckpt``)."""

from __future__ import annotations

import argparse
import sys

from cirlab.derivation import derive_checkpoint
from cirlab.tasks import HD


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


def main(argv: list[str] | None = None) -> int:
    """Console entry point ``cirlab-derive``."""
    parser = argparse.ArgumentParser(prog="cirlab-derive", description=__doc__.split("\n\n")[0].strip("`"))
    parser.add_argument("--ckpt", required=True, help="TASNetSearch checkpoint (e.g. checkpoints/last.ckpt)")
    parser.add_argument("--out", required=True, help="output folder (tasnet.ckpt, architecture.json, architecture.png)")
    parser.add_argument("--grid", default="cresmd27", help="task grid of the summary (cresmd27 or single)")
    parser.add_argument("--height", type=int, default=HD[0], help="image height of the FLOPs summary")
    parser.add_argument("--width", type=int, default=HD[1], help="image width of the FLOPs summary")
    parser.add_argument("--no-figure", action="store_true", help="skip architecture.png")
    parser.add_argument("--weights", help="a CResMD checkpoint whose weights the derived architecture takes instead of "
                        "the search's (TASNet-A: the absolute-GT CResMD, then experiment=tasnet_a_paper)")
    args = parser.parse_args(argv)
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
