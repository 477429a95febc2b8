"""Weights in safetensors files, read and written strictly (nothing is ever unpickled).

Loading is strict: every missing, unexpected, mis-shaped, non-float or non-finite tensor is an
error that names the key, and a model is held against a file's header on the "meta" device
before anything is allocated (``load_model``).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ctxvec.files import atomic_write

WEIGHTS_FILE = "model.safetensors"


class WeightsError(ValueError):
    """A weights file that does not fit the model (names the key) or cannot be read."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_sha256(path: Path, expected: str, source: str) -> None:
    """``path`` must exist and have sha256 ``expected``; else a one-line error that says to
    reinstall ``source`` (the package that ships it)."""
    if not path.is_file():
        raise ValueError(f"{path} is missing; reinstall {source}.")
    digest = sha256_of(path)
    if digest != expected:
        raise ValueError(f"{path} has sha256 {digest}, expected {expected}: the file is corrupt or not the "
                         f"one {source} ships; reinstall {source}.")


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


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, with a clear error for a broken file."""
    _require_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise WeightsError(f"{path} is not a readable safetensors file: {err}") from None


def read_safetensors_shapes(path: Path) -> dict[str, torch.Tensor]:
    """The tensors a safetensors file declares, as empty "meta" tensors of their shapes: its header
    only, nothing allocated (the data is checked when it is read)."""
    _require_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: torch.empty(f.get_slice(key).get_shape(), device="meta") for key in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise WeightsError(f"{path} is not a readable safetensors file: {err}") from None


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise WeightsError(f"no weights file at {path} (ctxvec reads safetensors only, never pickles).")


def load_model(make: Callable[[], nn.Module], path: Path, n_layers: int,
               rename: Callable[[dict[str, torch.Tensor], nn.Module], dict[str, torch.Tensor]] = lambda t, m: t,
               ) -> nn.Module:
    """``make()`` a model of ``n_layers`` layers in all and fill it from the safetensors file
    ``path``, strictly.

    The model is first made on the "meta" device (shapes, no memory) and held against the file's
    header: a config that disagrees with the weights (a vocabulary of 10^12 rows, say) is an
    error naming the key before anything is allocated. ``rename(tensors, model)`` maps the
    file's keys to the model's.
    """
    declared = read_safetensors_shapes(path)
    if n_layers > len(declared):  # every layer has several tensors: not even the skeleton is made
        raise WeightsError(f"{path} holds {len(declared)} tensors, too few for the {n_layers} layers of "
                           "the model its config describes; the config does not match the weights.")
    with torch.device("meta"):
        skeleton = make()
    check_state_keys(skeleton, rename(declared, skeleton), str(path))
    model = make()
    load_state_strict(model, rename(read_safetensors(path), model), str(path))
    return model


def check_state_keys(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Every key of ``model`` present in ``state``, none extra, every shape equal."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise WeightsError(f"{source}: missing key(s) {missing[:8]}; unexpected key(s) {unexpected[:8]}")
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise WeightsError(f"{source}: {key} has shape {tuple(tensor.shape)}, the model "
                               f"expects {tuple(expected[key].shape)}.")


def load_state_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy ``state`` into ``model``: every key present, none extra, shapes equal, floats only."""
    check_state_keys(model, state, source)
    expected = model.state_dict()
    for key, tensor in state.items():
        if not tensor.dtype.is_floating_point:
            raise WeightsError(f"{source}: {key} has dtype {tensor.dtype}; weights must be floating point.")
        if not torch.isfinite(tensor).all():
            raise WeightsError(f"{source}: {key} contains NaN or infinite values.")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)
