"""Shared helpers for the benchmark scripts: machine facts, memory, FLOPs, matmul limits."""

from __future__ import annotations

import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from ctxvec import malloc
from ctxvec.model.config import EncoderConfig

ROOT = Path(__file__).resolve().parents[1]
SHARED_WEB = ROOT.parent / "shared" / "data" / "web_en.txt"


def machine() -> dict:
    cpu = "unknown"
    flags: set[str] = set()
    try:
        info = Path("/proc/cpuinfo").read_text()
        cpu = re.search(r"model name\s*:\s*(.*)", info).group(1).strip()
        flags = set(re.search(r"flags\s*:\s*(.*)", info).group(1).split())
    except (OSError, AttributeError):
        pass
    simd = [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8") if f in flags]
    return {"cpu": cpu, "simd": simd, "matrix_units": matrix_units(flags), "cores": torch.get_num_threads(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "native_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()), "malloc": malloc.in_use()}


def as_the_command_runs() -> None:
    """Start this benchmark again under the malloc that the ``ctxvec`` command runs with
    (``ctxvec.malloc``: jemalloc where installed), so that what it measures in its own process
    is what the command does. Every system it times in this process runs under that malloc alike;
    the servers it starts run under their own (``ctxvec serve``: jemalloc; a peer: the system's)."""
    malloc.start_again_under_jemalloc([sys.executable, *sys.orig_argv[1:]])


def matrix_units(flags: set[str]) -> str:
    """The CPU's matrix units in words: what its bf16 and int8 matrix multiplies run on."""
    if "amx_bf16" in flags:
        return "AMX (bf16" + (", int8)" if "amx_int8" in flags else ")")
    if "avx512_bf16" in flags:
        return "AVX512-BF16" + (" + AVX512-VNNI (int8)" if "avx512_vnni" in flags else "")
    if "avx512f" in flags:
        return "AVX-512" + (" + VNNI (int8)" if "avx512_vnni" in flags else "") + ", no bf16 unit"
    return "AVX2 only" if "avx2" in flags else "no AVX2"


def reset_peak_rss() -> int:
    """Reset the kernel's high-water mark of this process's RSS; return the current RSS (bytes)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return _status_kb("VmRSS") * 1024


def peak_rss() -> int:
    return _status_kb("VmHWM") * 1024


def _status_kb(field: str) -> int:
    match = re.search(rf"{field}:\s*(\d+) kB", Path("/proc/self/status").read_text())
    return int(match.group(1)) if match else 0


def sorted_batches(lengths, size: int) -> list[list[int]]:
    """Indices sorted by length, longest first, in batches of ``size``."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i:i + size] for i in range(0, len(order), size)]


def stack_params(config: EncoderConfig) -> int:
    """Parameters of the layer stack that matmuls touch (weights only)."""
    d, f = config.d_model, config.d_ff
    return config.n_layers * (4 * d * d + 2 * d * f)


def inference_flops(config: EncoderConfig, lengths) -> float:
    """Useful FLOPs to encode texts of these lengths: 2N per token + 4 L d T per token (attention)."""
    n = stack_params(config)
    return float(sum(2 * n * t + 4 * config.n_layers * config.d_model * t * t for t in lengths))


def matmul_limit(config: EncoderConfig, dtype: torch.dtype, rows: int = 1024, reps: int = 25) -> dict[str, float]:
    """Measured GFLOP/s of the model's own GEMMs (QKV, out, FFN up, FFN down) at ``rows`` tokens,
    by PyTorch's two CPU routes: ``F.linear`` (MKL in fp32, oneDNN in bf16) and the oneDNN
    linear on repacked weights that ``ctxvec.engine.linear`` takes at inference. The machine's
    limit is the better of the two (``max`` of the returned values). One pass over the four
    takes ~2 ms in bf16 on 2 AMX cores: medians of 2 passes read 1,400-1,900 GFLOP/s there, of
    25 passes 1,960-2,000, hence many."""
    from ctxvec.engine.linear import linear

    d, f = config.d_model, config.d_ff
    shapes = [(d, 3 * d), (d, d), (d, f), (f, d)]
    xs = {k: torch.randn(rows, k, dtype=dtype) for k in {d, f}}
    layers = [torch.nn.Linear(k, n).to(dtype) for k, n in shapes]
    flops = sum(2 * rows * k * n for k, n in shapes)
    routes = {"F.linear": lambda x, layer: F.linear(x, layer.weight, layer.bias), "oneDNN": linear}
    result = {}
    with torch.inference_mode():
        for name, route in routes.items():
            def once() -> None:
                for (k, _), layer in zip(shapes, layers):
                    route(xs[k], layer)

            result[name] = flops / median_seconds(once, reps, warmup=3) / 1e9
    return result


def median_seconds(once, reps: int, warmup: int = 1) -> float:
    """Median wall time of ``once()`` over ``reps`` calls, after ``warmup`` calls."""
    for _ in range(warmup):
        once()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        once()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def int8_matmul_limit(config: EncoderConfig, rows: int = 1024, reps: int = 50) -> dict[str, float]:
    """Measured GOP/s of the model's own GEMMs at ``rows`` tokens in int8 (uint8 activations,
    int8 weights per output channel, prepacked; bf16 out): oneDNN's quantized linear
    (``torch.ops.onednn.qlinear_pointwise``, on AMX-INT8 or VNNI where the CPU has them)."""
    d, f = config.d_model, config.d_ff
    shapes = [(d, 3 * d), (d, d), (d, f), (f, d)]
    xs = {k: torch.randint(0, 255, (rows, k), dtype=torch.uint8) for k in {d, f}}
    packed = []
    for k, n in shapes:
        w = torch.randint(-127, 127, (n, k), dtype=torch.int8)
        packed.append((k, torch.ops.onednn.qlinear_prepack(w, [rows, k]), torch.full((n,), 0.01),
                       torch.zeros(n, dtype=torch.int64), torch.zeros(n)))

    def once() -> None:
        for k, w, scale, zero, bias in packed:
            torch.ops.onednn.qlinear_pointwise(xs[k], 0.02, 128, w, scale, zero, bias, 1.0, 0, torch.bfloat16,
                                               "none", [], "")

    ops = sum(2 * rows * k * n for k, n in shapes)
    with torch.inference_mode():
        return {"oneDNN int8": ops / median_seconds(once, reps, warmup=3) / 1e9}


def write_results(name: str, result: dict, md: str, out: Path, update: bool) -> None:
    """``out/NAME.json`` and ``out/NAME.md``; with ``update``, the NAME block of BENCHMARKS.md."""
    import json

    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{name}.md").write_text(md)
    if update:
        replace_between(ROOT / "BENCHMARKS.md", f"<!-- {name}:start -->", f"<!-- {name}:end -->", md)
    print(md)


def replace_between(path: Path, start: str, end: str, body: str) -> None:
    """Put ``body`` between two marker lines of a Markdown file (appending them if absent)."""
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + ("\n\n" if text else "") + block + "\n"
    path.write_text(text, encoding="utf-8")
