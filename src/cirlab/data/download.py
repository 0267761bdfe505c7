"""Download the public training and test sets (the library behind ``cirlab-data``).

Layout under ``--root`` (default ``data/`` relative to the working directory); this root is
what ``paths.data_dir`` in the Hydra config points at::

    <root>/DIV2K/DIV2K_train_HR/0001.png ... 0800.png   (800 PNG, div2k_train)
    <root>/DIV2K/DIV2K_valid_HR/0801.png ... 0900.png   (100 PNG, div2k_valid, optional)
    <root>/CBSD68/3096.png ...                           (68 PNG, cbsd68)
    <root>/downloads/                                    (archives and ``.part`` files in flight)

Without internet, copy the images into that layout by hand (a set counts as complete when its
folder holds the expected number of PNGs), or drop the archive itself into ``<root>/downloads/``
under its manifest file name: it is then verified and extracted without touching the network.

Sources and integrity (see :data:`MANIFEST`):

* ``div2k_train``: ``DIV2K_train_HR.zip`` (3,530,603,713 bytes) and ``div2k_valid``:
  ``DIV2K_valid_HR.zip`` (448,993,893 bytes) from the official ETH Zurich server
  (``data.vision.ee.ethz.ch/cvl/DIV2K/``, https first, then plain http). Sizes and SHA-256 are
  pinned; they are the values recorded in tensorflow-datasets' ``url_checksums/div2k.txt`` and
  agree with several independent public records of the same archives.
* ``cbsd68``: the colour BSD68 test set as kept in the GitHub repository ``cszn/FFDNet``
  (``testsets/CBSD68``, 68 PNGs). It is fetched as the repository's ``master`` archive
  (one request, ~tens of MB, includes the repository's other test sets and models) and only
  ``testsets/CBSD68/*.png`` is extracted. **No checksum is pinned for it**: GitHub generates
  these archives on the fly and does not guarantee byte-identical output, and the branch head may
  move. Integrity is instead checked by extracting exactly the 68 expected file names.

Downloads go to ``<name>.part`` and resume with an HTTP ``Range`` request (a server that ignores
it and answers ``200`` makes the download restart from zero); connection errors and timeouts are
retried with exponential backoff. A finished file is checksummed before it gets its final name;
on a mismatch it is renamed to ``<name>.bad`` and :class:`ChecksumError` names the file and both
digests. Archives are extracted into a hidden temporary folder beside the target, which is renamed
into place only once complete, so a final folder is never half-written; members that would land
outside the target (absolute paths, ``..``) abort extraction. Errors that are not about the
network (a full disk, permissions) propagate unchanged.

Everything is driven by :class:`DatasetSpec`, so tests (or mirrors) can call
:func:`download_dataset` with their own URLs and checksums.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import shutil
import stat
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from tqdm import tqdm

__all__ = [
    "DEFAULT_DATASETS",
    "MANIFEST",
    "ChecksumError",
    "DatasetSpec",
    "DownloadError",
    "count_images",
    "download_all",
    "download_dataset",
    "fetch",
]

USER_AGENT = "cirlab-data/0.1 (+python urllib)"
CHUNK_SIZE = 1 << 20
DOWNLOADS_DIR = "downloads"

Log = Callable[[str], None]


class DownloadError(RuntimeError):
    """A dataset could not be fetched, verified or extracted."""


class ChecksumError(DownloadError):
    """A downloaded file does not match its expected size or digest."""


@dataclass(frozen=True)
class DatasetSpec:
    """One downloadable dataset: where it comes from and where its images end up.

    Attributes:
        name: key used on the command line (``--only``).
        urls: candidate URLs for the same file, tried in order (mirrors).
        filename: archive name inside ``<root>/downloads``.
        target: folder (relative to the root, ``/``-separated) that receives the images.
        member_dir: folder inside the archive whose direct image children are extracted; matched
            as a path suffix, so a varying top-level folder (``FFDNet-master/``) does not matter.
        num_images: how many images a complete dataset has.
        size: expected archive size in bytes, or ``None`` when not pinned.
        checksum: expected hex digest of the archive, or ``None`` when not pinned.
        checksum_algo: ``hashlib`` name of that digest (``"sha256"`` or ``"md5"``).
        checksum_source: where the pinned size/digest come from (documentation only).
        expected_names: exact image file names, when known (checked after extraction).
        description: one line for ``--list``.
        image_suffixes: file name endings (lower case) that count as images.
    """

    name: str
    urls: tuple[str, ...]
    filename: str
    target: str
    member_dir: str
    num_images: int
    size: int | None = None
    checksum: str | None = None
    checksum_algo: str = "sha256"
    checksum_source: str = ""
    expected_names: frozenset[str] | None = None
    description: str = ""
    image_suffixes: tuple[str, ...] = (".png",)

    def __post_init__(self) -> None:
        if not self.urls:
            raise ValueError(f"dataset {self.name!r}: no URL")
        # a lone string would otherwise be iterated character by character
        if isinstance(self.urls, str):
            object.__setattr__(self, "urls", (self.urls,))
        # an unknown algorithm fails here, not after a long download
        hashlib.new(self.checksum_algo)
        if (
            self.expected_names is not None
            and len(self.expected_names) != self.num_images
        ):
            raise ValueError(
                f"dataset {self.name!r}: expected_names does not hold num_images names"
            )


_DIV2K = (
    "https://data.vision.ee.ethz.ch/cvl/DIV2K/",
    "http://data.vision.ee.ethz.ch/cvl/DIV2K/",
)
_TFDS = "tensorflow-datasets url_checksums/div2k.txt"

# The 68 image ids of colour BSD68 (the BSDS300 test images used by DnCNN/FFDNet).
# fmt: off
_CBSD68_IDS = (
    "101085", "101087", "102061", "103070", "105025", "106024", "108005", "108070",
    "108082", "109053", "119082", "12084", "123074", "126007", "130026", "134035",
    "14037", "143090", "145086", "147091", "148026", "148089", "157055", "159008",
    "160068", "16077", "163085", "167062", "167083", "170057", "175032", "175043",
    "182053", "189080", "19021", "196073", "197017", "208001", "210088", "21077",
    "216081", "219090", "220075", "223061", "227092", "229036", "236037", "24077",
    "241004", "241048", "253027", "253055", "260058", "271035", "285079", "291000",
    "295087", "296007", "296059", "299086", "300091", "302008", "304034", "304074",
    "306005", "3096", "33039", "351093",
)
# fmt: on

MANIFEST: dict[str, DatasetSpec] = {
    "div2k_train": DatasetSpec(
        name="div2k_train",
        urls=tuple(base + "DIV2K_train_HR.zip" for base in _DIV2K),
        filename="DIV2K_train_HR.zip",
        target="DIV2K/DIV2K_train_HR",
        member_dir="DIV2K_train_HR",
        num_images=800,
        size=3_530_603_713,
        checksum="9d0b9c463f6e35b6c62cc6a930ee2224f670b34c1df841a57670f9acf0f6c335",
        checksum_source=_TFDS,
        expected_names=frozenset(f"{i:04d}.png" for i in range(1, 801)),
        description="DIV2K training set, high resolution (800 PNG, 3.5 GB archive)",
    ),
    "div2k_valid": DatasetSpec(
        name="div2k_valid",
        urls=tuple(base + "DIV2K_valid_HR.zip" for base in _DIV2K),
        filename="DIV2K_valid_HR.zip",
        target="DIV2K/DIV2K_valid_HR",
        member_dir="DIV2K_valid_HR",
        num_images=100,
        size=448_993_893,
        checksum="20dd31fd84d777bc1cf5d6b7654a3f569c0aec74458ae094122ad1d0489900fc",
        checksum_source=_TFDS,
        expected_names=frozenset(f"{i:04d}.png" for i in range(801, 901)),
        description="DIV2K validation set, high resolution (100 PNG, 0.45 GB archive)",
    ),
    "cbsd68": DatasetSpec(
        name="cbsd68",
        urls=(
            "https://github.com/cszn/FFDNet/archive/refs/heads/master.zip",
            "https://codeload.github.com/cszn/FFDNet/zip/refs/heads/master",
        ),
        filename="FFDNet-master.zip",
        target="CBSD68",
        member_dir="testsets/CBSD68",
        num_images=68,
        size=None,
        checksum=None,  # GitHub-generated archive: not byte-stable, so not pinned
        checksum_source="GitHub archive is not byte-stable; the 68 file names are checked",
        expected_names=frozenset(f"{i}.png" for i in _CBSD68_IDS),
        description="colour BSD68 test set from cszn/FFDNet testsets/CBSD68 (68 PNG)",
    ),
}

DEFAULT_DATASETS: tuple[str, ...] = ("div2k_train", "cbsd68")


# --------------------------------------------------------------------------------------------
# downloading


_TRANSIENT_HTTP = {408, 425, 429, 500, 502, 503, 504}
_NETWORK_ERRORS = (
    # URLError includes HTTPError (classified separately) and refused connections
    urllib.error.URLError,
    ConnectionError,
    TimeoutError,  # socket.timeout is an alias
    http.client.HTTPException,  # IncompleteRead, RemoteDisconnected, BadStatusLine, ...
)


class _Incomplete(Exception):
    """The server closed the stream before the announced length; resume on the next attempt."""


_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")
_UNSATISFIED_RANGE = re.compile(r"bytes\s+\*/(\d+)")


def _size_or_zero(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _download_once(
    url: str,
    part: Path,
    *,
    expected_size: int | None,
    timeout: float,
    progress: bool,
    desc: str,
) -> None:
    """One HTTP request appending to (or restarting) ``part``; raises on any failure."""
    offset = _size_or_zero(part)
    if expected_size is not None and offset > expected_size:
        part.unlink()  # longer than the real file: cannot be a prefix of it
        offset = 0
    if expected_size is not None and offset == expected_size:
        return  # already complete (e.g. interrupted between download and rename)
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:
            match = _UNSATISFIED_RANGE.search(
                exc.headers.get("Content-Range", "") or ""
            )
            exc.close()
            if match and int(match.group(1)) == offset:
                return  # the part file already holds the whole file
            part.unlink()  # stale or foreign part file: start over on the next attempt
            raise _Incomplete(f"range {offset}- not satisfiable; restarting") from None
        raise
    with response:
        status = response.status
        total: int | None = None
        length = response.headers.get("Content-Length")
        if status == 206 and offset:
            match = _CONTENT_RANGE.search(
                response.headers.get("Content-Range", "") or ""
            )
            if not match or int(match.group(1)) != offset:
                part.unlink()
                raise _Incomplete("server answered a different range; restarting")
            if match.group(3) != "*":
                total = int(match.group(3))
            elif length is not None:
                total = offset + int(length)
            mode = "ab"
        elif status == 200:
            offset = 0  # Range ignored (or not sent): the body is the whole file
            total = int(length) if length is not None else None
            mode = "wb"
        else:
            raise DownloadError(f"{url}: unexpected HTTP status {status}")
        if total is None:
            total = expected_size
        written = offset
        with (
            open(part, mode) as sink,
            tqdm(
                total=total,
                initial=offset,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=desc,
                disable=not progress,
                leave=False,
            ) as bar,
        ):
            while True:
                chunk = response.read(CHUNK_SIZE)
                if not chunk:
                    break
                sink.write(chunk)  # OSError here (disk full, ...) is not retried
                written += len(chunk)
                bar.update(len(chunk))
        if total is not None and written < total:
            raise _Incomplete(f"connection closed after {written} of {total} bytes")


def fetch(
    urls: str | Sequence[str],
    dest: Path,
    *,
    expected_size: int | None = None,
    retries: int = 5,
    backoff: float = 1.0,
    timeout: float = 60.0,
    progress: bool = True,
    log: Log = print,
) -> Path:
    """Download to ``dest.part`` (resuming it if present) and return the part file's path.

    Each URL is tried with up to ``retries`` extra attempts on network errors, sleeping
    ``backoff``, ``2*backoff``, ``4*backoff``... seconds (at most 60) in between; permanent
    HTTP errors (404, 403...) move on to the next URL at once. Renaming the part file is left
    to the caller, which checks it first. Raises :class:`DownloadError` when every URL failed.
    """
    if isinstance(urls, str):
        urls = (urls,)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    failures: list[str] = []
    last_exc: BaseException | None = None
    for url in urls:
        for attempt in range(retries + 1):
            if attempt:
                delay = min(backoff * 2 ** (attempt - 1), 60.0)
                log(
                    f"  retrying {url} in {delay:.1f}s (attempt {attempt + 1}/{retries + 1})"
                )
                time.sleep(delay)
            resumed = _size_or_zero(part)
            if resumed:
                log(f"  resuming {dest.name} at {resumed:,} bytes from {url}")
            else:
                log(f"  downloading {url}")
            try:
                _download_once(
                    url,
                    part,
                    expected_size=expected_size,
                    timeout=timeout,
                    progress=progress,
                    desc=dest.name,
                )
                return part
            except urllib.error.HTTPError as exc:
                last_exc = exc
                reason = f"HTTP {exc.code} {exc.reason}"
                exc.close()
                if exc.code not in _TRANSIENT_HTTP:
                    failures.append(f"{url}: {reason}")
                    break
                log(f"  {url}: {reason}")
            except _Incomplete as exc:
                last_exc = exc
                log(f"  {url}: {exc}")
            except _NETWORK_ERRORS as exc:
                last_exc = exc
                log(f"  {url}: {_describe(exc)}")
        else:
            failures.append(
                f"{url}: {_describe(last_exc)} (after {retries + 1} attempts)"
            )
    raise DownloadError(
        f"could not download {dest.name}:\n    " + "\n    ".join(failures)
    ) from last_exc


def _describe(exc: BaseException | None) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        return f"{type(exc.reason).__name__}: {exc.reason}"
    return f"{type(exc).__name__}: {exc}"


def file_digest(path: Path, algo: str = "sha256", *, progress: bool = False) -> str:
    """Hex digest of a file, read in chunks."""
    digest = hashlib.new(algo)
    with (
        open(path, "rb") as source,
        tqdm(
            total=path.stat().st_size,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=f"{algo} {path.name}",
            disable=not progress,
            leave=False,
        ) as bar,
    ):
        while chunk := source.read(CHUNK_SIZE):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def verify_file(
    path: Path,
    spec: DatasetSpec,
    *,
    display_name: str | None = None,
    progress: bool = False,
) -> None:
    """Check size and digest of ``path`` against ``spec``; a bad file is renamed ``*.bad``.

    ``display_name`` is the file's final name (the part file is checked before its rename).
    Raises :class:`ChecksumError` naming the file, the expected and the actual value.
    """
    name = display_name or path.name
    problem = None
    if spec.size is not None:
        actual_size = path.stat().st_size
        if actual_size != spec.size:
            problem = f"size mismatch for {name}: expected {spec.size} bytes, got {actual_size}"
    if problem is None and spec.checksum is not None:
        actual = file_digest(path, spec.checksum_algo, progress=progress)
        if actual.lower() != spec.checksum.lower():
            problem = (
                f"{spec.checksum_algo} mismatch for {name}: "
                f"expected {spec.checksum.lower()}, got {actual}"
            )
    if problem is not None:
        bad = path.with_name(name + ".bad")
        os.replace(path, bad)
        raise ChecksumError(
            f"{problem}. The file was kept as {bad} and will not be used; "
            "delete it and run again (or check the mirror/URL)."
        )


# --------------------------------------------------------------------------------------------
# extraction


def count_images(folder: Path, suffixes: Iterable[str] = (".png",)) -> int:
    """Number of image files directly inside ``folder`` (0 if it does not exist)."""
    suffixes = tuple(s.lower() for s in suffixes)
    if not folder.is_dir():
        return 0
    return sum(
        1 for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(suffixes)
    )


def _member_path(name: str) -> PurePosixPath:
    """The archive member name as a relative path; raise on anything that could escape."""
    if "\\" in name or "\x00" in name:
        raise DownloadError(
            f"unsafe archive member {name!r} (backslash or NUL in name)"
        )
    path = PurePosixPath(name)
    if (
        path.is_absolute()
        or ".." in path.parts
        or (path.parts and ":" in path.parts[0])
    ):
        raise DownloadError(f"unsafe archive member {name!r} (absolute path or '..')")
    return path


def _wanted(path: PurePosixPath, spec: DatasetSpec) -> bool:
    member_dir = PurePosixPath(spec.member_dir.strip("/"))
    parent = path.parent
    depth = len(member_dir.parts)
    return (
        path.name.lower().endswith(spec.image_suffixes)
        and not path.name.startswith(".")
        and parent.parts[-depth:] == member_dir.parts
    )


def extract_archive(
    archive: Path, spec: DatasetSpec, target: Path, *, log: Log = print
) -> int:
    """Extract the images of ``spec`` from a zip archive into ``target`` (atomically).

    Images are written to a hidden temporary folder beside ``target`` that is renamed to
    ``target`` only after the expected images are all there. Returns the number of images.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.partial-*"):
        shutil.rmtree(
            stale, ignore_errors=True
        )  # left behind by an interrupted earlier run
    try:
        zf = zipfile.ZipFile(archive)
    except zipfile.BadZipFile as exc:
        raise DownloadError(
            f"{archive} is not a valid zip archive ({exc}); delete it"
        ) from exc
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        names: set[str] = set()
        with zf:
            for info in zf.infolist():
                path = _member_path(info.filename)
                if info.is_dir() or not _wanted(path, spec):
                    continue
                if stat.S_ISLNK(info.external_attr >> 16):
                    continue  # never materialise links from an archive
                if path.name in names:
                    raise DownloadError(f"{archive}: duplicate image {path.name!r}")
                names.add(path.name)
                with zf.open(info) as source, open(tmp / path.name, "wb") as sink:
                    shutil.copyfileobj(source, sink, CHUNK_SIZE)
        _check_images(names, spec, where=str(archive))
        if target.exists():
            target.rmdir()  # only an empty folder can get here (see download_dataset)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"  extracted {len(names)} images into {target}")
    return len(names)


