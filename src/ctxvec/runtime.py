"""How the encoder runs: numeric precision, CPU threads, memory."""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

import torch
from torch import nn
from torch.nn import functional as F

log = logging.getLogger(__name__)

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}  # gelu: the exact erf form, as BERT uses

# The encoder pads its packed tokens to a multiple of this many rows when the oneDNN route
# below applies: oneDNN compiles (and keeps) one kernel per matrix shape, so row counts that
# change with every batch would each cost a compilation and memory that is never given back.
# 32: at most 32 shapes per weight up to 1,024 rows; measured 1% faster than 64, 1% slower
# than 16 (which allows twice the shapes).
ONEDNN_ROW_MULTIPLE = 32
_ONEDNN_BATCH_HINT = 1024  # the row count oneDNN chooses a repacked weight's blocking for
_packed = threading.local()  # .weights: {nn.Linear: repacked weight} inside ``using_repacked``

PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}


def precision_dtype(precision: str) -> torch.dtype:
    """"fp32" (exact: the reference libraries' numbers) or "bf16" (faster where the CPU has it)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}.")
    return PRECISIONS[precision]


def native_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether bf16 matrix multiplies run natively (CUDA, or a CPU with AVX512-BF16 / AMX)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def set_threads(threads: int | None) -> None:
    """Use ``threads`` CPU threads for PyTorch's kernels (None: leave PyTorch's choice)."""
    if threads is None:
        return
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise ValueError(f"threads must be a positive integer, got {threads!r}.")
    torch.set_num_threads(threads)



@lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc
        return None


def release_memory() -> None:
    """Give freed heap memory back to the system (glibc ``malloc_trim``; a no-op elsewhere).

    Batches of ever-different shapes leave glibc's heap fragmented, so a long job's resident
    memory creeps up although nothing is kept; trimming after each call keeps it flat.
    """
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


@lru_cache(maxsize=1)
def _native_bf16_cpu() -> bool:
    return native_bf16("cpu")


@lru_cache(maxsize=1)
def _has_onednn_linear() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _onednn_dtype(dtype: torch.dtype) -> bool:
    return _has_onednn_linear() and (
        dtype == torch.float32 or (dtype == torch.bfloat16 and _native_bf16_cpu()))


def onednn_rows(x: torch.Tensor, weight: torch.Tensor) -> int:
    """``ONEDNN_ROW_MULTIPLE`` if ``linear`` takes the oneDNN route for activations like ``x``
    against ``weight``, else 1: inference (no gradient) on a CPU, fp32, or bf16 where it is native.
    """
    if (x.device.type != "cpu" or x.dtype != weight.dtype or not _onednn_dtype(x.dtype)
            or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
        return 1
    return ONEDNN_ROW_MULTIPLE


def packed_row_multiple(x: torch.Tensor, weight: torch.Tensor) -> int:
    """The multiple the encoder rounds its packed token rows up to for activations like ``x``:
    ``ONEDNN_ROW_MULTIPLE`` wherever oneDNN runs the matrix multiplies (and keeps a kernel per
    shape): ``linear``'s inference route, and bf16 autocast on a CPU (training); else 1.
    """
    autocast_bf16 = (x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
                     and torch.get_autocast_dtype("cpu") == torch.bfloat16)
    return ONEDNN_ROW_MULTIPLE if autocast_bf16 or onednn_rows(x, weight) > 1 else 1


def repack_weights(module: nn.Module) -> dict[nn.Module, torch.Tensor]:
    """Copies of the weights of ``module``'s ``nn.Linear`` layers repacked into oneDNN's blocked
    layout, for ``using_repacked``: the GEMMs of ``linear`` then run ~10% faster in bf16 (~6% in
    fp32), with the same numbers. Repacking MiniLM takes a few milliseconds.

    They are copies: they must be made again after the weights change. (A cache that checked
    for changes could not see all of them: PyTorch's fused AdamW, for one, updates weights in
    place without bumping their version counter.) Empty where the oneDNN route does not apply.
    """
    weights = {}
    for layer in module.modules():
        w = getattr(layer, "weight", None)
        if isinstance(layer, nn.Linear) and w.device.type == "cpu" and _onednn_dtype(w.dtype):
            weights[layer] = torch.ops.mkldnn._reorder_linear_weight(w.detach(), _ONEDNN_BATCH_HINT)
    return weights


@contextmanager
def using_repacked(weights: dict[nn.Module, torch.Tensor]) -> Iterator[None]:
    """Inside this block, on this thread, ``linear`` reads these layers' weights from ``weights``
    (from ``repack_weights``). Keep the block around forward passes only, never across a yield."""
    previous = getattr(_packed, "weights", None)
    _packed.weights = {**previous, **weights} if previous else weights
    try:
        yield
    finally:
        _packed.weights = previous


def linear(x: torch.Tensor, layer: nn.Linear, activation: str | None = None) -> torch.Tensor:
    """``activation(layer(x))`` by the fastest exact route for this input.

    On a CPU at inference, for (M, C) inputs with M a multiple of ``ONEDNN_ROW_MULTIPLE``, it is
    PyTorch's oneDNN linear (``torch.ops.mkldnn._linear_pointwise``, the kernel torch.compile's
    CPU backend emits) with the activation fused into the matrix multiply, on the repacked
    weight inside ``using_repacked``. PyTorch's plain fp32 ``F.linear`` calls MKL, which runs
    AVX2 code on AMD CPUs: on an AVX-512 AMD EPYC this route is twice as fast in fp32 and ~15%
    in bf16 (benchmarks/bench_encode.py measures both). Both are fp32-accumulating GEMMs: the
    same numbers within rounding (~1e-6). Elsewhere (training, GPUs, other shapes): ``F.linear``.
    """
    if x.dim() == 2 and x.shape[0] % ONEDNN_ROW_MULTIPLE == 0 and onednn_rows(x, layer.weight) > 1:
        packed = getattr(_packed, "weights", None)
        weight = packed.get(layer, layer.weight) if packed else layer.weight
        return torch.ops.mkldnn._linear_pointwise(
            x.contiguous(), weight, layer.bias, activation or "none", [],
            "none" if activation == "gelu" else "")  # gelu algorithm "none": the erf form
    y = F.linear(x, layer.weight, layer.bias)
    return ACTIVATIONS[activation](y) if activation is not None else y
