"""Files that are either complete or absent: no reader ever sees a half-written result.

A result is written to a hidden temporary beside its target, ``.<name>.<host>.<pid>.<token>.tmp``,
and renamed over the target when complete. A process killed mid-write (SIGKILL, out of memory, a
cluster's time limit) cannot remove its temporary, so every write first removes the stale
temporaries of the same target (:func:`remove_stale_temporaries`): those of a process of this
machine that no longer runs, and those older than :data:`STALE_AFTER_S` (a temporary of another
machine, whose processes cannot be checked from here, on a shared file system; or one of an older
naming). Temporaries of live writers are left alone.
"""

from __future__ import annotations

import glob
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["STALE_AFTER_S", "atomic_path", "remove_stale_temporaries", "temporary_name"]

log = logging.getLogger(__name__)

#: Age (seconds, by mtime) after which a temporary whose writer cannot be checked is stale: a day,
#: far longer than any single write takes (the largest, an evaluation-set cache, takes minutes).
STALE_AFTER_S = 24 * 3600

_HOST = socket.gethostname().replace("/", "_") or "host"


def temporary_name(path: Path) -> Path:
    """A fresh temporary path for ``path``: ``.<name>.<host>.<pid>.<token>.tmp`` in its folder."""
    return path.with_name(f".{path.name}.{_HOST}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    except OSError:
        return True
    return True


def _writer(tmp: Path, target: Path) -> tuple[str, int] | None:
    """``(host, pid)`` from a temporary's name, or None for a name of another form."""
    middle = tmp.name[len(target.name) + 2 : -len(".tmp")]  # between ".<name>." and ".tmp"
    parts = middle.rsplit(".", 2)
    if len(parts) != 3 or not parts[1].isdigit():
        return None
    return parts[0], int(parts[1])


def remove_stale_temporaries(path: str | Path, *, now: float | None = None) -> list[Path]:
    """Remove the temporaries of ``path`` left by writers that were killed; return those removed.

    Stale: written by a process of this machine that no longer exists, or (any writer) last
    modified more than :data:`STALE_AFTER_S` seconds ago. A temporary vanishing meanwhile (another
    process cleaning) is not an error.
    """
    path = Path(path)
    now = time.time() if now is None else now
    removed = []
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        writer = _writer(tmp, path)
        try:
            old = now - tmp.stat().st_mtime > STALE_AFTER_S
            dead = writer is not None and writer[0] == _HOST and not _pid_alive(writer[1])
            if old or dead:
                size = tmp.stat().st_size
                tmp.unlink()
                removed.append(tmp)
                log.info("removed %s (%d bytes), left by an interrupted write of %s", tmp, size, path.name)
        except FileNotFoundError:
            continue
    return removed


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically.

    On an exception the temporary file is removed and ``path`` is left as it was. Stale
    temporaries of ``path`` left by killed writers are removed first (:func:`remove_stale_temporaries`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    # a unique name opened normally (not mkstemp), so the file gets the usual umask permissions
    tmp = temporary_name(path)
    tmp.touch(exist_ok=False)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
