"""A decoded-image cache in shared memory, so DataLoader workers never decode a file per sample.

Contract: ``cache[i]`` is image ``i`` as a ``torch.uint8`` ``(3, H, W)`` RGB view (values
0..255) into one contiguous buffer; it is read-only by convention.

Two ways to hold the buffer:

* in shared memory (``store_dir=None``): it lives in the process that built it and in its
  DataLoader workers; each new process decodes the files again;
* in a file under ``store_dir`` (one per node, shared by its processes): the first process to
  take the file's lock decodes the images into ``decoded-<key>.u8`` (raw bytes, written under a
  temporary name and renamed into place), and every process, the builder included, memory-maps
  that file. The pages are the operating system's page cache of the file, one copy per node
  however many DDP ranks and workers map it; a later run on the same images maps it without
  decoding. ``<key>`` is :func:`decoded_cache_key` (the resolved paths, sizes, inodes,
  modification and status-change times of the files, and the decode mode). The mapping is
  private (copy-on-write): a write into a view would copy that page for the writer only, never
  change the file.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from cirlab.data.image_files import ImageFolderError, LoadMode, header_size, load_image, run_in_threads

__all__ = ["DecodedImageCache", "decoded_cache_key"]

log = logging.getLogger(__name__)

#: version of the stored layout (raw RGB bytes, images one after the other, (3, H, W) each)
STORE_FORMAT = 1


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


def decoded_cache_key(paths: Sequence[Path], mode: str) -> str:
    """Name of the stored buffer of ``paths`` decoded with ``mode``: a hash of the layout version,
    the mode and, per file in order, its resolved path, byte size, inode, and modification and
    status-change times (ns).

    [why] Hashing the bytes of a training set (GBs) at every start would cost what the cache
    saves. The status-change time stands in for the content: every write, and every ``utime``
    that puts an old mtime back (``cp -p``, ``rsync -t``, ``touch -d``), sets it to now, and no
    user tool can set it back; a file replaced by another (rename) has a new inode. Both at worst
    rebuild a cache that was still valid (after ``chmod``, say)."""
    entries = []
    for path in paths:
        stat = os.stat(path)
        entries.append([str(Path(path).resolve()), stat.st_size, stat.st_ino, stat.st_mtime_ns, stat.st_ctime_ns])
    text = json.dumps({"format": STORE_FORMAT, "mode": str(mode), "files": entries})
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _map_file(path: Path, nbytes: int) -> torch.Tensor:
    """``path`` (exactly ``nbytes`` long) memory-mapped as a private 1-D uint8 tensor."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise FileNotFoundError(f"decoded-image cache file {path} is missing (was it deleted while in use?)") from None
    if size != nbytes:
        raise RuntimeError(f"decoded-image cache file {path} holds {size} bytes, the images need {nbytes}: "
                           "the file is damaged; delete it and it is rebuilt on the next start")
    return torch.from_file(str(path), shared=False, size=nbytes, dtype=torch.uint8)


def _check_disk_space(folder: Path, nbytes: int) -> None:
    st = os.statvfs(folder)
    free = st.f_bavail * st.f_frsize
    if nbytes > free:
        raise RuntimeError(f"the decoded images need {nbytes / 2**30:.2f} GiB in {folder} but only {free / 2**30:.2f} "
                           "GiB are free there: free space or point the cache elsewhere (data.cache_dir)")


