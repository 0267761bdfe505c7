"""Image files: finding, validating and decoding folders of clean RGB images.

Contract: :func:`load_image` returns a ``torch.uint8`` tensor ``(3, H, W)``, RGB, values
0..255, contiguous; every other function works on such tensors (or any ``(..., H, W)``) and on
paths. Bad input raises :class:`ImageFolderError`, whose message names the file or folder and,
where one applies, the config key (``data.train_dir``); nothing is dropped silently. With
``on_bad="skip"`` (:func:`scan_folder`) a bad file is skipped with a ``logging`` warning that
names it.

What counts as a usable image (the rules of :func:`load_image`):

* a file Pillow can identify, verify and fully decode (truncated or corrupt files are
  errors: Pillow's ``ImageFile.LOAD_TRUNCATED_IMAGES`` must stay ``False``);
* 8 bits per sample: 16-bit (and higher) images are rejected, including 16-bit RGB PNG and
  TIFF files that Pillow would otherwise silently reduce to 8 bits;
* colour: RGB (also RGBX), or palette (``P``) without transparency, which is expanded to
  RGB. Grayscale (``L``, ``1``) is rejected unless ``mode="gray_to_rgb"``; CMYK and other
  colour spaces are rejected;
* no alpha channel or transparency (RGBA, LA, PA, or a ``tRNS`` transparency key): alpha is
  never silently dropped;
* a single frame (no multi-page TIFF or animated PNG/WebP).

Odd widths/heights are valid (the networks pad); :func:`crop_to_multiple` and
:func:`center_crop` cut images to the sizes a caller needs. EXIF orientation is not applied and
embedded ICC profiles are ignored: pixels are used as stored. The decoded images of a training
folder are held in memory by :mod:`cirlab.data.image_cache`.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import torch
from PIL import Image, ImageFile, UnidentifiedImageError

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageFolderError",
    "LoadMode",
    "center_crop",
    "check_image",
    "crop_to_multiple",
    "header_size",
    "list_images",
    "load_image",
    "run_in_threads",
    "scan_folder",
]

logger = logging.getLogger(__name__)

#: File extensions (lower case, with the dot) treated as images; matched case-insensitively.
IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".png",
    ".jpg",
    ".jpeg",
    ".bmp",
    ".tif",
    ".tiff",
    ".webp",
)

LoadMode = Literal["strict", "gray_to_rgb"]
_LOAD_MODES = ("strict", "gray_to_rgb")
_MAX_LISTED = 20
_PROGRESS_MIN_FILES = 50

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_HIGH_DEPTH_MODES = {
    "I;16": "16-bit",
    "I;16L": "16-bit",
    "I;16B": "16-bit",
    "I;16N": "16-bit",
    "I;16S": "16-bit",
    "I": "32-bit integer",
    "F": "32-bit float",
}
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_GRAY_MODES = {"L", "1"}


class ImageFolderError(ValueError):
    """Bad image input. The message always names the offending file or folder (and, where
    one applies, the config key such as ``data.train_dir``).

    Attributes:
        path: the file or folder the error is about (``None`` only if none applies).
        problems: for an aggregated error from :func:`scan_folder`, one message per bad
            file; empty otherwise.
    """

    def __init__(
        self,
        message: str,
        path: str | os.PathLike[str] | None = None,
        problems: Sequence[str] = (),
    ) -> None:
        super().__init__(message)
        self.path = Path(path) if path is not None else None
        self.problems = list(problems)


# --------------------------------------------------------------------------------------
# listing


def _as_folder(folder: str | os.PathLike[str] | None, config_key: str) -> Path:
    if folder is None or not str(folder).strip():
        raise ImageFolderError(
            f"{config_key}: no folder given (got {folder!r})", path=None
        )
    return Path(os.path.expanduser(str(folder)))


def _is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def list_images(
    folder: str | os.PathLike[str],
    *,
    recursive: bool = False,
    config_key: str = "data.train_dir",
) -> list[Path]:
    """Image files in ``folder``, sorted by their path relative to it (deterministic).

    A file counts as an image by its extension (:data:`IMAGE_EXTENSIONS`, any case); the
    contents are not read here (see :func:`scan_folder`). With ``recursive=True`` all
    subfolders are searched too.

    Raises:
        ImageFolderError: naming ``config_key`` and the folder if no folder is given, it does
            not exist, is not a directory, or holds no image files (the message lists the
            extensions looked for, how many other files were seen, and subfolders when
            ``recursive`` is off).

    A symbolic link named like an image whose target is missing or loops is listed too (it is
    not dropped silently): :func:`check_image` / :func:`scan_folder` then name it as a broken link
    or a link loop. So is any other entry named like an image that is not a regular file (a FIFO,
    socket or device): checking it names it as such instead of opening it. Entries of that kind
    with other names are ignored like other non-image files.
    """
    root = _as_folder(folder, config_key)
    if not root.exists():
        raise ImageFolderError(
            f"{config_key}: folder '{root}' does not exist", path=root
        )
    if not root.is_dir():
        raise ImageFolderError(f"{config_key}: '{root}' is not a folder", path=root)

    candidates = root.rglob("*") if recursive else root.iterdir()
    images: list[Path] = []
    others: list[Path] = []
    subdirs: list[Path] = []
    for p in candidates:
        if p.is_dir():
            subdirs.append(p)
        elif _is_image_name(p):
            # a dangling or looping link, a FIFO or a socket named like an image is listed too, so
            # that checking it names it (nothing named like an image is dropped silently)
            images.append(p)
        elif p.is_file():
            others.append(p)
    if not images:
        exts = ", ".join(IMAGE_EXTENSIONS)
        where = "or its subfolders " if recursive else ""
        msg = (
            f"{config_key}: folder '{root}' {where}holds no image files "
            f"(looked for {exts}, case-insensitive); found {len(others)} non-image file(s)"
        )
        if others:
            shown = ", ".join(repr(p.name) for p in sorted(others)[:5])
            msg += f", e.g. {shown}"
        if subdirs and not recursive:
            shown = ", ".join(repr(p.name) for p in sorted(subdirs)[:5])
            msg += f"; it has {len(subdirs)} subfolder(s) ({shown}): point {config_key} at one of them"
            msg += " or search recursively"
        raise ImageFolderError(msg, path=root)
    return sorted(images, key=lambda p: p.relative_to(root).as_posix())


# --------------------------------------------------------------------------------------
# one image


def _check_pillow_settings() -> None:
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True (some imported code set it), so truncated "
            "image files would load silently with missing pixels; cirlab needs it False"
        )


def _is_loop(path: Path) -> bool:
    """Whether resolving the symbolic link ``path`` loops (ELOOP) rather than ends nowhere."""
    try:
        path.resolve(strict=True)
    except RuntimeError:  # Python < 3.13 reports a loop so
        return True
    except OSError as e:
        return e.errno == errno.ELOOP
    return False


def _check_regular(path: Path, name: str) -> None:
    """``ImageFolderError`` if ``path`` exists but is not a regular file (opening a FIFO would block)."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return  # missing, a broken link or a loop: open() below names it
    if not stat.S_ISREG(mode):
        kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file")
        raise ImageFolderError(f"{name} is {kind}, not an image file; remove it or move it out of the folder",
                               path=path)


