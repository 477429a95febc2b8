"""Training checkpoints in safetensors + JSON: weights, optimizer moments, step, RNG states.

A checkpoint is a folder ``checkpoints/step-NNNNNNNN/`` made complete under a temporary name
before it is renamed into place; the file ``latest.json`` (written atomically, last) names the
newest complete one. Nothing is ever pickled.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from ctxvec.files import fsync_file, atomic_write_text, fsync_dir, write_error
from ctxvec.weights.tensorfile import save_tensors

LATEST = "latest.json"


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
            fsync_file(tmp / f"{name}.safetensors")
        (tmp / "state.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        fsync_file(tmp / "state.json")
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
