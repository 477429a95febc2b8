"""Would int8 pay? A probe of the int8 route ctxvec would take, on the machine at hand.

int8 weights per output channel (symmetric), int8 activations per token (symmetric, scale
max|x_row| / 127, no calibration), multiplied by oneDNN's quantized linear
(``torch.ops.onednn.qlinear_pointwise``: AMX-INT8 or AVX512-VNNI where the CPU has them); the
row scales, the bias and the activation follow as eager steps. Everything else runs as ctxvec's
bf16 (fp32 where the CPU has no native bf16). The probe swaps this linear into ctxvec's engine
for the run (nothing in the package changes) and measures, on the same text and threads as
bench_encode: sentences/s against ctxvec bf16, min cosine to ctxvec fp32, and the STS-B dev
Spearman against fp32 (the quality gate: within 0.3 points, min cosine >= 0.99); then the same
with the quantizing step compiled by ``torch.compile`` (its compile time left out).

    .venv/bin/python benchmarks/int8_probe.py [--lines 1500] [--rounds 5] [--threads 2]

Writes benchmarks/results/int8_probe.{json,md} and updates BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, SHARED_WEB, machine, write_results  # noqa: E402

import ctxvec  # noqa: E402
import ctxvec.engine.route as engine_route  # noqa: E402
from ctxvec.evaluation import evaluate_pairs  # noqa: E402
from ctxvec.model.route import ACTIVATIONS  # noqa: E402

DEV = ROOT.parent / "shared" / "data" / "stsb_en_dev.csv"


def quantize_weight(layer: nn.Linear) -> tuple:
    """(prepacked int8 weight, (N,) scales, (N,) zero points, fp32 bias): symmetric per channel."""
    w = layer.weight.detach().float()  # (N, K)
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # (N,)
    q = torch.round(w / scale[:, None]).to(torch.int8)
    packed = torch.ops.onednn.qlinear_prepack(q, [1024, w.shape[1]])
    return packed, scale, torch.zeros_like(scale, dtype=torch.int64), layer.bias.detach().float()


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, K) -> (R, K) int8 and (R, 1) fp32 scales, x ≈ int8 * scale row by row."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / 127
    return torch.round(x / scale).to(torch.int8), scale


def int8_linear_factory(weights: dict, quantize):
    def linear(x, layer, activation=None, _weights=None):
        packed, w_scale, w_zero, bias = weights[layer]
        q, row_scale = quantize(x)
        y = torch.ops.onednn.qlinear_pointwise(  # (R, N) fp32: Σ q · w_int8 · w_scale
            q, 1.0, 0, packed, w_scale, w_zero, None, 1.0, 0, torch.float32, "none", [], "")
        y = torch.addcmul(bias, y, row_scale)
        return (ACTIVATIONS[activation](y) if activation else y).to(x.dtype)
    return linear


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=1500)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    facts = machine()
    lines = [line for line in SHARED_WEB.read_text(encoding="utf-8").splitlines() if line.strip()]
    texts = random.Random(0).sample(lines, args.lines)
    fp32 = ctxvec.load("minilm")
    reference = fp32.embed(texts)
    fp32_spearman = evaluate_pairs(fp32, DEV).spearman if DEV.is_file() else None
    pipeline = ctxvec.load("minilm", precision="bf16" if facts["native_bf16"] else "fp32")
    weights = {layer: quantize_weight(layer) for layer in pipeline.encoder.stack.modules()
               if isinstance(layer, nn.Linear)}
    onednn_linear, onednn_linear_add = engine_route.linear, engine_route.linear_add
    variants = {
        f"ctxvec {pipeline.precision}": onednn_linear,
        "int8, eager steps": int8_linear_factory(weights, quantize_rows),
        "int8, quantizing step compiled": int8_linear_factory(weights, torch.compile(quantize_rows, dynamic=True)),
    }
    rows = []
    for name, linear in variants.items():
        engine_route.linear = linear
        # the sub-layers' last projections add the residual: int8 there too (plain add after it)
        engine_route.linear_add = (onednn_linear_add if linear is onednn_linear else
                                   lambda x, layer, residual, weights=None, linear=linear: residual + linear(x, layer))
        pipeline.embed(texts)  # warm-up (and compilation)
        times = []
        for _ in range(args.rounds):
            start = time.perf_counter()
            vectors = pipeline.embed(texts)
            times.append(time.perf_counter() - start)
        cosine = float(np.min((vectors * reference).sum(1)))
        spearman = evaluate_pairs(pipeline, DEV).spearman if DEV.is_file() else None
        rows.append({"variant": name, "sentences_per_s": len(texts) / statistics.median(times),
                     "min_cosine_to_fp32": cosine, "dev_spearman": spearman, "times": times})
        print(rows[-1], flush=True)
    engine_route.linear, engine_route.linear_add = onednn_linear, onednn_linear_add
    base = rows[0]["sentences_per_s"]
    result = {"machine": facts, "threads": args.threads, "lines": args.lines, "rounds": args.rounds,
              "date": time.strftime("%Y-%m-%d"), "fp32_dev_spearman": fp32_spearman, "variants": rows}
    gate = f"; STS-B dev Spearman of fp32: {fp32_spearman:.2f}" if fp32_spearman is not None else ""
    md = [f"Machine: {facts['cpu']}, matrix units: **{facts['matrix_units']}**, {args.threads} threads, torch "
          f"{facts['torch']}; {result['date']}. {args.lines} random lines of `web_en.txt`, median of {args.rounds} "
          f"rounds{gate}.", "",
          "| variant | sentences/s | vs first row | min cosine to fp32 | STS-B dev Spearman |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        spearman = f"{r['dev_spearman']:.2f}" if r["dev_spearman"] is not None else "n/a"
        md.append(f"| {r['variant']} | {r['sentences_per_s']:.1f} | {r['sentences_per_s'] / base:.2f}x | "
                  f"{r['min_cosine_to_fp32']:.4f} | {spearman} |")
    write_results("int8_probe", result, "\n".join(md) + "\n", ROOT / "benchmarks" / "results", update=True)


if __name__ == "__main__":
    main()
