"""The embedded default data set: colour photographs bundled with scikit-image.

``make train`` must run on a machine without internet and without the project's data, so the
default experiment trains on the RGB photos that ship inside the scikit-image wheel (no
download: they live in ``skimage/data``). They are written once as PNG folders, so the rest of
the pipeline reads them exactly like DIV2K or CBSD68.

Split (fixed, documented): train on six photos, validate and test on two held-out ones.
These images are far too few for research figures; they exist to show the pipeline works.
"""

from __future__ import annotations

from pathlib import Path

from cirlab.utils.files import atomic_path

TRAIN_IMAGES = ("astronaut", "rocket", "hubble_deep_field", "immunohistochemistry", "retina", "motorcycle_left")
HELD_OUT_IMAGES = ("chelsea", "coffee")


def _load(name: str):
    import numpy as np
    import skimage.data
    from skimage import io

    if name == "motorcycle_left":  # bundled file, not exposed as a skimage.data function
        image = io.imread(Path(skimage.data.__file__).parent / "motorcycle_left.png")
    else:
        image = getattr(skimage.data, name)()
    image = np.ascontiguousarray(image[..., :3])
    if image.dtype != np.uint8 or image.ndim != 3:
        raise RuntimeError(f"scikit-image's bundled image {name!r} is not 8-bit RGB ({image.dtype}, {image.shape})")
    return image


def write_embedded(root: str | Path) -> dict[str, Path]:
    """Write the bundled photos as ``root/train/*.png`` and ``root/heldout/*.png`` (idempotent).

    Returns ``{"train": Path, "heldout": Path}``. Files are written atomically, so an
    interrupted call never leaves a half-written PNG behind.
    """
    from PIL import Image

    root = Path(root)
    folders = {"train": root / "train", "heldout": root / "heldout"}
    for split, names in (("train", TRAIN_IMAGES), ("heldout", HELD_OUT_IMAGES)):
        folder = folders[split]
        folder.mkdir(parents=True, exist_ok=True)
        for name in names:
            target = folder / f"{name}.png"
            if target.exists():
                continue
            with atomic_path(target) as tmp:
                Image.fromarray(_load(name)).save(tmp, format="PNG")
    return folders
