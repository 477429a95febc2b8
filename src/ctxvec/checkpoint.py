"""Crash-safe files: atomic writes, and training checkpoints in safetensors + JSON.

Every file is written to a temporary name in its own folder, flushed and fsynced, renamed
over the target, and the folder fsynced: a reader sees the old file or the new one, never a
half-written one. A checkpoint is a folder ``checkpoints/step-NNNNNNNN/`` made complete under
a temporary name before it is renamed into place; the file ``latest.json`` (written
atomically, last) names the newest complete one. Nothing is ever pickled.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

LATEST = "latest.json"


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


def _fsync_file(path: Path) -> None:
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
        _fsync_file(tmp)
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


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file``, with its I/O failures raised as ``OSError`` (errno kept)."""
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o666))
    mode = os.stat(path).st_mode & 0o777  # what the umask gives a new file
    try:
        save_file(contiguous, str(path), metadata=metadata)
        os.chmod(path, mode)  # safetensors renames a 0600 temporary file of its own onto ``path``
    except SafetensorError as err:  # "... I/O error: File too large (os error 27)"
        code = re.search(r"\(os error (\d+)\)", str(err))
        if code is None:
            raise
        raise OSError(int(code[1]), os.strerror(int(code[1])), str(path)) from None


def atomic_save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    atomic_write(path, lambda tmp: save_tensors(tensors, tmp, metadata))


# ---- tied weights ------------------------------------------------------------------------------

def tied_aliases(module: torch.nn.Module) -> dict[str, str]:
    """Second and later names of a parameter that several modules share -> its first name."""
    first: dict[int, str] = {}
    aliases = {}
    for name, parameter in module.named_parameters(remove_duplicate=False):
        if id(parameter) in first:
            aliases[name] = first[id(parameter)]
        else:
            first[id(parameter)] = name
    return aliases


def unique_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``state_dict()`` with each tied tensor once (safetensors refuses tensors that share memory)."""
    state = module.state_dict()
    for alias in tied_aliases(module):
        state.pop(alias, None)
    return state


def with_aliases(state: dict[str, torch.Tensor], module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The inverse of ``unique_state``: every name of a tied tensor, for a strict load."""
    state = dict(state)
    for alias, name in tied_aliases(module).items():
        if name in state:
            state.setdefault(alias, state[name])
    return state


# ---- optimizer state <-> tensors + JSON ---------------------------------------------------

def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors = {}
    for index, values in state["state"].items():
        for name, value in values.items():
            tensors[f"state.{index}.{name}"] = value if isinstance(value, torch.Tensor) else torch.tensor(value)
    return tensors, {"param_groups": state["param_groups"]}


def optimizer_from_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                           meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


# ---- checkpoints --------------------------------------------------------------------------

def save_checkpoint(run: Path, step: int, tensors: dict[str, dict[str, torch.Tensor]],
                    meta: dict[str, Any], keep: int = 2) -> Path:
    """Write ``checkpoints/step-NNNNNNNN/{name}.safetensors`` + ``state.json``, then ``latest.json``."""
    root = run / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".{final.name}.{secrets.token_hex(4)}.tmp"
    try:
        os.mkdir(tmp, 0o777)  # the umask applies, as to any folder (mkdtemp would make it 0700)
        for name, group in tensors.items():
            save_tensors(group, tmp / f"{name}.safetensors")
            _fsync_file(tmp / f"{name}.safetensors")
        (tmp / "state.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        _fsync_file(tmp / "state.json")
        fsync_dir(tmp)
        if final.exists():  # a checkpoint of the same step from an earlier, interrupted run
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(root)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(final, err, "cannot write the checkpoint") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(run / LATEST, json.dumps({"step": step, "path": f"checkpoints/{final.name}"}) + "\n")
    old = sorted(p for p in root.glob("step-*") if p.is_dir() and p != final)
    for stale in old[: max(0, len(old) - (keep - 1))]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def load_checkpoint(run: Path) -> tuple[int, dict[str, dict[str, torch.Tensor]], dict[str, Any]] | None:
    """(step, tensors by file name, state.json) of the newest complete checkpoint, or None."""
    pointer = run / LATEST
    if not pointer.is_file():
        return None
    latest = json.loads(pointer.read_text(encoding="utf-8"))
    folder = run / latest["path"]
    meta = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    tensors = {p.stem: load_file(str(p)) for p in folder.glob("*.safetensors")}
    return int(latest["step"]), tensors, meta
