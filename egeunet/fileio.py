"""Small file helpers shared by the package: atomic writes, folder locks and hashing."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

TEMPORARY_SUFFIX = ".tmp"


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success it replaces ``path`` atomically,
    on error it is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, mode, **kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def remove_temporaries(folder: str | os.PathLike, name: str = "*") -> list[Path]:
    """Delete the temporary files :func:`atomic_open` left in ``folder`` for files named
    ``name`` (a glob pattern) when its process was killed (``.<name>.<random>.tmp``);
    returns them. Call it only while no other process writes those files (e.g. holding
    the folder's :func:`folder_lock`)."""
    removed = []
    for leftover in Path(folder).glob(f".{name}.*{TEMPORARY_SUFFIX}"):
        if leftover.is_file() and not leftover.is_symlink():
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()
                removed.append(leftover)
    return removed


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as handle:
        handle.write(text)


def json_safe(data: Any) -> Any:
    """``data`` with every NaN or infinite float (nested in dicts, lists, tuples) as None.

    Strict JSON has no NaN: readers other than Python's (``jq``, JavaScript, R's jsonlite
    in strict mode) reject the bare ``NaN`` token ``json.dumps`` writes by default.
    """
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {key: json_safe(value) for key, value in data.items()}
    if isinstance(data, list | tuple):
        return [json_safe(value) for value in data]
    return data


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as strict JSON: undefined (NaN or infinite) numbers become null."""
    text = json.dumps(json_safe(data), indent=2, sort_keys=False, default=str, allow_nan=False)
    write_text_atomic(path, text + "\n")


def is_writable_folder(folder: str | os.PathLike) -> bool:
    """An existing folder we may write to that is not marked read-only: root may write
    anywhere, so the permission bits still decide whether a folder is meant to be written
    (a shared data folder, a published checkpoint's folder)."""
    folder = Path(folder)
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        return False
    return bool(folder.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def require_writable(path: str | os.PathLike, what: str) -> None:
    """ValueError naming ``what`` unless ``path``, or the nearest folder above it that
    exists (where it would be created), is a writable folder."""
    path = Path(path).expanduser().absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if is_writable_folder(existing):
        return
    if existing == path:
        raise ValueError(f"{what} {path} is read-only or not a folder; choose a writable folder")
    raise ValueError(f"{what} {path} cannot be created: {existing} is read-only")


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists. Without a safe probe (Windows, where ``os.kill``
    terminates the process) every process counts as alive, so nothing in use is removed."""
    if os.name != "posix":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


class FolderBusy(ValueError):
    """Another live process holds the lock of a folder."""


@contextlib.contextmanager
def folder_lock(path: str | os.PathLike, what: str, *, wait: bool = False) -> Iterator[None]:
    """Hold the lock file ``path`` (it records our process id) while the block runs.

    A second holder waits (``wait``) or gets :class:`FolderBusy` naming ``what`` and the
    process id of the holder. The lock is the operating system's (``fcntl.flock``): it
    dies with its process, so a lock file left by a killed process is stale and simply
    taken over; the file is removed when the lock is released. Where ``fcntl`` is absent
    (Windows) the block runs unlocked.
    """
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = _locked_descriptor(path, fcntl, wait)
    if descriptor is None:
        holder = lock_holder(path)
        by = f"process {holder}" if holder is not None else "another process"
        raise FolderBusy(
            f"{what} is in use by {by} (lock file {path}); wait for it to finish or stop it"
        )
    try:
        os.ftruncate(descriptor, 0)
        os.write(descriptor, f"{os.getpid()}\n".encode())
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # before unlocking: a waiter then sees a new file and retries
        fcntl.flock(descriptor, fcntl.LOCK_UN)
        os.close(descriptor)


def _locked_descriptor(path: Path, fcntl: Any, wait: bool) -> int | None:
    """An open descriptor of ``path`` holding its exclusive lock; None if it is held and
    ``wait`` is false. Retries when the holder before us removed the file meanwhile."""
    while True:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(descriptor)
            return None
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        if current is not None and os.path.samestat(os.fstat(descriptor), current):
            return descriptor
        os.close(descriptor)
        time.sleep(0.01)


def lock_holder(path: str | os.PathLike) -> int | None:
    """The process id a lock file records, if it records one."""
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_json(data: Any) -> str:
    """Hash of a JSON-serialisable value, independent of key order."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()
