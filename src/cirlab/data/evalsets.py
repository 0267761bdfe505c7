"""Deterministic validation and test sets, generated once from clean images and cached on disk.

An evaluation set is every clean image of a folder degraded at every point of a level grid
(default: CResMD's 27-point grid, docs/method.md section 1). The target is the clean image and
the task vector is the full input level (absolute ground truth), as in the papers' tables.
:func:`build_eval_set` returns uint8 images (clean ``(3, H, W)``, inputs ``(G, 3, H, W)``) and
the ``(G, 3)`` task-space levels; :class:`EvalSetDataset` serves them as float in ``[0, 1]``.

Generation is deterministic: image ``i`` uses a generator seeded with
``mix_seed(seed, i)``, so two runs (or two machines) score the same inputs. The result is cached
as one file whose name carries a fingerprint of the source files and of every setting, so a
second run reuses it and any change regenerates it. Files are written atomically: no
half-written cache is ever read.

Images of odd size are cropped (bottom/right) to even size, as the networks need
(docs/method.md section 6); an optional centre crop (``crop``: exactly ``crop x crop`` when the
image holds it, else the whole image) keeps validation cheap during training.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset

from cirlab.checkpoints import read_torch_file, save_torch_file
from cirlab.data.image_files import center_crop
from cirlab.data.loading import mix_seed
from cirlab.metrics.conventions import quantize_uint8
from cirlab.tasks import level_grid

FORMAT_VERSION = 1


@dataclass
class EvalSetSpec:
    """What an evaluation set is made of; every field enters the cache fingerprint."""

    folder: str
    grid: str | list = "cresmd27"
    max_images: int | None = None
    crop: int | None = None
    seed: int = 0
    on_bad: str = "error"
    config_key: str = "data.val_dir"
    extra: dict = field(default_factory=dict)


def _fingerprint(spec: EvalSetSpec, paths: list[Path], levels: torch.Tensor) -> str:
    digest = hashlib.sha1()
    meta = {
        "version": FORMAT_VERSION,
        "grid": levels.tolist(),
        "max_images": spec.max_images,
        "crop": spec.crop,
        "seed": spec.seed,
        "files": [(p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in paths],
    }
    digest.update(json.dumps(meta, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def build_eval_set(spec: EvalSetSpec, cache_dir: str | Path | None, progress: bool = True) -> dict:
    """Generate (or load from ``cache_dir``) the evaluation set described by ``spec``.

    Returns a dict with ``names`` (list of str), ``clean`` (list of uint8 (3, H, W)),
    ``inputs`` (list of uint8 (G, 3, H, W), one per image) and ``levels`` ((G, 3) task space).
    """
    from cirlab.data.degradations import degrade
    from cirlab.data.image_files import crop_to_multiple, load_image, scan_folder

    levels = level_grid(spec.grid)
    paths = scan_folder(spec.folder, on_bad=spec.on_bad, config_key=spec.config_key)
    if spec.max_images is not None:
        paths = paths[: spec.max_images]
    key = _fingerprint(spec, paths, levels)
    grid_name = spec.grid if isinstance(spec.grid, str) else f"custom{len(levels)}"
    cache_file = Path(cache_dir) / f"{Path(spec.folder).name}-{grid_name}-{key}.pt" if cache_dir else None
    if cache_file is not None and cache_file.exists():
        return read_torch_file(cache_file, what="evaluation-set cache (delete it to regenerate)")

    from tqdm.auto import tqdm

    clean_images, inputs = [], []
    for index, path in enumerate(tqdm(paths, desc=f"generating {Path(spec.folder).name} x {len(levels)} levels", disable=not progress)):
        image = center_crop(crop_to_multiple(load_image(path), 2), spec.crop, even=False, whole_if_smaller=True)
        clean = image.float().div(255).unsqueeze(0).expand(len(levels), -1, -1, -1).contiguous()
        generator = torch.Generator().manual_seed(mix_seed(spec.seed, index))
        degraded = degrade(clean, levels, generator=generator)
        clean_images.append(image)
        inputs.append(quantize_uint8(degraded))
    data = {"names": [p.name for p in paths], "clean": clean_images, "inputs": inputs, "levels": levels}
    if cache_file is not None:
        save_torch_file(data, cache_file)
    return data


class EvalSetDataset(Dataset):
    """One item per clean image: all its grid points at once.

    Item: ``input`` (G, 3, H, W) float in [0, 1], ``target`` (G, 3, H, W) (the clean image),
    ``task`` (G, 3), ``grid_index`` (G,) long, ``image_index`` (G,) long. Use it with
    ``batch_size=None``; a rank of a distributed run gets whole images, so no sample is
    duplicated or dropped.
    """

    def __init__(self, data: dict) -> None:
        self.names = data["names"]
        self.clean = data["clean"]
        self.inputs = data["inputs"]
        self.levels = data["levels"]

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> dict:
        count = len(self.levels)
        inputs = self.inputs[index].float().div(255)
        target = self.clean[index].float().div(255).unsqueeze(0).expand_as(inputs)
        return {
            "input": inputs,
            "target": target,
            "task": self.levels.clone(),
            "grid_index": torch.arange(count),
            "image_index": torch.full((count,), index, dtype=torch.long),
        }