def _bits_per_sample(header: bytes, img: Image.Image) -> int | None:
    """Largest bits-per-sample the file declares, where the format says (PNG, TIFF)."""
    if header[:8] == _PNG_SIGNATURE and header[12:16] == b"IHDR" and len(header) >= 25:
        return header[24]
    tags = getattr(img, "tag_v2", None)
    if tags is not None:
        bps = tags.get(258)  # BitsPerSample
        if bps is not None:
            values = bps if isinstance(bps, tuple) else (bps,)
            return max(int(v) for v in values)
    return None


def _open_verified(
    path: Path, *, mode: LoadMode, decode: bool
) -> tuple[Image.Image | None, tuple[int, int]]:
    """Open ``path``, apply every rule of :func:`load_image`; return (decoded RGB image or
    None when ``decode`` is False, (H, W))."""
    if mode not in _LOAD_MODES:
        raise ValueError(f"load mode must be one of {_LOAD_MODES}, got {mode!r}")
    _check_pillow_settings()
    name = f"image '{path}'"
    _check_regular(path, name)
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed by the `with fh` below
    except OSError as e:
        if path.is_symlink():
            target = os.readlink(path)
            what = "a symbolic link loop" if _is_loop(path) else "a broken symbolic link"
            raise ImageFolderError(
                f"{name} is {what} (it points to '{target}', which cannot be opened: {e.strerror or e}); "
                "fix or remove the link",
                path=path,
            ) from e
        raise ImageFolderError(
            f"{name} could not be opened ({type(e).__name__}: {e})", path=path
        ) from e
    with fh:
        header = fh.read(32)
        fh.seek(0)
        try:
            img = Image.open(fh)
        except UnidentifiedImageError as e:
            raise ImageFolderError(
                f"{name} is not a readable image file (Pillow cannot identify it; is it empty, "
                "corrupt or not an image?)",
                path=path,
            ) from e
        except MemoryError:
            raise
        # DecompressionBombError, OSError from broken headers, ...
        except Exception as e:
            raise ImageFolderError(
                f"{name} could not be read ({type(e).__name__}: {e})", path=path
            ) from e

        with img:
            w, h = img.size
            # 16-bit first: Pillow opens 16-bit RGB PNG/TIFF as 8-bit 'RGB' and loses precision.
            depth = _bits_per_sample(header, img)
            if img.mode in _HIGH_DEPTH_MODES or (depth is not None and depth > 8):
                what = _HIGH_DEPTH_MODES.get(img.mode, f"{depth}-bit")
                raise ImageFolderError(
                    f"{name} has {what} samples (mode '{img.mode}'): 16-bit images are not "
                    "supported (nor any depth above 8 bits); convert to 8-bit RGB",
                    path=path,
                )
            n_frames = getattr(img, "n_frames", 1)
            if n_frames > 1:
                raise ImageFolderError(
                    f"{name} has {n_frames} frames (multi-page or animated); only single images "
                    "are supported",
                    path=path,
                )
            if img.mode in _ALPHA_MODES:
                raise ImageFolderError(
                    f"{name} (mode '{img.mode}') has an alpha channel; convert it to RGB "
                    "(alpha is never dropped silently)",
                    path=path,
                )
            if "transparency" in img.info:
                raise ImageFolderError(
                    f"{name} (mode '{img.mode}') has transparency, i.e. an alpha channel; "
                    "convert it to RGB (alpha is never dropped silently)",
                    path=path,
                )
            if img.mode in _GRAY_MODES and mode != "gray_to_rgb":
                raise ImageFolderError(
                    f"{name} is grayscale (mode '{img.mode}'); cirlab expects RGB images: "
                    "convert it to RGB (or load with mode='gray_to_rgb')",
                    path=path,
                )
            if img.mode == "CMYK":
                raise ImageFolderError(
                    f"{name} is CMYK; convert it to RGB (CMYK needs a colour profile to convert)",
                    path=path,
                )
            if img.mode not in {"RGB", "RGBX", "P"} | _GRAY_MODES:
                raise ImageFolderError(
                    f"{name} has unsupported colour mode '{img.mode}'; convert it to 8-bit RGB",
                    path=path,
                )
            if w < 1 or h < 1:
                raise ImageFolderError(f"{name} is empty ({h}x{w})", path=path)

            try:
                img.verify()  # structural checks (chunk CRCs for PNG); invalidates img
                fh.seek(0)
                with Image.open(fh) as full:
                    full.load()  # full decode: truncated data raises here
                    if full.size != (w, h):
                        raise OSError(
                            f"decoded size {full.size} differs from header size {(w, h)}"
                        )
                    rgb = full.convert("RGB") if decode else None
            except MemoryError:
                raise
            except Exception as e:
                raise ImageFolderError(
                    f"{name} is truncated or corrupt ({type(e).__name__}: {e})",
                    path=path,
                ) from e
    return rgb, (h, w)


