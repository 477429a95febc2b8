"""The engine's compiled kernel: self-attention over packed rows, built for the CPU at hand.

``packed_attention.cpp`` (read it: one file, no dependency) attends each sequence of a packed
batch over its own rows, straight from the fused QKV projection's output (see its header).
It is compiled on first use by the system's C++ compiler (``$CXX``, else ``c++``) with
``-march=native`` into ``~/.cache/ctxvec/native`` (``$CTXVEC_CACHE``), one library per source,
compiler and CPU (a machine with another CPU builds its own), and loaded with ``ctypes`` (no
Python extension, no PyTorch headers: it builds in about a second). Where it cannot be built
(no compiler, an unwritable cache, ``CTXVEC_NATIVE=0``), ``available()`` says why and the engine
runs PyTorch's kernels instead, with the same numbers.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("packed_attention.cpp")
FLAGS = ("-O3", "-march=native", "-std=c++17", "-fopenmp", "-fPIC", "-shared")
HEAD_WIDTHS = (32, 64)  # the head widths the kernel is written for
_FUNCTIONS = {torch.float32: "ctxvec_packed_attention_f32", torch.bfloat16: "ctxvec_packed_attention_bf16"}


class NativeUnavailable(RuntimeError):
    """The kernel cannot be built or loaded here (the message says why)."""


def _cpu_identity() -> str:
    """What ``-march=native`` compiles for: the CPU's model and feature flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    lines = [line for line in info.splitlines() if line.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(lines)))


def _cache_dir() -> Path:
    root = os.environ.get("CTXVEC_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ctxvec")
    return Path(root) / "native"


def _build(compiler: str) -> Path:
    """The library for this source, compiler and CPU: from the cache, else compiled into it."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), " ".join(FLAGS), version, _cpu_identity()]).encode())
    target = _cache_dir() / f"packed_attention-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", partial], capture_output=True, text=True,
                              timeout=300)
        if done.returncode != 0:
            raise NativeUnavailable(f"{compiler} failed to build {SOURCE.name}: {done.stderr.strip()[-500:]}")
        os.replace(partial, target)  # whole or not at all, whoever builds at the same time
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


@lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | NativeUnavailable:
    if os.environ.get("CTXVEC_NATIVE", "1") == "0":
        return NativeUnavailable("CTXVEC_NATIVE=0")
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return NativeUnavailable(f"written for x86-64 CPUs, this is {platform.machine()}")
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not compiler:
        return NativeUnavailable("no C++ compiler (set CXX, or install g++)")
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.SubprocessError, NativeUnavailable) as err:
        log.info("ctxvec's native attention is unavailable (%s); PyTorch's kernels run instead", err)
        return err if isinstance(err, NativeUnavailable) else NativeUnavailable(str(err))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    for name in _FUNCTIONS.values():
        function = getattr(lib, name)
        function.argtypes = [ptr, i64, ptr, i64, ptr, i64, i64, i64, ctypes.c_float, ctypes.c_int]
        function.restype = ctypes.c_int
    lib.ctxvec_packed_attention_max_tokens.restype = ctypes.c_int
    return lib


def available() -> str | None:
    """None if the kernel is built and loaded, else why not (built on the first call)."""
    lib = _library()
    return str(lib) if isinstance(lib, NativeUnavailable) else None


def max_tokens() -> int:
    """The longest sequence the kernel takes (0 where it is unavailable)."""
    lib = _library()
    return 0 if isinstance(lib, NativeUnavailable) else lib.ctxvec_packed_attention_max_tokens()


def takes(dtype: torch.dtype, head_width: int) -> bool:
    """Whether the kernel computes this precision and head width (and is available)."""
    return dtype in _FUNCTIONS and head_width in HEAD_WIDTHS and available() is None


def packed_attention(qkv: torch.Tensor, starts: torch.Tensor, n_heads: int, n_rows: int | None = None) -> torch.Tensor:
    """softmax(Q·Kᵀ / √Dh) · V of every head of every sequence, on packed rows.

    qkv: (R, 3D) rows of [Q | K | V] (CPU, fp32 or bf16, rows contiguous); starts: (S + 1,) int64,
    sequence s owning rows starts[s] .. starts[s + 1] - 1 (rows from starts[-1] on belong to no
    sequence: their output is 0); n_heads: H, with D = H * Dh. Returns (R, D), the heads of each
    row concatenated, in qkv's dtype, computed on ``torch.get_num_threads()`` threads.
    """
    lib = _library()
    if isinstance(lib, NativeUnavailable):
        raise lib
    R, C = qkv.shape
    D = C // 3
    Dh = D // n_heads
    if qkv.device.type != "cpu" or qkv.dtype not in _FUNCTIONS or qkv.stride(1) != 1 or C != 3 * n_heads * Dh:
        raise ValueError(f"packed_attention takes (R, 3 * H * Dh) fp32/bf16 CPU rows, got {tuple(qkv.shape)} "
                         f"{qkv.dtype} on {qkv.device} with {n_heads} heads.")
    starts = starts.to(torch.int64).contiguous()
    n_real = int(starts[-1])
    if int(starts[0]) != 0 or n_real > R:
        raise ValueError(f"starts must run from 0 to at most {R} rows, got {starts[0]} .. {n_real}.")
    out = torch.empty(R, D, dtype=qkv.dtype)
    out[n_real:] = 0
    status = getattr(lib, _FUNCTIONS[qkv.dtype])(
        qkv.data_ptr(), qkv.stride(0), out.data_ptr(), out.stride(0), starts.data_ptr(), len(starts) - 1,
        n_heads, Dh, Dh ** -0.5, torch.get_num_threads())
    if status == 1:
        raise ValueError(f"packed_attention takes head widths {HEAD_WIDTHS}, got {Dh}.")
    if status == 2:
        raise ValueError(f"packed_attention takes sequences of up to {max_tokens()} tokens in order; "
                         f"got starts {starts.tolist()[:8]}...")
    return out
