"""Restore one image under many task vectors (TASNet Fig. 2b), in tiles and mixed precision if
asked, and the ``cirlab-restore`` command.

    from cirlab.restore import load_network, restore
    net = load_network("derived/tasnet.ckpt")            # or a cirlab CResMD / fine-tune checkpoint
    outputs = restore(net, image, tasks)                   # image (3, H, W) or (1, 3, H, W) in [0, 1],
                                                           # tasks (M, 3) -> (M, 3, H, W), not clamped
    outputs = restore(net, image, tasks, tile=512, autocast="bf16")

    cirlab-restore --ckpt derived/tasnet.ckpt --image in.png --tasks "0,0.3,0;1,1,0" --out restored/
    cirlab-restore --ckpt derived/tasnet.ckpt --image in.png --grid cresmd27 --out restored/ --tile 512

Networks. A :class:`~cirlab.models.tasnet.TASNet` runs its shared prefix once per image (per
tile when tiled) and its task-specific part per group of tasks with identical channels, batched
(:meth:`TASNet.restore`). A :class:`~cirlab.models.cresmd.CResMDNet` has nothing shared: it runs
whole once per task, batched ``max_batch`` tasks at a time (the baseline of the cost benchmark).

Tiles. ``tile`` is the side of the output block each pass writes; each pass reads that block
plus ``overlap`` pixels on every side that is not the image border and keeps only the block.
Every output pixel of these networks depends on input pixels at most
``receptive_radius = 4 nb + 6`` away (134 for nb = 32; :func:`cirlab.models.tasnet.receptive_radius`),
so with the default ``overlap`` (that radius, rounded up to even) the tiled output equals the
untiled one up to float rounding: zero padding at a tile's cut edge never reaches a kept pixel.
Tile origins and sizes are even, so the stride-2 ``conv_first`` sees the same pixel grid as
the untiled pass (odd images are padded, replicate, to even size first, as the networks do).
A smaller overlap trades exactness near tile seams for less recomputation.

Mixed precision. ``autocast="bf16"`` or ``"fp16"`` runs under ``torch.autocast`` on the
network's device (fp16 is meant for CUDA; bf16 also works on CPU). Channel decisions are always
taken in float32; outputs are returned as float32.

Speed on CPU. The sliced layers have few channels; oneDNN runs such convolutions about twice as
fast in NHWC as in NCHW, so ``restore`` uses ``channels_last`` on CPU by default (for CResMD too,
which gains as well). Images given as views of HWC arrays and CResMD's per-task batches get
channels_last strides that oneDNN recognises (otherwise it runs the whole network in NCHW).
Denormal floats slow x86 convolutions down by an order of magnitude; untrained or heavily
pruned networks produce them, so timings (and ``cirlab-restore``) should run with
``torch.set_flush_denormal(True)``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import Tensor, nn

from cirlab.models.cresmd import CResMDNet
from cirlab.models.tasnet import FORMAT, TASNet, _pad_even, receptive_radius

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


# --------------------------------------------------------------------------- loading
def load_network(source: str | Path | nn.Module, map_location: str | torch.device = "cpu") -> nn.Module:
    """A restorable network (TASNet or CResMDNet) from a standalone TASNet checkpoint
    (``cirlab-derive``), any cirlab LightningModule checkpoint whose ``net`` is one of them
    (``TASNetFinetune``, ``CResMD``), a LightningModule, or the network itself. A network read
    from a file is put in eval mode; a module passed in is left as it is (restoring does not
    depend on the mode: TASNet.restore always runs sliced, CResMD has no mode-dependent layer)."""
    if isinstance(source, nn.Module):
        net = getattr(source, "net", source)
        loaded = False
    else:
        loaded = True
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such checkpoint")
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
        if checkpoint.get("format") == FORMAT:
            net = TASNet.from_checkpoint(checkpoint)
        elif checkpoint.get("cirlab_module"):
            from cirlab.eval import load_module

            net = load_module(path).net
        else:
            raise ValueError(f"{path} is neither a derived TASNet checkpoint nor a cirlab module checkpoint")
    if not isinstance(net, (TASNet, CResMDNet)):
        hint = " (a search network: run cirlab-derive first)" if type(net).__name__ == "TASNetSearchNet" else ""
        raise ValueError(f"restore needs a TASNet or a CResMDNet, got {type(net).__name__}{hint}")
    return net.eval() if loaded else net


# --------------------------------------------------------------------------- restoring
def _restore_whole(net: nn.Module, image: Tensor, tasks: Tensor, max_batch: int | None) -> Tensor:
    """Untiled: image (1, 3, H, W), tasks (M, 3) -> (M, 3, H, W) on the network's device."""
    if isinstance(net, TASNet):
        return net.restore(image, tasks, max_batch=max_batch)
    count = tasks.shape[0]
    nhwc = image.is_contiguous(memory_format=torch.channels_last) and not image.is_contiguous()

    def batch(size: int) -> Tensor:  # an expanded batch has stride 0: the convs would pick NCHW
        rows = image.expand(size, -1, -1, -1)
        return rows.contiguous(memory_format=torch.channels_last) if nhwc and size > 1 else rows

    outputs = [net(batch(len(chunk)), chunk) for chunk in tasks.split(max_batch or count)]
    return torch.cat(outputs)


