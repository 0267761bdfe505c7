"""`cirlab hyperres-eval` (`cirlab-hyperres-eval`): PSNR against degradation level, one curve per
HyperRes or dedicated model.

    cirlab hyperres-eval --task denoise --model HyperRes=logs/.../last.ckpt \\
        logs/hyperres_dedicated/multiruns/.../*/checkpoints/last.ckpt

Default test sets per task: denoise on <data-root>/CBSD68 at sigma 5..90, DeJPEG on
<data-root>/LIVE1 at q 10..80, SR on <data-root>/Set5 at x2..x6 (--levels and --data choose
others). A model given as NAME=PATH is labelled NAME; otherwise its task and training levels
label it. torch and the library are imported after the arguments are parsed (quick --help).
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
from collections.abc import Sequence
from pathlib import Path


def parse_levels(text: str | None) -> list[float] | None:
    """``"5:90:5"`` (inclusive range) or ``"5,10,20"``; None keeps the task's sweep."""
    if not text:
        return None
    if ":" in text:
        start, stop, step = (float(v) for v in text.split(":"))
        count = int(round((stop - start) / step)) + 1
        return [start + i * step for i in range(count)]
    return [float(v) for v in text.split(",")]


def build_parser() -> argparse.ArgumentParser:
    """The command line of `cirlab hyperres-eval` (no torch import)."""
    summary, _, rest = __doc__.partition("\n\n")
    parser = argparse.ArgumentParser(prog="cirlab-hyperres-eval",
                                     description=summary.split(": ", 1)[1].replace("\n", " ") + "\n\n" + rest,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True, choices=sorted(("denoise", "dejpeg", "sr")),
                        help="the degradation the models undo: denoise (sigma), dejpeg (quality) or sr (scale)")
    parser.add_argument("--model", action="append", default=[], metavar="[NAME=]CKPT",
                        help="a HyperRes or dedicated checkpoint (repeat; shell globs work)")
    parser.add_argument("models", nargs="*", metavar="CKPT", help="more checkpoints")
    parser.add_argument("--data", help="folder of clean test images (default: <data-root>/<task's test set>)")
    parser.add_argument("--data-root", default="data", help="default: data")
    parser.add_argument("--levels", help="'5:90:5' (inclusive) or '5,10,20'; default: the task's sweep")
    parser.add_argument("--channel", choices=("rgb", "y", "y_rounded"),
                        help="default: rgb for denoise, y_rounded (Y rounded as MATLAB on uint8) for dejpeg and sr")
    parser.add_argument("--max-images", type=int, help="score only the first N images (default: all)")
    parser.add_argument("--crop", type=int, help="centre crop (pixels) of each image; default: whole images")
    parser.add_argument("--seed", type=int, default=0, help="seed of the degradation noise (default 0)")
    parser.add_argument("--chunk", type=int, default=6, help="levels per forward pass (default 6)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available, else cpu)")
    parser.add_argument("--out", help="output folder (default: logs/hyperres_eval/<task>_<date>_<time>_<id>)")
    parser.add_argument("--show-each-dedicated", action="store_true", help="also draw one curve per dedicated network")
    return parser


def run(argv: Sequence[str] | None = None) -> dict:
    """Parse the command line, score the models, write the outputs; returns the result dict."""
    parser = build_parser()
    args = parser.parse_args(argv)

    import torch

    from cirlab.checkpoints import CheckpointError, read_checkpoint
    from cirlab.data.hyperres import get_task
    from cirlab.evaluation.levels import evaluate_levels, load_level_model, write_outputs
    from cirlab.utils.run import new_run_id

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    specs = [*args.model, *args.models]
    if not specs:
        parser.error("give at least one checkpoint (--model [NAME=]CKPT)")
    task = get_task(args.task)
    folder = Path(args.data) if args.data else Path(args.data_root) / task.test_set
    if not folder.is_dir():
        parser.error(f"--data {folder}: no such folder (put the {task.test_set} images there or pass --data)")
    out = Path(args.out) if args.out else Path("logs") / "hyperres_eval" / f"{args.task}_{dt.datetime.now():%Y-%m-%d_%H-%M-%S}_{new_run_id()}"
    try:  # every checkpoint is read before any is scored; an error names --model and the file
        for spec in specs:
            name, sep, path = spec.partition("=")
            read_checkpoint(path if sep else spec, key="--model", what="HyperRes or dedicated-network checkpoint")
        models = [load_level_model(spec, args.device) for spec in specs]
    except (CheckpointError, FileNotFoundError, ValueError) as error:
        parser.error(f"--model: {error}" if not str(error).startswith("--model") else str(error))
    result = evaluate_levels(models, args.task, folder, parse_levels(args.levels), channel=args.channel, seed=args.seed,
                             max_images=args.max_images, crop=args.crop, device=args.device, chunk=args.chunk)
    paths = write_outputs(result, out, args.show_each_dedicated)
    print((out / "levels.md").read_text())
    print("written:", ", ".join(str(p) for p in paths))
    return result


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point (returns nothing, so a console script exits 0)."""
    logging.basicConfig(level=logging.INFO)
    run(argv)


if __name__ == "__main__":
    main()
