"""Crash-safe files: atomic writes, one-line write errors, an exclusive lock, careful reads.

Every file ctxvec writes goes to a temporary name in its own folder, is flushed and fsynced,
renamed over the target, and the folder fsynced: a reader sees the old file or the new one,
never a half-written one. A failed write (a full disk, a file size limit, a read-only folder)
leaves no temporary file and raises ``OutputError``, one line that names the file. New files
get the permissions the umask gives any new file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class OutputError(OSError):
    """A file could not be written; the message names the file and says why, in one line."""


def write_error(path: Path, err: OSError, action: str = "cannot write") -> OutputError:
    """``err`` from writing ``path`` as one line a person can act on (a full disk says how full)."""
    if err.errno == errno.ENOSPC:
        free = shutil.disk_usage(path.parent).free if path.parent.exists() else 0
        why = f"no space left on the device ({format_bytes(free)} free in {path.parent})"
    elif err.errno == errno.EFBIG:
        why = "the file would exceed this process's file size limit (ulimit -f)"
    else:
        why = (err.strerror or str(err)).lower() if err.errno else str(err)
    error = OutputError(f"{action} {path}: {why}.")
    error.errno = err.errno
    return error


def format_bytes(n: float) -> str:
    for unit in ("bytes", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError  # unreachable


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def new_temporary(path: Path) -> Path:
    """An empty file beside ``path`` under a hidden random name.

    Created with mode 0666 less the umask, as any new file is (``tempfile.mkstemp`` makes 0600
    files, which the rename would hand on to the user's output).
    """
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


def atomic_write(path: str | Path, write) -> None:
    """Write ``path`` through ``write(tmp_path)`` atomically (same-folder temp, fsync, rename).

    A reader sees the old file or the new one, never a half-written one; a failed write
    (full disk, file size limit, read-only folder) leaves no temporary file behind and raises
    ``OutputError`` naming ``path``.
    """
    path = Path(path)
    tmp = None
    try:
        tmp = new_temporary(path)
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as err:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        if isinstance(err, OutputError):
            raise
        raise write_error(path, err) from None
    except BaseException:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def exclusive_lock(target: Path, what: str, lock: Path | None = None) -> Iterator[None]:
    """Hold a lock on ``target`` for the duration (``fcntl.flock``, never waits).

    The lock file is ``lock``, by default ``.NAME.lock`` beside ``target`` (a folder locks a
    file inside itself). A second job on the same target is refused at once instead of racing
    the first one. The lock file is removed when the job ends; an inode check makes sure a job
    never holds a lock file another job has just removed. Errors name ``target``, never the
    hidden lock file.
    """
    lock = lock or target.with_name(f".{target.name}.lock")
    try:
        fd = _acquire(lock, target, what)
    except OSError as err:
        raise write_error(target, err, "cannot lock") from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)


def _acquire(lock: Path, target: Path, what: str) -> int:
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            pid = f" (process {holder})" if holder.isdigit() else ""
            raise ValueError(f"another job{pid} is writing {target}; wait for it to finish, or choose "
                             f"another {what}.") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the previous holder removed this file after we opened it: start again


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def read_json(path: Path, expect: type = dict) -> Any:
    """A JSON file that must hold an ``expect`` (an object, or a list); errors name the file."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise ValueError(f"cannot read {path}: {err}") from None
    if not isinstance(value, expect):
        raise ValueError(f"{path} must hold a JSON {'object' if expect is dict else 'list'}, "
                         f"not a {type(value).__name__}.")
    return value
