"""The engine's compiled kernels, built for the CPU at hand: one C++ file each, no dependency.

- ``packed_attention.cpp`` attends each sequence of a packed batch over its own rows, straight
  from the fused QKV projection's output (``packed_attention``), in 16-lane vectors;
- ``amx_attention.cpp``: the same in bf16 with its matrix multiplies on AMX tiles, where the
  CPU has them (``tiles()``);
- ``gelu.cpp``: GELU of bf16 values by a table of all 65,536 (``gelu_``);
- ``layer_norm.cpp``: LayerNorm of rows, 16 at a time (``layer_norm``);

with ``vec16.h``, the vector helpers the kernels are written with. They are compiled
together on first use by the system's C++ compiler (``$CXX``, else ``c++``)
with ``-march=native`` into ``$CTXVEC_CACHE/native`` (default ``~/.cache/ctxvec/native``), one
library per sources, compiler and CPU (a machine with another CPU builds its own), and loaded
with ``ctypes`` (no Python extension, no PyTorch headers: it builds in about 3 s;
``scripts/setup.sh`` builds it). Where it cannot be built (not Linux on x86-64, no compiler, an
unwritable cache, ``CTXVEC_NATIVE=0``), ``available()`` says why and the engine runs PyTorch's
kernels instead (the same numbers within rounding).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCES = tuple(Path(__file__).with_name(name) for name in ("packed_attention.cpp", "amx_attention.cpp", "gelu.cpp",
                                                            "layer_norm.cpp"))
HEADERS = (Path(__file__).with_name("vec16.h"),)
FLAGS = ("-O3", "-march=native", "-std=c++17", "-fopenmp", "-fPIC", "-shared")
HEAD_WIDTHS = (32, 64)  # the head widths the kernel is written for
_FUNCTIONS = {torch.float32: "ctxvec_packed_attention_f32", torch.bfloat16: "ctxvec_packed_attention_bf16"}
_TILES = "ctxvec_packed_attention_bf16_amx"  # bf16 on AMX tiles (amx_attention.cpp)
_NORMS = {torch.float32: "ctxvec_layer_norm_f32", torch.bfloat16: "ctxvec_layer_norm_bf16"}
NORM_WIDTH_MULTIPLE = 16  # LayerNorm's kernel takes rows of a multiple of this many values


class NativeUnavailable(RuntimeError):
    """The kernel cannot be built or loaded here (the message says why)."""


def _cpu_identity() -> str:
    """What ``-march=native`` compiles for: the CPU's model and feature flags (a library built
    for other flags could stop the process on an unknown instruction, so no flags, no build)."""
    try:
        info = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError as err:
        raise NativeUnavailable(f"cannot read the CPU's features ({err})") from None
    lines = sorted({line for line in info.splitlines() if line.startswith(("model name", "flags"))})
    if not any(line.startswith("flags") for line in lines):
        raise NativeUnavailable("/proc/cpuinfo lists no CPU features")
    return "\n".join(lines)


def _cache_dir() -> Path:
    root = os.environ.get("CTXVEC_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ctxvec")
    return Path(root) / "native"


def _run(command: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, encoding="utf-8", errors="replace",
                          timeout=timeout)


def _build(compiler: list[str]) -> Path:
    """The library for these sources, compiler and CPU: from the cache, else compiled into it."""
    version = _run([*compiler, "--version"], 30).stdout
    key = hashlib.sha256(b"\0".join([*(source.read_bytes() for source in SOURCES + HEADERS), " ".join(FLAGS).encode(),
                                     version.encode(), _cpu_identity().encode()]))
    target = _cache_dir() / f"kernels-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(prefix=".building-", suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = _run([*compiler, *FLAGS, *map(str, SOURCES), "-o", partial], 300)
        if done.returncode != 0:
            raise NativeUnavailable(f"{shlex.join(compiler)} failed to build {', '.join(s.name for s in SOURCES)}: "
                                    f"{done.stderr.strip()[-500:]}")
        os.replace(partial, target)  # whole or not at all, whoever builds at the same time
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


def _load(compiler: list[str]) -> ctypes.CDLL:
    """Build (or find) and load the library; a cached one that does not load is built again."""
    path = _build(compiler)
    try:
        lib = ctypes.CDLL(str(path))
    except OSError:  # a damaged file in the cache
        path.unlink(missing_ok=True)
        lib = ctypes.CDLL(str(_build(compiler)))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    for name in (*_FUNCTIONS.values(), _TILES):
        function = getattr(lib, name)
        function.argtypes = [ptr, i64, ptr, i64, ptr, i64, i64, i64, ctypes.c_float, ctypes.c_int]
        function.restype = ctypes.c_int
    lib.ctxvec_packed_attention_max_tokens.restype = ctypes.c_int
    lib.ctxvec_amx_tiles.restype = ctypes.c_int
    lib.ctxvec_gelu_bf16_.argtypes = [ptr, i64, ctypes.c_int]
    lib.ctxvec_gelu_bf16_.restype = None
    lib.ctxvec_layer_norm_fast.restype = ctypes.c_int
    for name in _NORMS.values():
        function = getattr(lib, name)
        function.argtypes = [ptr, i64, ptr, i64, ptr, ptr, i64, i64, ctypes.c_float, ctypes.c_int]
        function.restype = ctypes.c_int
    return lib


_lock = threading.Lock()
_loaded: list[ctypes.CDLL | NativeUnavailable] = []  # the outcome, once settled


def _library() -> ctypes.CDLL | NativeUnavailable:
    """The loaded library, or why there is none: settled once per process (one thread builds)."""
    if _loaded:
        return _loaded[0]
    with _lock:
        if not _loaded:
            _loaded.append(_settle())
    return _loaded[0]


def _settle() -> ctypes.CDLL | NativeUnavailable:
    if os.environ.get("CTXVEC_NATIVE", "1") == "0":
        return NativeUnavailable("CTXVEC_NATIVE=0")
    if not sys.platform.startswith("linux") or platform.machine().lower() not in ("x86_64", "amd64"):
        return NativeUnavailable(f"written for Linux on x86-64, this is {sys.platform} on {platform.machine()}")
    compiler = shlex.split(os.environ.get("CXX", "")) or [shutil.which("c++") or shutil.which("g++") or ""]
    if not compiler[0]:
        return NativeUnavailable("no C++ compiler (set CXX, or install g++)")
    try:
        return _load(compiler)
    except Exception as err:  # whatever stops the build, PyTorch's kernels still run
        why = err if isinstance(err, NativeUnavailable) else NativeUnavailable(f"{type(err).__name__}: {err}")
        log.warning("ctxvec's compiled kernels are unavailable (%s); PyTorch's kernels run instead", why)
        return why


def _required() -> ctypes.CDLL:
    """The loaded library; raises ``NativeUnavailable`` (why there is none) otherwise."""
    lib = _library()
    if isinstance(lib, NativeUnavailable):
        raise lib
    return lib


def reset() -> None:
    """Forget the outcome, so that the next use settles it again (tests change the settings)."""
    with _lock:
        _loaded.clear()
        norm_fast.cache_clear()


def available() -> str | None:
    """None if the kernels are built and loaded, else why not (built on the first call)."""
    lib = _library()
    return str(lib) if isinstance(lib, NativeUnavailable) else None


def max_tokens() -> int:
    """The longest sequence the kernel takes (0 where it is unavailable)."""
    lib = _library()
    return 0 if isinstance(lib, NativeUnavailable) else lib.ctxvec_packed_attention_max_tokens()


def tiles() -> bool:
    """Whether the bf16 kernel runs its matrix multiplies on AMX tiles here (built for a CPU with
    AMX, and the system lets the process use them); else on AVX-512 vectors."""
    lib = _library()
    return not isinstance(lib, NativeUnavailable) and bool(lib.ctxvec_amx_tiles())


def on_tiles(dtype: torch.dtype) -> bool:
    """Whether the kernel attends in ``dtype`` on AMX tiles here: bf16, where ``tiles()``."""
    return dtype == torch.bfloat16 and tiles()


def takes(dtype: torch.dtype, head_width: int) -> bool:
    """Whether the kernel computes this precision and head width (and is available)."""
    return dtype in _FUNCTIONS and head_width in HEAD_WIDTHS and available() is None


def packed_attention(qkv: torch.Tensor, starts: torch.Tensor, n_heads: int, use_tiles: bool | None = None
                     ) -> torch.Tensor:
    """softmax(Q·Kᵀ / √Dh) · V of every head of every sequence, on packed rows.

    qkv: (R, 3D) rows of [Q | K | V] (CPU, fp32 or bf16, rows contiguous); starts: (S + 1,) int64,
    sequence s owning rows starts[s] .. starts[s + 1] - 1 (rows from starts[-1] on belong to no
    sequence: their output is 0); n_heads: H, with D = H * Dh. Returns (R, D), the heads of each
    row concatenated, in qkv's dtype, computed on ``torch.get_num_threads()`` threads. bf16 runs
    on AMX tiles where ``tiles()`` (``use_tiles``: None, where they are; False, never; True,
    or raise), probabilities rounded to bf16 for P·V as PyTorch's fused kernel rounds them.
    """
    lib = _required()
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
    tiles_here = on_tiles(qkv.dtype)
    if use_tiles and not tiles_here:
        raise NativeUnavailable(f"no AMX tiles for {qkv.dtype} here")
    use_tiles = tiles_here and use_tiles is not False
    out = qkv.new_empty(R, D)
    out[n_real:] = 0
    status = getattr(lib, _TILES if use_tiles else _FUNCTIONS[qkv.dtype])(
        qkv.data_ptr(), qkv.stride(0), out.data_ptr(), out.stride(0), starts.data_ptr(), len(starts) - 1,
        n_heads, Dh, Dh ** -0.5, torch.get_num_threads())
    if status == 1:
        raise ValueError(f"packed_attention takes head widths {HEAD_WIDTHS}, got {Dh}.")
    if status == 3:
        raise NativeUnavailable("the system refused this process the AMX tiles")
    if status == 2:
        raise ValueError(f"packed_attention takes sequences of up to {max_tokens()} tokens in order; "
                         f"got starts {starts.tolist()[:8]}...")
    return out


def gelu_(x: torch.Tensor) -> torch.Tensor:
    """GELU (the erf form) of a contiguous bf16 CPU tensor, in place, each value correctly rounded
    (``gelu.cpp``), on ``torch.get_num_threads()`` threads. Returns ``x``."""
    lib = _required()
    if x.device.type != "cpu" or x.dtype != torch.bfloat16 or not x.is_contiguous():
        raise ValueError(f"gelu_ takes a contiguous bf16 CPU tensor, got {x.dtype} on {x.device} "
                         f"(contiguous: {x.is_contiguous()}).")
    lib.ctxvec_gelu_bf16_(x.data_ptr(), x.numel(), torch.get_num_threads())
    return x


@functools.lru_cache(maxsize=1)  # settled with the library (``reset`` forgets both)
def norm_fast() -> bool:
    """Whether the LayerNorm kernel is built with AVX-512 here (with AVX2 alone, PyTorch's is faster)."""
    lib = _library()
    return not isinstance(lib, NativeUnavailable) and bool(lib.ctxvec_layer_norm_fast())


def norm_takes(x: torch.Tensor, norm: torch.nn.LayerNorm) -> bool:
    """Whether the engine normalises ``x`` by ``layer_norm`` instead of ``norm`` itself: a CPU tensor
    of ``norm``'s dtype, fp32 or bf16, normalised over its last dimension (a multiple of
    ``NORM_WIDTH_MULTIPLE``) with a weight and a bias, where the kernel is built with AVX-512
    (``norm_fast``). (Asked 13 times a forward pass of MiniLM: the cheap tests first.)"""
    weight, bias, dtype = norm.weight, norm.bias, x.dtype
    return (dtype in _NORMS and weight is not None and bias is not None and weight.dtype == dtype
            and bias.dtype == dtype and x.is_cpu and norm.normalized_shape == x.shape[-1:]
            and x.shape[-1] % NORM_WIDTH_MULTIPLE == 0 and norm_fast())


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """``F.layer_norm(x, (D,), weight, bias, eps)`` of a CPU fp32 or bf16 tensor over its last
    dimension D (a multiple of ``NORM_WIDTH_MULTIPLE``), by ``layer_norm.cpp``: mean and variance in
    fp32, the same numbers as PyTorch's within fp32 rounding (bf16: rounded once), on
    ``torch.get_num_threads()`` threads. Returns ``out`` (a contiguous tensor shaped like ``x``,
    ``x`` itself allowed: each row is read before it is written), else a new tensor."""
    lib = _required()
    shape, dtype = x.shape, x.dtype
    D = shape[-1] if shape else 0
    if (dtype not in _NORMS or not x.is_cpu or D == 0 or D % NORM_WIDTH_MULTIPLE or weight.shape != (D,)
            or bias.shape != (D,) or weight.dtype != dtype or bias.dtype != dtype):
        raise ValueError(f"layer_norm takes fp32/bf16 CPU rows of a multiple of {NORM_WIDTH_MULTIPLE} values with a "
                         f"weight and a bias of that width and dtype, got {tuple(shape)} {dtype} on {x.device}.")
    if out is not None and (out.shape != shape or out.dtype != dtype or not out.is_contiguous()):
        raise ValueError(f"layer_norm's out must be a contiguous {dtype} tensor of shape {tuple(shape)}.")
    return layer_norm_unchecked(x, weight, bias, eps, out, lib)


def layer_norm_unchecked(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                         out: torch.Tensor | None = None, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """``layer_norm`` without its checks, for the route, which has asked ``norm_takes`` (13 times a
    forward pass of MiniLM; on 32 rows of bf16 the checks took ~1.5 of a call's ~11.5 us)."""
    lib = lib or _required()
    D = x.shape[-1]
    rows = x.contiguous().view(-1, D)  # (R, D)
    weight, bias = weight.contiguous(), bias.contiguous()  # (the pointers only are read: no gradient)
    result = torch.empty_like(rows) if out is None else out.view(-1, D)
    status = getattr(lib, _NORMS[x.dtype])(rows.data_ptr(), D, result.data_ptr(), D, weight.data_ptr(),
                                           bias.data_ptr(), rows.shape[0], D, float(eps), torch.get_num_threads())
    if status:
        raise ValueError(f"layer_norm takes rows of a multiple of {NORM_WIDTH_MULTIPLE} values, got {D}.")
    return out if out is not None else result.view(x.shape)
