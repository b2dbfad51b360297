"""Writing files so that a reader never sees half of one: every file circuitdyn writes goes through here.

A file is written to a uniquely named temporary sibling (so concurrent writers never share one), flushed
to disk (fsync), then renamed over the target in one step; on any error the temporary file is removed and
the target is left as it was. Folders are built the same way (`atomic_dir`).

Where two runs could compute the same result, `file_lock` makes the second wait for the first (and then
reuse its file); `check_writable` tells before any computing whether an output location can be written.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from circuitdyn.errors import CircuitdynError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a unique temporary path beside `path`; when the block finishes, it is fsynced and renamed to `path`.

    OS errors (a read-only folder, a full disk, a file where a folder should be) become a CircuitdynError
    naming the path; the target is untouched then.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as err:
        raise CircuitdynError(f"{path}: cannot write here ({err.strerror or err})") from None
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a result file gets the usual permissions
        _fsync(tmp)
        os.replace(tmp, path)
    except OSError as err:
        raise CircuitdynError(f"{path}: writing failed ({err.strerror or err}); earlier results are kept") from None
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write a UTF-8 text file atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    """Write JSON atomically."""
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder that becomes `target` only if the block finishes."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _nearest_existing(path: Path) -> Path:
    for parent in (path, *path.parents):
        if parent.exists() or parent.is_symlink():
            return parent
    return Path(".")


def check_writable(path: str | Path, kind: str = "file", *, flag: str = "") -> Path:
    """Check, before any work, that `path` can be written as a `kind` ("file" or "folder"): that it is not a
    folder where a file is expected (or a file where a folder is), that no file blocks a parent folder, and
    that a file can be created in its nearest existing folder (a trial file, removed at once). Creates
    nothing that stays. `flag` names the option the path came from (e.g. "--out") in the message."""
    path = Path(path).expanduser()
    what = f"{flag} {path}" if flag else str(path)
    if path.is_dir() and kind == "file":
        raise CircuitdynError(f"{what}: is a folder; a file is expected here")
    if path.exists() and not path.is_dir() and kind == "folder":
        raise CircuitdynError(f"{what}: is a file; a folder is expected here")
    base = _nearest_existing(path if kind == "folder" else path.parent)
    if not base.is_dir():
        raise CircuitdynError(f"{what}: cannot be created, {base} is a file, not a folder")
    try:
        fd, trial = tempfile.mkstemp(prefix=".circuitdyn-write-test.", dir=base)
        os.close(fd)
        os.unlink(trial)
    except OSError as err:
        raise CircuitdynError(f"{what}: cannot write in {base} ({err.strerror or err})") from None
    return path


def remove_stale_temps(path: str | Path, pattern: str | None = None) -> list[Path]:
    """Remove the temporary files a killed writer left beside `path` (`.<name>.*.tmp`; or those matching
    `pattern` in the folder `path`). Call it only while holding the lock of what they belong to: then no live
    writer owns them."""
    path = Path(path)
    stale = sorted(path.glob(pattern) if pattern else path.parent.glob(f".{path.name}.*.tmp"))
    for f in stale:
        f.unlink(missing_ok=True)
    return stale


def lock_path(path: str | Path) -> Path:
    """The lock file of a result path: a hidden sibling `.<name>.lock`."""
    path = Path(path)
    return path.with_name(f".{path.name}.lock")


@contextlib.contextmanager
def file_lock(path: str | Path, *, wait: bool = True, what: str = "this result") -> Iterator[None]:
    """Hold an exclusive lock (`fcntl.flock` on `lock_path(path)`) while computing and writing `path`, so two
    processes never compute the same result at once: with `wait` the second blocks until the first is done
    (then finds its file), without it the second fails at once with a CircuitdynError. The lock dies with its
    process, so a killed run never leaves a stale lock; the empty lock file stays (removing it would race)."""
    lock = lock_path(path)
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise CircuitdynError(f"{lock}: cannot create the lock file ({err.strerror or err})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError as err:
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise CircuitdynError(
                    f"{path}: another circuitdyn process is writing {what} (lock {lock}); "
                    "wait for it to finish, or choose another output"
                ) from None
            raise
        yield
    finally:
        os.close(fd)


def cache_dir() -> Path:
    """Where circuitdyn keeps built models and other reusable work: `$CIRCUITDYN_CACHE` or ~/.cache/circuitdyn."""
    return Path(os.environ.get("CIRCUITDYN_CACHE") or Path.home() / ".cache" / "circuitdyn").expanduser()