class _FileLock:
    """An exclusive ``flock`` on ``path`` for a ``with`` block; without one where the file system
    refuses locks (then builders race, each renaming its own complete file into place)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.handle = None

    def __enter__(self) -> _FileLock:
        import fcntl

        self.handle = open(self.path, "a+")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX)
        except OSError as error:
            if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            log.warning("no file lock on %s (%s): processes may decode the images more than once", self.path, error)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.close()  # closing releases the lock


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

    With ``store_dir`` (:meth:`from_paths`) the buffer is instead a memory-mapped file shared by
    every process of the node (module docstring); pickling then sends the file's path and a
    spawned worker maps the file again.

    Attributes:
        names: file name of each image (``str``).
        paths: absolute source path of each image (``str``).
        sizes: ``(H, W)`` of each image.
        total_bytes: bytes of pixel data (sum of ``3*H*W``).
        file: the mapped file (``Path``), or None for a shared-memory buffer.
        built: True if this process decoded the images (False: it mapped a file another built).
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
        self.file: Path | None = None
        self.built = True

    @classmethod
    def _from_file(cls, file: Path, sizes, names, paths, built: bool) -> DecodedImageCache:
        nbytes = sum(3 * h * w for h, w in sizes)
        cache = cls(_map_file(file, nbytes), sizes, names, paths)
        cache.file, cache.built = file, built
        return cache

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        if self.file is not None:  # a worker maps the file itself: nothing but the path travels
            state["_data"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self._data is None:
            self._data = _map_file(self.file, self._offsets[-1])

    # -- building ----------------------------------------------------------------------

    @classmethod
    def from_paths(
        cls,
        paths: Sequence[str | os.PathLike[str]],
        *,
        num_threads: int | None = None,
        mode: LoadMode = "strict",
        shared: bool = True,
        store_dir: str | os.PathLike[str] | None = None,
    ) -> DecodedImageCache:
        """Decode ``paths`` (in order) with :func:`~cirlab.data.image_files.load_image` into a new cache.

        Reads the headers first to allocate the buffer, then decodes in a thread pool
        (``num_threads``, default 2-4) straight into it, so peak memory is the buffer plus
        one image per thread. With ``shared=True`` (default) the buffer lives in shared
        memory (checked against free space in ``/dev/shm`` first).

        With ``store_dir`` the buffer is the node's file for these images (module docstring):
        mapped if it exists, else decoded into it by whichever process takes its lock first
        while the others wait; ``shared`` is then ignored.

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
        names, abspaths = [p.name for p in plist], [os.path.abspath(p) for p in plist]
        if store_dir is not None:
            store = Path(store_dir)
            store.mkdir(parents=True, exist_ok=True)
            file = store / f"decoded-{decoded_cache_key(plist, mode)}.u8"
            with _FileLock(file.with_suffix(".lock")):
                if file.exists():
                    log.info("decoded images: mapping %s (%.1f MiB), built earlier", file, total / 2**20)
                    return cls._from_file(file, sizes, names, abspaths, built=False)
                for stale in store.glob(f".{file.name}.*.tmp"):  # left by a builder that died
                    stale.unlink(missing_ok=True)
                _check_disk_space(store, total)
                temporary = store / f".{file.name}.{os.getpid()}.tmp"
                try:
                    data = torch.from_file(str(temporary), shared=True, size=total, dtype=torch.uint8)
                    cls._decode_into(data, plist, sizes, offsets, mode, num_threads)
                    del data  # unmaps: the pages stay in the page cache, written back by the system
                    with open(temporary, "rb+") as handle:
                        os.fsync(handle.fileno())
                    os.replace(temporary, file)
                finally:
                    temporary.unlink(missing_ok=True)
            log.info("decoded images: built %s (%.1f MiB) for the processes of this node", file, total / 2**20)
            return cls._from_file(file, sizes, names, abspaths, built=True)
        if shared:
            _check_shm_space(total)
        data = _empty_buffer(total, shared)
        cls._decode_into(data, plist, sizes, offsets, mode, num_threads)
        return cls(data, sizes, names=names, paths=abspaths)

    @staticmethod
    def _decode_into(data: torch.Tensor, plist: list[Path], sizes, offsets, mode: LoadMode,
                     num_threads: int | None) -> None:
        """Decode ``plist`` into ``data`` (image ``i`` at ``offsets[i]``), in a thread pool."""

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
        """True if other processes can see the buffer without a copy (shared memory or a mapped file)."""
        return self.file is not None or self._data.is_shared()

    def __repr__(self) -> str:
        where = f"file={str(self.file)!r}" if self.file is not None else f"shared={self.is_shared()}"
        return f"DecodedImageCache({len(self)} images, {self.total_bytes / 2**20:.1f} MiB, {where})"
