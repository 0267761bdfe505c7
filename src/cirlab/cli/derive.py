"""``cirlab-derive``: turn a TASNet search checkpoint into a standalone TASNet (``tasnet.ckpt``)."""

from __future__ import annotations

import argparse
import sys

from cirlab.derivation import derive_checkpoint
from cirlab.tasks import HD


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