def load_image(
    path: str | os.PathLike[str], *, mode: LoadMode = "strict"
) -> torch.Tensor:
    """Decode one image file to a ``torch.uint8`` tensor of shape ``(3, H, W)``, RGB, values
    0..255, contiguous.

    Rules (each violation raises :class:`ImageFolderError` naming the file):

    * the file must open, identify, ``verify()`` and fully decode with Pillow: unreadable,
      non-image (e.g. a text file named ``.png``), truncated or corrupt files are errors;
    * 16-bit or higher samples (modes ``I;16*``, ``I``, ``F``, and 16-bit RGB/RGBA PNG or
      TIFF, detected from the PNG header bit depth / TIFF ``BitsPerSample``) are errors:
      "16-bit ... not supported; convert it to 8-bit RGB";
    * an alpha channel (RGBA, LA, PA) or a transparency key is an error: "has an alpha
      channel; convert it to RGB";
    * grayscale (``L``, ``1``) is an error with ``mode="strict"`` (default); with
      ``mode="gray_to_rgb"`` its single channel is repeated into R, G and B;
    * CMYK and other colour modes (YCbCr, LAB, HSV, ...) are errors;
    * multi-frame files (multi-page TIFF, animated PNG/WebP) are errors.

    Accepted: RGB, RGBX (padding byte dropped) and palette (``P``) images without
    transparency, which are expanded to RGB. Any width/height >= 1 is accepted, odd sizes
    included. EXIF orientation is not applied.

    Raises:
        ImageFolderError: as above.
        RuntimeError: if ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` was set True elsewhere.
    """
    p = Path(path)
    rgb, (h, w) = _open_verified(p, mode=mode, decode=True)
    assert rgb is not None
    arr = np.asarray(rgb, dtype=np.uint8)
    if arr.shape != (h, w, 3):  # pragma: no cover - defensive
        raise ImageFolderError(
            f"image '{p}' decoded to unexpected shape {arr.shape}", path=p
        )
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def _normalize_min_size(
    min_size: int | Sequence[int] | None, size_key: str
) -> tuple[int, int] | None:
    if min_size is None:
        return None
    if isinstance(min_size, (int, np.integer)) and not isinstance(min_size, bool):
        hw = (int(min_size), int(min_size))
    elif (
        isinstance(min_size, Sequence)
        and len(min_size) == 2
        and not isinstance(min_size, str)
    ):
        hw = (int(min_size[0]), int(min_size[1]))
    else:
        raise ValueError(
            f"{size_key}: min size must be an int or (h, w), got {min_size!r}"
        )
    if hw[0] < 1 or hw[1] < 1:
        raise ValueError(f"{size_key}: min size must be positive, got {min_size!r}")
    return hw


