"""`cirlab restore` (`cirlab-restore`): restore one image under several task vectors; writes the
images, a contact sheet and `<stem>_tasks.json`.

torch and the library are imported after the arguments are parsed, so `--help` is quick."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _save_png(picture, path: Path) -> None:
    from cirlab.utils.files import atomic_path

    with atomic_path(path) as tmp:  # a killed run leaves no half-written picture under the real name
        picture.save(tmp, format="PNG")


def restore(*args, **kwargs):
    """`cirlab.inference.restore`, imported when first called (a module-level name tests can replace)."""
    from cirlab.inference import restore as restore_images

    return restore_images(*args, **kwargs)


def _device(name: str | None):
    """``--device`` as a torch device (default: cuda if available), or ``ValueError`` naming it."""
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device={name!r} is not a device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device={name!r}: no CUDA device is available here")
    return device


def build_parser() -> argparse.ArgumentParser:
    """The command line of `cirlab restore` (no torch import)."""
    parser = argparse.ArgumentParser(prog="cirlab-restore", description="Restore an image under several task vectors; "
                                     "writes one PNG per task, a contact sheet and <stem>_tasks.json into --out.")
    parser.add_argument("--ckpt", required=True, help="derived TASNet (tasnet.ckpt) or a cirlab CResMD/TASNet module checkpoint")
    parser.add_argument("--image", required=True, help="input image (8-bit RGB)")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--tasks", help="task vectors 'blur,noise,jpeg;...' in [0, 1], e.g. '0,0.3,0;1,1,0'")
    which.add_argument("--grid", help="a named task grid: cresmd27 or single")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--tile", type=int, default=None, help="tile side in pixels (default: whole image)")
    parser.add_argument("--overlap", type=int, default=None, help="context per tile side (default: receptive radius)")
    parser.add_argument("--autocast", choices=["bf16", "fp16"], default=None, help="mixed precision")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--max-batch", type=int, default=None, help="at most this many tasks per pass")
    parser.add_argument("--thumb", type=int, default=256, help="contact sheet thumbnail size in pixels (default 256)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Console entry point ``cirlab-restore``."""
    args = build_parser().parse_args(argv)

    import torch

    from cirlab.checkpoints import load_network
    from cirlab.data.image_files import ImageFolderError, load_image
    from cirlab.figures import contact_sheet, to_pil
    from cirlab.inference import check_restore_options, check_tasks
    from cirlab.tasks import parse_tasks, task_label
    from cirlab.utils.run import write_text_atomically

    try:
        # every option is checked before the network is read or anything restored
        check_restore_options(args.tile, args.overlap, args.max_batch, prefix="--")
        if args.thumb < 16:
            raise ValueError(f"--thumb={args.thumb} must be at least 16 (pixels per contact-sheet thumbnail)")
        out_dir = Path(args.out)
        if out_dir.exists() and not out_dir.is_dir():
            raise ValueError(f"--out={args.out!r} is an existing file; give a folder (it is created if missing)")
        device = _device(args.device)
        image = load_image(args.image, mode="gray_to_rgb").float() / 255
        net = load_network(args.ckpt)
        if args.grid:
            from cirlab.tasks import level_grid

            tasks = level_grid(args.grid)
        else:
            tasks = check_tasks(parse_tasks(args.tasks, net.cond_dim), net.cond_dim, key=f"--tasks {args.tasks!r}")
    except (FileNotFoundError, ValueError, ImageFolderError) as error:
        print(f"cirlab-restore: {error}", file=sys.stderr)
        return 2
    torch.set_flush_denormal(True)  # no effect where unsupported
    net = net.to(device)
    outputs = restore(net, image, tasks, tile=args.tile, overlap=args.overlap, autocast=args.autocast,
                      max_batch=args.max_batch).cpu()

    out_dir.mkdir(parents=True, exist_ok=True)
    stem = Path(args.image).stem
    manifest = []
    for m, (task, output) in enumerate(zip(tasks, outputs)):
        name = f"{stem}_{m:02d}_t" + "_".join(f"{v:.2f}" for v in task.tolist()) + ".png"
        _save_png(to_pil(output), out_dir / name)
        manifest.append({"file": name, "task": [round(v, 6) for v in task.tolist()], "label": task_label(task)})
    sheet = contact_sheet([image, *outputs], ["input", *[task_label(t) for t in tasks]], thumb=args.thumb)
    sheet_path = out_dir / f"{stem}_contact.png"
    _save_png(sheet, sheet_path)
    write_text_atomically(out_dir / f"{stem}_tasks.json", json.dumps({"ckpt": str(args.ckpt), "image": str(args.image),
                                                                      "outputs": manifest}, indent=1) + "\n")
    print(f"{len(manifest)} restored images and the contact sheet {sheet_path} in {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