def _spans(size: int, tile: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """(read_start, read_stop, keep_start, keep_stop) along one axis of an even ``size``."""
    spans = []
    for start in range(0, size, tile):
        stop = min(start + tile, size)
        spans.append((max(0, start - overlap), min(size, stop + overlap), start, stop))
    return spans


def restore(net: nn.Module | str | Path, image: Tensor, tasks: Tensor, *, tile: int | None = None,
            overlap: int | None = None, autocast: str | None = None, max_batch: int | None = None,
            channels_last: bool | None = None) -> Tensor:
    """Restore one image under M task vectors.

    Args:
        net: a TASNet or CResMDNet (or anything :func:`load_network` takes).
        image: (3, H, W) or (1, 3, H, W), values in [0, 1], any device (tiles move to the
            network's device; the result comes back to the image's device).
        tasks: (M, cond_dim) task vectors.
        tile: side of the output block per pass (rounded up to even); None: one pass.
        overlap: context read around each block (default: the receptive radius; module doc).
        autocast: None, "bf16" or "fp16".
        max_batch: at most this many tasks per batched pass (memory bound).
        channels_last: run in NHWC memory format (default: on CPU, and on GPU under autocast).
            On CPU, oneDNN runs NHWC convolutions of few channels about twice as fast as NCHW
            ones, which is what the sliced task-specific layers are.

    Returns:
        (M, 3, H, W) float32, not clamped.
    """
    net = load_network(net)
    image = image[None] if image.ndim == 3 else image
    if image.ndim != 4 or image.shape[0] != 1:
        raise ValueError(f"restore() takes one image (3, H, W) or (1, 3, H, W), got {tuple(image.shape)}")
    if tasks.ndim == 1:
        tasks = tasks[None]
    device = next(net.parameters()).device
    tasks = tasks.to(device=device, dtype=torch.float32)
    height, width = image.shape[-2:]
    dtype = None
    if autocast is not None:
        if autocast not in AUTOCAST_DTYPES:
            raise ValueError(f"autocast={autocast!r}: use one of {sorted(AUTOCAST_DTYPES)} or None")
        dtype = AUTOCAST_DTYPES[autocast]

    if channels_last is None:
        channels_last = device.type == "cpu" or dtype is not None
    layout = torch.channels_last if channels_last else torch.contiguous_format

    def run(part: Tensor) -> Tensor:
        part = part.to(device=device, dtype=torch.float32).contiguous(memory_format=layout)
        if part.stride(0) != part[0].numel():  # e.g. an HWC array permuted to (3, H, W), then [None]: the
            part = part.clone(memory_format=layout)  # batch stride would make the convs pick NCHW
        context = torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else nullcontext()
        with context:
            return _restore_whole(net, part, tasks, max_batch).float()

    # no_grad, not inference_mode: the network caches index tensors that training may reuse
    with torch.no_grad():
        if tile is None or (tile >= height and tile >= width):
            return run(image).to(image.device).contiguous()
        if tile < 2:
            raise ValueError(f"tile={tile} must be >= 2")
        tile = tile + tile % 2
        if overlap is None:
            overlap = receptive_radius(net.nb)
        if overlap < 0:
            raise ValueError(f"overlap={overlap} must be >= 0")
        overlap = overlap + overlap % 2
        padded = _pad_even(image)
        out = torch.empty(tasks.shape[0], image.shape[1], *padded.shape[-2:], device=image.device)
        for r0, r1, k0, k1 in _spans(padded.shape[-2], tile, overlap):
            for c0, c1, j0, j1 in _spans(padded.shape[-1], tile, overlap):
                result = run(padded[..., r0:r1, c0:c1])
                out[..., k0:k1, j0:j1] = result[..., k0 - r0 : k1 - r0, j0 - c0 : j1 - c0].to(image.device)
        return out[..., :height, :width]


def restore_flops(net: nn.Module, tasks: Tensor, height: int, width: int) -> int:
    """Analytic convolution FLOPs of an untiled :func:`restore` (TASNet: :meth:`TASNet.flops`;
    CResMD: M full inferences)."""
    from cirlab.models.flops import cresmd_flops

    net = load_network(net)
    if isinstance(net, TASNet):
        return net.flops(tasks, height, width)
    return cresmd_flops(net.nf, net.nb, height, width, tasks=tasks.shape[0], in_channels=net.in_nc, out_channels=net.out_nc)


# --------------------------------------------------------------------------- command line
def parse_tasks(text: str, cond_dim: int = 3) -> Tensor:
    """``"0,0.3,0;1,1,0"`` -> (2, 3) tensor (rows by ``;``, values by ``,``, each in [0, 1])."""
    rows = [row for row in (part.strip() for part in text.split(";")) if row]
    try:
        values = [[float(v) for v in row.split(",")] for row in rows]
    except ValueError:
        raise ValueError(f"--tasks {text!r}: expected numbers like '0,0.3,0;1,1,0'") from None
    if not values or any(len(row) != cond_dim for row in values):
        raise ValueError(f"--tasks {text!r}: every task vector needs {cond_dim} values")
    tasks = torch.tensor(values, dtype=torch.float32)
    if (tasks < 0).any() or (tasks > 1).any():
        raise ValueError(f"--tasks {text!r}: values must lie in [0, 1]")
    return tasks


def task_label(task: Tensor) -> str:
    """``t=(0.25,0.30,0.00)`` plus the physical levels, e.g. ``r1.0 s15 qnone``."""
    values = "t=(" + ",".join(f"{v:.2f}" for v in task.tolist()) + ")"
    if task.numel() != 3:
        return values
    from cirlab.data.evalsets import grid_labels

    return f"{values} {grid_labels(task[None])[0].replace('_', ' ')}"


def _to_pil(image: Tensor):
    from PIL import Image

    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


def contact_sheet(images: list[Tensor], labels: list[str], thumb: int = 256, columns: int | None = None):
    """A PIL image: thumbnails (longest side ``thumb``) in a grid, each with its label below."""
    from PIL import Image, ImageDraw, ImageFont

    columns = columns or min(len(images), max(1, math.ceil(math.sqrt(len(images)))))
    rows = math.ceil(len(images) / columns)
    height, width = images[0].shape[-2:]
    scale = min(1.0, thumb / max(height, width))
    tw, th = max(1, round(width * scale)), max(1, round(height * scale))
    try:
        font = ImageFont.load_default(size=12)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    label_h, pad = 18, 4
    sheet = Image.new("RGB", (columns * (tw + pad) + pad, rows * (th + label_h + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (image, label) in enumerate(zip(images, labels)):
        row, col = divmod(i, columns)
        x, y = pad + col * (tw + pad), pad + row * (th + label_h + pad)
        sheet.paste(_to_pil(image).resize((tw, th)), (x, y))
        draw.text((x, y + th + 2), label, fill="black", font=font)
    return sheet


def main(argv: list[str] | None = None) -> int:
    """Console entry point ``cirlab-restore``."""
    parser = argparse.ArgumentParser(prog="cirlab-restore", description="Restore an image under several task vectors.")
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
    parser.add_argument("--thumb", type=int, default=256, help="contact sheet thumbnail size")
    args = parser.parse_args(argv)

    from cirlab.data.images import ImageFolderError, load_image

    try:
        net = load_network(args.ckpt)
        if args.grid:
            from cirlab.data.evalsets import level_grid

            tasks = level_grid(args.grid)
        else:
            tasks = parse_tasks(args.tasks, net.cond_dim)
        image = load_image(args.image, mode="gray_to_rgb").float() / 255
    except (FileNotFoundError, ValueError, ImageFolderError) as error:
        print(f"cirlab-restore: {error}", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.set_flush_denormal(True)  # no effect where unsupported
    net = net.to(device)
    outputs = restore(net, image, tasks, tile=args.tile, overlap=args.overlap, autocast=args.autocast,
                      max_batch=args.max_batch).cpu()

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = Path(args.image).stem
    manifest = []
    for m, (task, output) in enumerate(zip(tasks, outputs)):
        name = f"{stem}_{m:02d}_t" + "_".join(f"{v:.2f}" for v in task.tolist()) + ".png"
        _to_pil(output).save(out_dir / name)
        manifest.append({"file": name, "task": [round(v, 6) for v in task.tolist()], "label": task_label(task)})
    sheet = contact_sheet([image, *outputs], ["input", *[task_label(t) for t in tasks]], thumb=args.thumb)
    sheet_path = out_dir / f"{stem}_contact.png"
    sheet.save(sheet_path)
    (out_dir / f"{stem}_tasks.json").write_text(json.dumps({"ckpt": str(args.ckpt), "image": str(args.image),
                                                            "outputs": manifest}, indent=1) + "\n")
    print(f"{len(manifest)} restored images and the contact sheet {sheet_path} in {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