def _size_text(hw: tuple[int, int]) -> str:
    return str(hw[0]) if hw[0] == hw[1] else f"{hw[0]}x{hw[1]}"


def check_image(
    path: str | os.PathLike[str],
    *,
    min_size: int | Sequence[int] | None = None,
    mode: LoadMode = "strict",
    size_key: str = "data.patch_size",
) -> tuple[int, int]:
    """Validate one image file under the rules of :func:`load_image` and return ``(H, W)``.

    The file is fully decoded (the only reliable way to catch truncation) but no tensor is
    kept. ``min_size`` (an int, or ``(h, w)``) rejects images smaller than the training patch:
    "image 'x.png' is 40x50 (HxW), smaller than the patch size 64 (data.patch_size)".

    Raises:
        ImageFolderError: naming the file, for any rule of :func:`load_image` or a too-small image.
    """
    p = Path(path)
    need = _normalize_min_size(min_size, size_key)
    _, (h, w) = _open_verified(p, mode=mode, decode=False)
    if need is not None and (h < need[0] or w < need[1]):
        raise ImageFolderError(
            f"image '{p}' is {h}x{w} (HxW), smaller than the patch size {_size_text(need)} ({size_key})",
            path=p,
        )
    return h, w


def header_size(path: str | os.PathLike[str]) -> tuple[int, int]:
    """``(H, W)`` of an image file from its header alone (no decode, no validation).

    Raises:
        ImageFolderError: naming the file, with :func:`load_image`'s precise reason, when
            Pillow cannot even read the header.
    """
    try:
        with Image.open(path) as img:
            w, h = img.size
    except MemoryError:
        raise
    except Exception:
        load_image(path)  # raises the precise ImageFolderError for this file
        raise  # pragma: no cover - load_image accepted what Image.open rejected
    return h, w


# --------------------------------------------------------------------------------------
# folders

T = TypeVar("T")


def run_in_threads(
    fn: Callable[[Any], T],
    items: Sequence[Any],
    desc: str,
    num_threads: int | None = None,
) -> list[T | BaseException]:
    """``fn`` over ``items`` in a thread pool of ``num_threads`` (default: 2 to 4, by CPU count),
    with a progress bar (``desc``) above 50 items.

    Returns the results in the order of ``items``; where ``fn`` raised an
    :class:`ImageFolderError` or ``OSError`` the exception takes the result's place (callers
    report every bad file at once). Other exceptions propagate.
    """
    threads = num_threads or max(2, min(4, os.cpu_count() or 1))
    out: list[T | BaseException] = [None] * len(items)  # type: ignore[list-item]
    bar = _progress(len(items), desc)
    try:
        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            futures = {pool.submit(fn, x): i for i, x in enumerate(items)}
            for fut in as_completed(futures):
                i = futures[fut]
                try:
                    out[i] = fut.result()
                except (ImageFolderError, OSError) as e:
                    out[i] = e
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return out


def _progress(total: int, desc: str) -> Any:
    if total <= _PROGRESS_MIN_FILES:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm ships with lightning
        return None
    return tqdm(total=total, desc=desc, unit="img", disable=None)


def _listing(problems: Sequence[str]) -> str:
    lines = [f"  - {m}" for m in problems[:_MAX_LISTED]]
    if len(problems) > _MAX_LISTED:
        lines.append(f"  ... and {len(problems) - _MAX_LISTED} more")
    return "\n".join(lines)


