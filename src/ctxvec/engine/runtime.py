"""How the engine runs: numeric precision, CPU threads, memory given back."""

from __future__ import annotations

import ctypes
import logging
import time
from functools import lru_cache

import torch

from ctxvec.validation import is_int

log = logging.getLogger(__name__)

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


@lru_cache(maxsize=1)
def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tile matrix units (Intel Xeon from Sapphire Rapids on), which
    PyTorch's kernels use for bf16 and int8."""
    is_supported = getattr(torch.cpu, "_is_amx_tile_supported", None)  # PyTorch's own probe
    return bool(is_supported()) if is_supported is not None else False


def set_threads(threads: int | None) -> None:
    """Use ``threads`` CPU threads for PyTorch's kernels (None: leave PyTorch's choice)."""
    if threads is None:
        return
    if not is_int(threads) or threads < 1:
        raise ValueError(f"threads must be a positive integer, got {threads!r}.")
    torch.set_num_threads(threads)


@lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc
        return None


_last_trim = float("-inf")  # time.monotonic() of the last trim


def release_memory(min_interval: float = 0.0) -> bool:
    """Give freed heap memory back to the system (glibc ``malloc_trim``; a no-op elsewhere, and
    cheap under jemalloc, the ``ctxvec`` command's malloc, which hands pages back on its own thread).

    Batches of ever-different shapes leave glibc's heap fragmented, so a long job's resident
    memory creeps up although nothing is kept; trimming after each call keeps it flat. A trim
    costs about 1.5 ms (glibc walks the heap, and what it hands back is faulted in again), a
    fifth of a single short text's call: a caller that runs often passes ``min_interval``, and
    the trim is skipped (False) when the last one was less than that many seconds ago.
    """
    global _last_trim
    libc = _libc()
    now = time.monotonic()
    if libc is None or now - _last_trim < min_interval:
        return False
    libc.malloc_trim(0)
    _last_trim = now
    return True


