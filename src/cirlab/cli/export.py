"""``cirlab-export``: a cirlab checkpoint's network as ``<name>.safetensors`` + ``<name>.json``."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    """Console entry point ``cirlab-export``."""
    parser = argparse.ArgumentParser(
        prog="cirlab-export",
        description="Export the network of any cirlab checkpoint (CResMD, TASNet search or fine-tune, derived "
                    "tasnet.ckpt, HyperRes scalar or 3-D, dedicated MainNet) as <name>.safetensors + <name>.json, "
                    "loadable with cirlab.export.load_exported without the training code.")
    parser.add_argument("--ckpt", required=True, help="a cirlab checkpoint: a module checkpoint (checkpoints/*.ckpt) "
                        "or a standalone tasnet.ckpt written by cirlab-derive")
    parser.add_argument("--out", required=True, help="output folder (created if missing)")
    parser.add_argument("--name", help="file name stem of the pair (default: the checkpoint's stem)")
    args = parser.parse_args(argv)
    from cirlab.export import export_checkpoint

    try:
        json_path, weights_path = export_checkpoint(args.ckpt, args.out, args.name)
    except (FileNotFoundError, ValueError) as error:
        print(f"cirlab-export: {error}", file=sys.stderr)
        return 2
    print(f"weights:      {weights_path}")
    print(f"architecture: {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
