"""A decoded-image cache in shared memory, so DataLoader workers never decode a file per sample.

Contract: ``cache[i]`` is image ``i`` as a ``torch.uint8`` ``(3, H, W)`` RGB view (values
0..255) into one contiguous buffer in shared memory; it is read-only by convention. The cache
lives only in the process that built it and in its DataLoader workers: nothing is written to
disk, so each new process (or each DataModule that builds one) decodes the files again.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from cirlab.data.image_files import ImageFolderError, LoadMode, header_size, load_image, run_in_threads

__all__ = ["DecodedImageCache"]


def _empty_buffer(nbytes: int, shared: bool) -> torch.Tensor:
    data = torch.empty(nbytes, dtype=torch.uint8)
    return data.share_memory_() if shared else data


def _check_shm_space(nbytes: int) -> None:
    shm = "/dev/shm"
    if not os.path.isdir(shm):
        return
    try:
        st = os.statvfs(shm)
    except OSError:  # pragma: no cover
        return
    free = st.f_bavail * st.f_frsize
    if nbytes > free:
        raise RuntimeError(
            f"the decoded images need {nbytes / 2**30:.2f} GiB of shared memory but {shm} has only "
            f"{free / 2**30:.2f} GiB free; enlarge it (e.g. docker run --shm-size=...) or build "
            "DecodedImageCache with shared=False (then only fork-started workers avoid copies)"
        )


class DecodedImageCache:
    """Decoded ``uint8`` RGB images held in memory for the training dataset, so DataLoader
    workers never decode a large PNG per sample.

    Build it once in the main process with :meth:`from_paths` (thread pool, progress bar). All
    images live in **one** contiguous ``uint8`` buffer in shared memory (``share_memory_()``);
    ``cache[i]`` is a ``(3, H, W)`` ``uint8`` view into it (no copy; do not modify it in place). One buffer
    rather than one shared tensor per image keeps a single shared-memory handle, so passing
    the cache to workers costs one file descriptor, not one per image.

    Workers see the images without copies: with ``fork`` they inherit the mapping; with
    ``spawn``/``forkserver`` the cache is pickled through ``torch.multiprocessing``, which
    sends shared-memory tensors as handles (a few hundred bytes in total). Note: plain
    :mod:`pickle` (not the multiprocessing pickler) serialises the pixel data itself.

    Attributes:
        names: file name of each image (``str``).
        paths: absolute source path of each image (``str``).
        sizes: ``(H, W)`` of each image.
        total_bytes: bytes of pixel data (sum of ``3*H*W``).
    """

    def __init__(
        self,
        data: torch.Tensor,
        sizes: Sequence[tuple[int, int]],
        names: Sequence[str],
        paths: Sequence[str],
    ) -> None:
        if data.dtype != torch.uint8 or data.dim() != 1:
            raise ValueError(
                f"data must be a 1-D uint8 tensor, got {data.dtype} {tuple(data.shape)}"
            )
        if not (len(sizes) == len(names) == len(paths)):
            raise ValueError("sizes, names and paths must have the same length")
        self.sizes: list[tuple[int, int]] = [(int(h), int(w)) for h, w in sizes]
        self.names = list(names)
        self.paths = list(paths)
        offsets = [0]
        for h, w in self.sizes:
            offsets.append(offsets[-1] + 3 * h * w)
        if offsets[-1] != data.numel():
            raise ValueError(
                f"data holds {data.numel()} bytes but the sizes need {offsets[-1]}"
            )
        self._offsets = offsets
        self._data = data

    # -- building ----------------------------------------------------------------------

    @classmethod
    def from_paths(
        cls,
        paths: Sequence[str | os.PathLike[str]],
        *,
        num_threads: int | None = None,
        mode: LoadMode = "strict",
        shared: bool = True,
    ) -> DecodedImageCache:
        """Decode ``paths`` (in order) with :func:`~cirlab.data.image_files.load_image` into a new cache.

        Reads the headers first to allocate the buffer, then decodes in a thread pool
        (``num_threads``, default 2-4) straight into it, so peak memory is the buffer plus
        one image per thread. With ``shared=True`` (default) the buffer lives in shared
        memory (checked against free space in ``/dev/shm`` first).

        Raises:
            ImageFolderError: for the first bad file (in path order); run
                :func:`~cirlab.data.image_files.scan_folder` first for a report of all of them.
            ValueError: ``paths`` is empty.
        """
        plist = [Path(p) for p in paths]
        if not plist:
            raise ValueError("DecodedImageCache.from_paths: no image paths given")
        sizes = [header_size(p) for p in plist]
        offsets = [0]
        for h, w in sizes:
            offsets.append(offsets[-1] + 3 * h * w)
        total = offsets[-1]
        if shared:
            _check_shm_space(total)
        data = _empty_buffer(total, shared)

        def decode(i: int) -> None:
            img = load_image(plist[i], mode=mode)
            h, w = sizes[i]
            # header and decoded size disagree (defensive)
            if tuple(img.shape) != (3, h, w):  # pragma: no cover
                raise ImageFolderError(
                    f"image '{plist[i]}' decoded to {tuple(img.shape)}, header said (3, {h}, {w})",
                    path=plist[i],
                )
            data[offsets[i] : offsets[i + 1]].copy_(img.reshape(-1))

        results = run_in_threads(decode, range(len(plist)), "decoding images", num_threads)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return cls(
            data,
            sizes,
            names=[p.name for p in plist],
            paths=[os.path.abspath(p) for p in plist],
        )

    # -- access ------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> torch.Tensor:
        """Image ``i`` as a ``(3, H, W)`` ``uint8`` view (shared memory; read-only by convention)."""
        n = len(self.sizes)
        if not -n <= i < n:
            raise IndexError(f"image index {i} out of range for {n} images")
        i %= n
        h, w = self.sizes[i]
        return self._data[self._offsets[i] : self._offsets[i + 1]].view(3, h, w)

    @property
    def total_bytes(self) -> int:
        return self._data.numel()

    def is_shared(self) -> bool:
        return self._data.is_shared()

    def __repr__(self) -> str:
        return (
            f"DecodedImageCache({len(self)} images, {self.total_bytes / 2**20:.1f} MiB, "
            f"shared={self.is_shared()})"
        )
