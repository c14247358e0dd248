"""Small file helpers shared by every artefact writer: hashing, atomic writes, file locks."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

try:  # POSIX advisory locks; elsewhere the lock is a no-op
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

_CHUNK = 1 << 20
TEMP_SUFFIX = ".tmp"


# errno values of a write that found no room: full disk, over quota, over the file size limit
NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def is_no_space(exc: BaseException) -> bool:
    """True for a write that failed for lack of space (also when a library such as HDF5 or
    torch wrapped the OSError into its own message)."""
    if isinstance(exc, OSError) and exc.errno in NO_SPACE_ERRNOS:
        return True
    text = str(exc)
    return (any(f"errno = {e}," in text for e in NO_SPACE_ERRNOS)
            or "No space left" in text or "Disk quota exceeded" in text)


def no_space_message(path: str | os.PathLike[str] | None, needed: int | None = None,
                     what: str = "write") -> str:
    """One line for a full disk: the path, the space needed (when known) and what is free."""
    where = Path(path) if path else Path.cwd()
    folder = where if where.is_dir() else where.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        free = f"{shutil.disk_usage(folder).free / 1e6:,.1f} MB free"
    except OSError:
        free = "free space unknown"
    need = f"free at least {needed / 1e6:,.1f} MB" if needed else "free some space"
    return (f"disk full: cannot {what} {where}: {need} on {folder} (now {free}) and re-run "
            "the same command; what was written before is kept")


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fsync_path(path: str | os.PathLike[str]) -> None:
    """fsync a file or a folder (a folder's entry list: a rename is durable only then)."""
    is_dir = Path(path).is_dir()
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if is_dir else 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # pragma: no cover - a folder that cannot be opened on this system
        if is_dir:
            return
        raise
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a folder; a file must sync
        if not is_dir:
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync it, rename it onto `path` and
    fsync the folder, so that after a crash or power loss `path` holds either the old or the
    new complete content. A killed writer leaves ``.<name>.<random>.tmp`` behind; owners of a
    folder remove those with `remove_temp_files`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        fsync_path(tmp_path)
        os.replace(tmp_path, path)
        fsync_path(path.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def remove_temp_files(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete the ``.<name>.*.tmp`` files that killed `atomic_path` writers left in `folder`
    (only call it while holding the folder's lock: a live writer's temp file looks the same).
    Returns the files removed."""
    removed = []
    for p in sorted(Path(folder).glob(f".*{TEMP_SUFFIX}")):
        if p.is_file() and not p.is_symlink():
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed.append(p)
    return removed


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    # numpy scalars and arrays, Paths
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


class FileLock:
    """Non-blocking ``flock`` on a lock file: exclusive for writers, shared for readers.

    The kernel releases it when the process dies, so a killed run never leaves a stale lock.
    When another process holds it, `acquire` raises ``busy(lock_path, exclusive)`` (a message
    that says who is busy and what to do). A shared lock on a file nobody ever created is
    a no-op.
    """

    def __init__(self, path: str | os.PathLike[str], exclusive: bool,
                 busy: Callable[[Path, bool], Exception]) -> None:
        self.path = Path(path)
        self.exclusive = exclusive
        self.busy = busy
        self._fd: int | None = None

    def acquire(self) -> None:
        if fcntl is None:
            return
        if not self.exclusive and not self.path.exists():
            return
        flags = os.O_RDWR | os.O_CREAT if self.exclusive else os.O_RDONLY
        self._fd = os.open(self.path, flags, 0o644)
        mode = fcntl.LOCK_EX if self.exclusive else fcntl.LOCK_SH
        try:
            fcntl.flock(self._fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            self._fd = None
            raise self.busy(self.path, self.exclusive) from None

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)  # type: ignore[union-attr]
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
