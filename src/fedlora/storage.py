"""Safe writing: atomic files, a lock per run directory, and what ``--overwrite`` may remove.

Three promises, relied on by :class:`fedlora.report.RunDir`, checkpoints and the commands that write tables:

* **Atomic files.** :func:`atomic_write` writes a temporary file, fsyncs it and renames it over the target, so a
  crash leaves either the old file or the new one. When the write fails (a full disk, a read-only mount), the
  temporary file is removed and a :class:`StorageError` names the file and the reason; the old file is intact.
* **One writer per run directory.** :class:`DirLock` holds an exclusive ``flock`` on ``<dir>/.fedlora.lock``
  while a process works in the directory. The kernel releases it when the process ends, however it ends
  (SIGKILL included), so a lock is never stale; a second process is refused with the holder's PID.
* **Only our own files are removed.** :func:`foreign_entries` lists what in a folder fedlora did not write;
  ``--overwrite`` refuses a folder that holds any, and removes only :data:`RUN_ENTRIES` otherwise.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
from pathlib import Path
from typing import Callable, Iterable

from fedlora.errors import FedloraError

LOCK_FILE = ".fedlora.lock"
MARKER_FILE = ".fedlora-run"  # written first into every run directory: "this folder is fedlora's"

# Everything a run writes at the top level of its directory. --overwrite removes these and nothing else.
RUN_ENTRIES = frozenset({
    MARKER_FILE, LOCK_FILE, "config.toml", "metrics.jsonl", "summary.json", "resumes.jsonl", "clients", "global",
    "checkpoint", "samples", "tensorboard", "flower",
})


class StorageError(FedloraError):
    """A file could not be written (full disk, read-only place, not a directory); nothing was left half-written."""


class RunLocked(FedloraError):
    """Another process is working in the run directory."""


def describe_os_error(e: OSError) -> str:
    """A short reason for a failed write, naming the usual remedies."""
    if e.errno == errno.ENOSPC:
        return "no space left on the device"
    if e.errno in (errno.EROFS,):
        return "the file system is read-only"
    if e.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if e.errno == errno.ENOTDIR:
        return "a part of the path is a file, not a directory"
    return e.strerror or str(e)


def _fsync_dir(path: Path) -> None:
    dir_fd = os.open(path, os.O_RDONLY)  # make a rename itself durable
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError:
        pass  # best effort: the error being reported matters more than this one


def atomic_write(path: Path, data: bytes | str, before_rename: Callable[[], None] | None = None) -> None:
    """Write via a temporary file, fsync and rename, so a crash never leaves half a file.

    A failed write removes the temporary file and raises :class:`StorageError`; ``path`` keeps its old content.
    """
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        if before_rename is not None:
            before_rename()
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as e:
        _unlink_quietly(tmp)
        raise StorageError(f"cannot write {str(path)!r}: {describe_os_error(e)}; "
                           f"its previous content (if any) is intact") from None


def append_line(path: Path, line: str) -> None:
    """Append one line durably; on failure the file is cut back to its previous length (no half line)."""
    try:
        size = path.stat().st_size if path.exists() else 0
    except OSError as e:
        raise StorageError(f"cannot write {str(path)!r}: {describe_os_error(e)}") from None
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        try:
            os.truncate(path, size)
        except OSError:
            pass
        raise StorageError(f"cannot write {str(path)!r}: {describe_os_error(e)}; its previous lines are intact") \
            from None


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a completely written folder ``tmp`` to ``final`` (replacing an older ``final``)."""
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def foreign_entries(path: Path, allowed: Iterable[str] = RUN_ENTRIES) -> list[str]:
    """Names at the top of ``path`` that fedlora did not write (sorted; empty for a missing folder)."""
    if not path.is_dir():
        return []
    known = set(allowed)
    out = []
    for entry in path.iterdir():
        name = entry.name
        stem = name[: -len(".tmp")] if name.endswith(".tmp") else name[: -len(".old")] if name.endswith(".old") \
            else name
        if stem not in known:
            out.append(name)
    return sorted(out)


def nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists."""
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_writable_dir(path: Path, what: str) -> None:
    """Refuse, before any work, an output folder that could not be created or written.

    Walks up to the closest existing ancestor: it must be a directory, and a probe file must be creatable in
    it (permission bits alone say nothing when running as root, nor about read-only mounts). The probe is
    removed at once; nothing else is created.
    """
    base = nearest_existing(path)
    if not base.is_dir():
        raise StorageError(f"{what} {str(path)!r}: {str(base)!r} is a file, not a directory")
    probe = base / f".fedlora-probe-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        os.close(fd)
    except OSError as e:
        raise StorageError(f"{what} {str(path)!r} cannot be written: {describe_os_error(e)} in {str(base)!r}") \
            from None
    finally:
        _unlink_quietly(probe)


def check_output_dir(path: Path, what: str) -> None:
    """An output folder must be a folder (or not exist yet) in a place that can be written."""
    if path.exists() and not path.is_dir():
        raise StorageError(f"{what} {str(path)!r} exists and is not a directory")
    check_writable_dir(path, what)


class DirLock:
    """An exclusive lock on a directory for the life of this object (or of the process)."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / LOCK_FILE
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock or raise :class:`RunLocked` naming the holder's PID."""
        if self._fd is not None:
            return
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise StorageError(f"cannot lock {str(self.path.parent)!r}: {describe_os_error(e)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            finally:
                os.close(fd)
            raise RunLocked(f"{str(self.path.parent)!r} is in use by another fedlora process (PID {holder}); "
                            "wait for it to finish or stop it first") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
