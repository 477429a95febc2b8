"""Crash-safe files: atomic writes, and training checkpoints in safetensors + JSON.

Every file is written to a temporary name in its own folder, flushed and fsynced, renamed
over the target, and the folder fsynced: a reader sees the old file or the new one, never a
half-written one. A checkpoint is a folder ``checkpoints/step-NNNNNNNN/`` made complete under
a temporary name before it is renamed into place; the file ``latest.json`` (written
atomically, last) names the newest complete one. Nothing is ever pickled.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

LATEST = "latest.json"


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def atomic_write(path: str | Path, write) -> None:
    """Write ``path`` through ``write(tmp_path)`` atomically (same-folder temp, fsync, rename)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        _fsync_file(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(contiguous, str(tmp), metadata=metadata))


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
    tmp = Path(tempfile.mkdtemp(prefix=f".step-{step:08d}.", dir=root))
    try:
        for name, group in tensors.items():
            save_file({k: v.detach().contiguous().cpu() for k, v in group.items()}, str(tmp / f"{name}.safetensors"))
            _fsync_file(tmp / f"{name}.safetensors")
        (tmp / "state.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        _fsync_file(tmp / "state.json")
        fsync_dir(tmp)
        if final.exists():  # a checkpoint of the same step from an earlier, interrupted run
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(root)
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