def scan_folder(
    folder: str | os.PathLike[str],
    *,
    min_size: int | Sequence[int] | None = None,
    on_bad: Literal["error", "skip"] = "error",
    config_key: str = "data.train_dir",
    recursive: bool = False,
    mode: LoadMode = "strict",
    size_key: str = "data.patch_size",
    num_threads: int | None = None,
) -> list[Path]:
    """List the images of ``folder`` (:func:`list_images`) and validate every one
    (:func:`check_image`, which decodes it) in a thread pool, with a progress bar for more
    than 50 files. Returns the usable paths, sorted.

    ``on_bad="error"`` (default): all problems are collected and one
    :class:`ImageFolderError` lists every bad file (the first 20, then "... and N more";
    all of them in ``err.problems``). ``on_bad="skip"``: each bad file is skipped with one
    ``logging`` warning naming it; if no file remains, ImageFolderError is raised.

    Raises:
        ImageFolderError: folder problems (see :func:`list_images`), bad files as above.
        ValueError: an unknown ``on_bad``.
    """
    if on_bad not in ("error", "skip"):
        raise ValueError(
            f"{config_key}: on_bad must be 'error' or 'skip', got {on_bad!r}"
        )
    _normalize_min_size(min_size, size_key)  # fail early on a bad setting
    root = _as_folder(folder, config_key)
    paths = list_images(root, recursive=recursive, config_key=config_key)

    def check(p: Path) -> tuple[int, int]:
        return check_image(p, min_size=min_size, mode=mode, size_key=size_key)

    results = run_in_threads(check, paths, f"checking {root.name}", num_threads)
    good: list[Path] = []
    problems: list[str] = []
    for p, r in zip(paths, results):
        if isinstance(r, BaseException):
            problems.append(
                str(r) if isinstance(r, ImageFolderError) else f"image '{p}': {r}"
            )
        else:
            good.append(p)
    if not problems:
        return good
    if on_bad == "error":
        raise ImageFolderError(
            f"{config_key}: {len(problems)} of {len(paths)} image file(s) in '{root}' are unusable "
            f"(fix or remove them, or skip them with on_bad='skip'):\n{_listing(problems)}",
            path=root,
            problems=problems,
        )
    for msg in problems:
        logger.warning("%s: skipping %s", config_key, msg)
    if not good:
        raise ImageFolderError(
            f"{config_key}: all {len(paths)} image file(s) in '{root}' are unusable:\n{_listing(problems)}",
            path=root,
            problems=problems,
        )
    return good


# --------------------------------------------------------------------------------------
# sizes


def crop_to_multiple(img: torch.Tensor, multiple: int = 2) -> torch.Tensor:
    """Crop the bottom rows / right columns of ``img`` (``(..., H, W)``, any dtype) so H and W
    are multiples of ``multiple``; returns a view (no copy). Used by evaluation sets for
    networks that need sizes divisible by their downsampling factor; training accepts odd
    sizes as they are (the networks pad).

    Raises:
        ValueError: ``multiple`` < 1, ``img`` has fewer than 2 dims, or H or W < ``multiple``.
    """
    if int(multiple) != multiple or multiple < 1:
        raise ValueError(f"multiple must be a positive integer, got {multiple!r}")
    if img.dim() < 2:
        raise ValueError(
            f"expected a tensor of shape (..., H, W), got {tuple(img.shape)}"
        )
    h, w = img.shape[-2], img.shape[-1]
    if h < multiple or w < multiple:
        raise ValueError(
            f"image of size {h}x{w} (HxW) is smaller than the multiple {multiple}"
        )
    return img[..., : h - h % multiple, : w - w % multiple]


def center_crop(
    image: torch.Tensor,
    size: int | None,
    *,
    even: bool = True,
    whole_if_smaller: bool = False,
) -> torch.Tensor:
    """The central ``size x size`` window of ``image`` (``(..., H, W)``, any dtype), as a view.

    ``size`` None or 0: ``image`` is returned as is. Otherwise each side becomes
    ``min(size, side)``, rounded down to even when ``even`` (the networks run their trunk at
    half resolution), with the window at offset ``(side - new_side) // 2``. With
    ``whole_if_smaller``, an image smaller than ``size`` on either side is returned whole and a
    larger one is cut to exactly ``size x size`` (the evaluation sets' rule, with ``even=False``).
    """
    if not size:
        return image
    h, w = image.shape[-2:]
    if whole_if_smaller and (h < size or w < size):
        return image
    size_h, size_w = min(size, h), min(size, w)
    if even:
        size_h, size_w = size_h // 2 * 2, size_w // 2 * 2
    top, left = (h - size_h) // 2, (w - size_w) // 2
    return image[..., top : top + size_h, left : left + size_w]