def _check_images(names: set[str], spec: DatasetSpec, *, where: str) -> None:
    if len(names) != spec.num_images:
        raise DownloadError(
            f"{where}: found {len(names)} images under {spec.member_dir!r}, "
            f"expected {spec.num_images}"
        )
    if spec.expected_names is not None and names != spec.expected_names:
        missing = sorted(spec.expected_names - names)[:5]
        raise DownloadError(f"{where}: unexpected image names; missing e.g. {missing}")


# --------------------------------------------------------------------------------------------
# datasets


def _manual_hint(spec: DatasetSpec, root: Path) -> str:
    return (
        f"If this machine has no internet access, copy the {spec.num_images} images of "
        f"{spec.name} into {root / spec.target}/ by hand, or put {spec.filename} into "
        f"{root / DOWNLOADS_DIR}/ and run again."
    )


def download_dataset(
    spec: DatasetSpec,
    root: str | os.PathLike[str] = "data",
    *,
    verify: bool = True,
    keep_archive: bool = False,
    retries: int = 5,
    backoff: float = 1.0,
    timeout: float = 60.0,
    progress: bool = True,
    log: Log = print,
) -> Path:
    """Make ``<root>/<spec.target>`` hold the dataset's images; return that folder.

    A folder that already holds ``spec.num_images`` images is left alone (nothing is fetched).
    Otherwise the archive is downloaded into ``<root>/downloads`` (resuming a ``.part`` file),
    verified (size and checksum where pinned, unless ``verify`` is false) and extracted; the
    archive is deleted afterwards unless ``keep_archive``.
    """
    root = Path(root)
    target = root / spec.target
    have = count_images(target, spec.image_suffixes)
    if have == spec.num_images:
        log(f"{spec.name}: {target} already has {have} images, skipping")
        return target
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise DownloadError(
            f"{spec.name}: {target} exists but holds {have} images instead of "
            f"{spec.num_images}; move or delete it and run again"
        )
    log(f"{spec.name}: {spec.description or spec.filename}")
    downloads = root / DOWNLOADS_DIR
    archive = downloads / spec.filename
    pinned = spec.checksum is not None or spec.size is not None
    if not pinned:
        log(
            f"  note: no checksum pinned for {spec.filename}; checking the extracted images instead"
        )
    elif not verify:
        log(f"  note: --no-verify given, not checking {spec.filename}")
    if archive.exists():
        log(f"  using existing {archive}")
        if verify and pinned:
            verify_file(archive, spec, progress=progress)
    else:
        try:
            part = fetch(
                spec.urls,
                archive,
                expected_size=spec.size if verify else None,
                retries=retries,
                backoff=backoff,
                timeout=timeout,
                progress=progress,
                log=log,
            )
        except DownloadError as exc:
            raise DownloadError(
                f"{spec.name}: {exc}\n{_manual_hint(spec, root)}"
            ) from exc
        if verify and pinned:
            verify_file(part, spec, display_name=archive.name, progress=progress)
        os.replace(part, archive)
    extract_archive(archive, spec, target, log=log)
    if not keep_archive:
        archive.unlink()
    return target


def download_all(
    names: Iterable[str],
    root: str | os.PathLike[str] = "data",
    *,
    manifest: dict[str, DatasetSpec] | None = None,
    **kwargs,
) -> list[Path]:
    """:func:`download_dataset` for each name (looked up in ``manifest``, default :data:`MANIFEST`)."""
    manifest = MANIFEST if manifest is None else manifest
    specs = [_lookup(name, manifest) for name in names]
    return [download_dataset(spec, root, **kwargs) for spec in specs]


def _lookup(name: str, manifest: dict[str, DatasetSpec]) -> DatasetSpec:
    try:
        return manifest[name]
    except KeyError:
        raise DownloadError(
            f"unknown dataset {name!r}; choose from {', '.join(manifest)}"
        ) from None
