"""Attention routes side by side: where ctxvec switches from batched_attention to the fused kernel.

For each sequence length T (batches of ~1,024 tokens, a few padded rows, as the encoder's
length-sorted batches have), times one attention step of MiniLM's shape (12 heads x 32) and the
seed's (8 x 64), fp32 and bf16 where it is native, by:
  - ctxvec.engine.attention.batched_attention (two batched matmuls around an fp32 softmax),
  - torch.nn.functional.scaled_dot_product_attention (PyTorch's fused CPU kernel),
  - ctxvec.model.attention.attention (the eager function that also returns the probabilities),
  - ctxvec.engine.native.packed_attention (ctxvec's kernel, up to its longest sequence): from
    the packed QKV rows to the packed output rows, so its time includes what the others leave
    out (their inputs are already (B, H, T, Dh): the route gathers them from the rows and back);
    on 16-lane vectors, and in bf16 also on AMX tiles where the CPU has them,
and checks each against a float64 reference. ``attention.FUSED_CPU_MIN_SCORES`` (per CPU kind)
is set from these tables; widths between multiples of 16 show the fused kernel's tail blocks
(ctxvec pads to whole blocks where it runs it, ``attention.FUSED_CPU_WIDTH_MULTIPLE``). Writes
benchmarks/results/bench_attention.{json,md}, on AMX CPUs bench_attention_amx.{json,md} (not
BENCHMARKS.md).

    .venv/bin/python benchmarks/bench_attention.py [--threads 2] [--reps 30]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, machine, median_seconds, write_results  # noqa: E402

from ctxvec.engine import native  # noqa: E402
from ctxvec.engine.attention import (  # noqa: E402
    batched_attention, FUSED_CPU_MIN_SCORES, FUSED_CPU_WIDTH_MULTIPLE, native_max_tokens)

from ctxvec.model.attention import attention  # noqa: E402
from ctxvec.model.masks import key_mask_from  # noqa: E402
from ctxvec.engine.runtime import cpu_has_amx, native_bf16  # noqa: E402

LENGTHS = [8, 16, 32, 36, 44, 48, 64, 68, 100, 128, 132, 192, 256, 384, 512]
TILES = "ctxvec kernel, AMX tiles"
SHAPES = {"minilm (12 x 32)": (12, 32), "seed (8 x 64)": (8, 64)}


def measure(T: int, heads: int, width: int, dtype: torch.dtype, reps: int) -> dict:
    B = max(1, 1024 // T)
    g = torch.Generator().manual_seed(T)
    q, k, v = (torch.randn(B, heads, T, width, generator=g) for _ in range(3))
    real = torch.ones(B, T, dtype=torch.bool)
    real[1::2, T - max(1, T // 16):] = False  # every other row a little shorter
    key_mask = key_mask_from(real)
    expected, _ = attention(q.double(), k.double(), v.double(), key_mask)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    routes = {
        "batched": lambda: batched_attention(q, k, v, key_mask),
        "fused (SDPA)": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask),
        "eager": lambda: attention(q, k, v, key_mask)[0],
    }
    # the same sequences as packed rows: (N, 3D) in, (N, D) out
    rows = torch.cat([t.transpose(1, 2).reshape(B, T, heads * width) for t in (q, k, v)], dim=2)[real]
    starts = torch.cat([torch.zeros(1, dtype=torch.long), real.sum(1).cumsum(0)])
    if native.available() is None and T <= native.max_tokens():
        routes["ctxvec kernel"] = lambda: native.packed_attention(rows, starts, heads, use_tiles=False)
        if native.on_tiles(dtype):
            routes[TILES] = lambda: native.packed_attention(rows, starts, heads, use_tiles=True)
    packed = lambda out: out  # noqa: E731
    as_rows = {"ctxvec kernel": packed, TILES: packed, None: lambda out: out.transpose(1, 2).reshape(B, T, -1)[real]}
    expected = as_rows[None](expected)
    row = {"T": T, "B": B}
    with torch.inference_mode():
        for name, fn in routes.items():
            got = as_rows.get(name, as_rows[None])(fn()).double()
            row[name] = {"ms": 1e3 * median_seconds(fn, reps, warmup=3),
                         "max_rel_error": ((got - expected).abs().max() / expected.abs().max()).item()}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtypes = [torch.float32] + ([torch.bfloat16] if native_bf16() else [])
    tables = []
    for shape, (heads, width) in SHAPES.items():
        for dtype in dtypes:
            rows = [measure(T, heads, width, dtype, args.reps) for T in LENGTHS]
            tables.append({"shape": shape, "dtype": str(dtype).removeprefix("torch."), "rows": rows})
            print(shape, dtype, [(r["T"], round(r["batched"]["ms"], 3), round(r["fused (SDPA)"]["ms"], 3))
                                 for r in rows], flush=True)
    result = {"machine": machine(), "threads": args.threads, "date": time.strftime("%Y-%m-%d"),
              "fused_cpu_min_scores": {str(d).removeprefix("torch."): n for d, n in FUSED_CPU_MIN_SCORES.items()},
              "fused_cpu_width_multiple": FUSED_CPU_WIDTH_MULTIPLE,
              "native_max_tokens": {str(d).removeprefix("torch."): native_max_tokens(d) for d in dtypes},
              "native": native.available() or "built", "tiles": native.tiles(), "tables": tables}
    name = "bench_attention_amx" if cpu_has_amx() else "bench_attention"
    write_results(name, result, markdown(result), args.out, update=False)


def markdown(r: dict) -> str:
    m = r["machine"]
    out = [f"Machine: {m['cpu']} ({', '.join(m['simd'])}), {r['threads']} threads, torch {m['torch']}; {r['date']}.",
           "One attention step over ~1,024 tokens (B = 1024 // T sequences, every other one a little "
           "shorter), median ms; in brackets the largest error relative to a float64 reference. "
           "ctxvec takes the batched route while T * S is below "
           + ", ".join(f"{k} in {d}" for d, k in r["fused_cpu_min_scores"].items())
           + (f", and pads the widths it runs the fused kernel at to multiples of {r['fused_cpu_width_multiple']}"
              if r.get("fused_cpu_width_multiple", 1) > 1 else "") + ". "
           "Up to " + ", ".join(f"{n} tokens in {d}" for d, n in r["native_max_tokens"].items())
           + " it runs its own kernel on the packed rows instead (`ctxvec kernel`, its time from the QKV rows "
           f"to the output rows; here: {r['native']}"
           + ("; in bf16 on AMX tiles, the `AMX tiles` column" if r.get("tiles") else "") + ").", ""]
    names = ("batched", "fused (SDPA)", "eager", "ctxvec kernel", TILES)
    for t in r["tables"]:
        shown = [k for k in names if any(k in row for row in t["rows"])]
        out += [f"**{t['shape']}, {t['dtype']}**", "", "| T | " + " | ".join(shown) + " |",
                "|---:|" + "---:|" * len(shown)]
        for row in t["rows"]:
            cells = [f"{row[k]['ms']:.3f} ({row[k]['max_rel_error']:.0e})" if k in row else "-" for k in shown]
            out.append(f"| {row['T']} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    main()
