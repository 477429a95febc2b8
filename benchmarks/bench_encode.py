"""Inference speed, side by side in one run: ctxvec vs its peers on the same text and threads.

MiniLM (all-MiniLM-L6-v2 weights), sentence vectors:
  ctxvec fp32 / bf16, sentence-transformers fp32 / bf16, Hugging Face BertModel as most users
  call it (fixed batches of 32 in input order, mean pooling), and the same weights exported to
  ONNX by this script (``exported.py``): ONNX Runtime fp32 / int8 (dynamic quantization) and
  OpenVINO fp32 / bf16 / int8 (NNCF) (``--no-exported`` leaves them out).
Seed config (512/8/1024/12, post-norm, ReLU), token vectors, same weights via from_torch:
  ctxvec's EncoderStack vs nn.TransformerEncoder's eval fast path on ctxvec's length-sorted
  batches, and nn.TransformerEncoder on unsorted batches of 32.

Each system: a warm-up, then several rounds in rotating order; the median round counts.
Outputs are checked while timed: fp32 against the reference within 1e-5; bf16 as min cosine
to ctxvec fp32. Writes benchmarks/results/bench_encode.{json,md} and updates BENCHMARKS.md.

    .venv/bin/pip install onnx onnxscript onnxruntime openvino nncf   # the exported peers
    .venv/bin/python benchmarks/bench_encode.py [--lines 1500] [--rounds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import random
import warnings
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    ROOT, SHARED_WEB, inference_flops, int8_matmul_limit, machine, matmul_limit, peak_rss, reset_peak_rss,
    sorted_batches, write_results)

import ctxvec  # noqa: E402
from ctxvec import EncoderStack  # noqa: E402
from ctxvec.weights.huggingface import minilm_dir  # noqa: E402
from ctxvec.engine.batching import (  # noqa: E402
    DEFAULT_BATCH_TOKENS, default_batch_tokens, length_sorted_batches, padded_shape, padded_width)
from ctxvec.engine.runtime import precision_dtype  # noqa: E402


@dataclass
class System:
    name: str
    model: str  # "minilm" or "seed"
    precision: str
    run: object  # (n=None) -> outputs for the first n units of work (texts or batches), all by default
    lengths: list  # real tokens per text
    padded_slots: int  # B * T summed over its batches
    lines: int
    times: list = field(default_factory=list)
    peak_mb: float = 0.0
    output: object = None
    own_peak_mb: object = None  # () -> peak MB, for a system that runs in a process of its own


def padded(lengths, batches) -> int:
    return sum(len(b) * max(lengths[i] for i in b) for b in batches)


def ctxvec_slots(lengths, max_len: int, dtype: torch.dtype) -> int:
    """B * T summed over the batches Pipeline pads (attention's view; its matmuls skip padding)."""
    total = 0
    width_of = partial(padded_width, dtype=dtype)
    budget = default_batch_tokens(dtype)
    for b in length_sorted_batches(lengths, budget, width_of):
        rows, width = padded_shape(max(lengths[i] for i in b), len(b), budget, max_len, width_of)
        total += rows * width
    return total


def fixed_batches(n: int, size: int) -> list[list[int]]:
    return [list(range(i, min(i + size, n))) for i in range(0, n, size)]


def minilm_systems(texts: list[str], bf16_texts: list[str]) -> list[System]:
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer, BertModel

    folder = str(minilm_dir())
    ours32 = ctxvec.load("minilm")
    ours16 = ctxvec.load("minilm", precision="bf16")
    one32, one16 = ctxvec.load("minilm"), ctxvec.load("minilm", precision="bf16")
    one32.streams = one16.streams = 1  # every batch on all threads, one at a time (engine.streams)
    st32 = SentenceTransformer(folder, device="cpu")
    st16 = SentenceTransformer(folder, device="cpu").to(torch.bfloat16)
    hf_tok = AutoTokenizer.from_pretrained(folder)
    hf = BertModel.from_pretrained(folder).eval()

    def lengths_of(sample):
        return [len(e.ids) for e in ours32.tokenizer.tokenize(sample)]

    def st_slots(sample, lengths):  # sentence-transformers sorts by characters, batches of 32
        order = sorted(range(len(sample)), key=lambda i: -len(sample[i]))
        return padded(lengths, [order[i:i + 32] for i in range(0, len(order), 32)])

    def hf_unsorted(sample):
        out = []
        with torch.inference_mode():
            for batch in fixed_batches(len(sample), 32):
                enc = hf_tok([sample[i] for i in batch], padding=True, truncation=True, max_length=256,
                             return_tensors="pt")
                hidden = hf(**enc).last_hidden_state
                mask = enc["attention_mask"][..., None].float()
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out.append(nn.functional.normalize(pooled, dim=-1).numpy())
        return np.concatenate(out)

    L = lengths_of(texts)
    L16 = lengths_of(bf16_texts)
    ours_slots = ctxvec_slots(L, ours32.encoder.config.max_len, torch.float32)
    return [
        System("ctxvec fp32", "minilm", "fp32", lambda n=None: ours32.embed(texts[:n]), L, ours_slots, len(texts)),
        System("ctxvec fp32, one stream", "minilm", "fp32", lambda n=None: one32.embed(texts[:n]), L, ours_slots,
               len(texts)),
        System("sentence-transformers fp32", "minilm", "fp32",
               lambda n=None: st32.encode(texts[:n], batch_size=32, convert_to_numpy=True), L, st_slots(texts, L), len(texts)),
        System("HF BertModel fp32, unsorted batches of 32", "minilm", "fp32", lambda n=None: hf_unsorted(texts[:n]), L,
               padded(L, fixed_batches(len(L), 32)), len(texts)),
        System("ctxvec bf16", "minilm", "bf16", lambda n=None: ours16.embed(bf16_texts[:n]), L16,
               ctxvec_slots(L16, ours16.encoder.config.max_len, torch.bfloat16), len(bf16_texts)),
        System("ctxvec bf16, one stream", "minilm", "bf16", lambda n=None: one16.embed(bf16_texts[:n]), L16,
               ctxvec_slots(L16, ours16.encoder.config.max_len, torch.bfloat16), len(bf16_texts)),
        System("sentence-transformers bf16", "minilm", "bf16",
               lambda n=None: np.asarray(st16.encode(bf16_texts[:n], batch_size=32, convert_to_tensor=True).float()),
               L16, st_slots(bf16_texts, L16), len(bf16_texts)),
    ]


def exported_systems(texts: list[str], bf16_texts: list[str], threads: int, workdir: Path,
                     calibration_texts: list[str]) -> list[System]:
    """ONNX Runtime and OpenVINO on MiniLM exported to ONNX (``exported.py``)."""
    from exported import Batcher, export_onnx, onnxruntime_runners, openvino_runners, run_batches, run_batches_async

    folder = str(minilm_dir())
    onnx_path = export_onnx(folder, workdir / "minilm.onnx")
    batcher = Batcher(folder)
    calibration = [(ids, mask) for _, ids, mask in batcher(calibration_texts)]
    runners = {"ONNX Runtime": onnxruntime_runners(onnx_path, workdir, threads),
               "OpenVINO": openvino_runners(onnx_path, threads, calibration)}
    lengths = [len(e.ids) for e in ctxvec.load("minilm").tokenizer.tokenize(texts)]
    systems = []
    for runtime, by_precision in runners.items():
        for name, infer in by_precision.items():
            precision = name.split()[0]
            sample = bf16_texts if precision == "bf16" else texts
            L = lengths[: len(sample)]
            run = run_batches if callable(infer) else run_batches_async
            systems.append(System(f"{runtime} {name}", "minilm", precision,
                                  lambda n=None, infer=infer, sample=sample, run=run: run(batcher, infer, sample[:n]),
                                  L, padded(L, sorted_batches(L, 32)),
                                  len(sample)))
    return systems


def seed_systems(texts: list[str]) -> list[System]:
    seed = ctxvec.load("seed")
    torch.manual_seed(0)
    ref = nn.TransformerEncoder(nn.TransformerEncoderLayer(512, 8, 1024, dropout=0.1, batch_first=True),
                                num_layers=12).eval()
    stack = EncoderStack.from_torch(ref).eval()
    encoded = seed.tokenizer.tokenize(texts)
    L = [len(e.ids) for e in encoded]

    def prepare(batches):  # embedded, padded inputs, built before timing, identical for both
        prepared = []
        with torch.inference_mode():
            for b in batches:
                batch = seed.tokenizer.pad([encoded[i] for i in b])
                prepared.append((b, seed.encoder.embeddings(batch.input_ids), batch.attention_mask))
        return prepared

    sorted_batches = prepare(list(length_sorted_batches(L, DEFAULT_BATCH_TOKENS)))
    unsorted_batches = prepare(fixed_batches(len(L), 32))

    def run(module, batches, ours):
        out = [None] * len(L)
        with torch.inference_mode():
            for b, x, mask in batches:
                if ours:
                    h = module(x, mask).last_hidden_state
                else:
                    h = module(x, src_key_padding_mask=~mask.bool())
                    h = h.to_padded_tensor(0.0) if h.is_nested else h
                for row, i in enumerate(b):
                    out[i] = h[row, : L[i]].numpy().copy()
        return out

    slots_sorted = padded(L, [b for b, _, _ in sorted_batches])
    return [
        System("ctxvec EncoderStack fp32", "seed", "fp32", lambda n=None: run(stack, sorted_batches[:n], True), L,
               slots_sorted, len(texts)),
        System("nn.TransformerEncoder fast path, same batches", "seed", "fp32",
               lambda n=None: run(ref, sorted_batches[:n], False), L, slots_sorted, len(texts)),
        System("nn.TransformerEncoder fast path, unsorted batches of 32", "seed", "fp32",
               lambda n=None: run(ref, unsorted_batches[:n], False), L, padded(L, [b for b, _, _ in unsorted_batches]),
               len(texts)),
    ]


COMMAND = ", as the command runs (jemalloc)"


def command_malloc_systems(systems: list[System], texts: list[str], bf16_texts: list[str], threads: int,
                           workdir: Path):
    """ctxvec fp32 and bf16 as the ``ctxvec`` command runs them, under jemalloc, in a process of
    their own (``command_malloc.py``), appended to ``systems``; the worker, or None where no
    jemalloc is installed."""
    from command_malloc import CommandMalloc
    from ctxvec.malloc import jemalloc_path

    if jemalloc_path() is None:
        print("no jemalloc installed: no rows as the command runs", flush=True)
        return None
    worker = CommandMalloc({"fp32": texts, "bf16": bf16_texts}, threads, workdir)
    by = {s.name: s for s in systems}
    for p in ("fp32", "bf16"):
        twin = by[f"ctxvec {p}"]
        systems.append(System(f"ctxvec {p}{COMMAND}", "minilm", p, partial(worker.embed, p), twin.lengths,
                              twin.padded_slots, twin.lines, own_peak_mb=lambda: worker.peak_mb))
    return worker


def time_systems(systems: list[System], rounds: int, slow_rounds: int) -> None:
    for s in systems:  # warm-up: every kernel and allocation path once, on a little of the work
        s.run(64 if s.model == "minilm" else 4)
    for r in range(rounds):
        order = systems[r % len(systems):] + systems[: r % len(systems)]  # rotate
        for s in order:
            if r >= (slow_rounds if s.precision == "bf16" and not machine()["native_bf16"] else rounds):
                continue
            base = reset_peak_rss()
            start = time.perf_counter()
            s.output = s.run()
            s.times.append(time.perf_counter() - start)
            s.peak_mb = max(s.peak_mb, s.own_peak_mb() if s.own_peak_mb else (peak_rss() - base) / 2**20)
            print(f"  round {r + 1}: {s.name}: {s.times[-1]:.2f} s", flush=True)


def check_outputs(systems: list[System]) -> dict[str, str]:
    """MiniLM: fp32 systems against sentence-transformers fp32 (max abs diff), the others as
    min cosine to ctxvec fp32; seed config: nn.TransformerEncoder against ctxvec."""
    by = {s.name: s for s in systems}
    checks = {"sentence-transformers fp32": "reference"}
    ref = by["sentence-transformers fp32"].output
    ours = by["ctxvec fp32"].output
    for s in systems:
        if s.model != "minilm" or s.name in checks:
            continue
        v = np.asarray(s.output, dtype=np.float32)
        if s.precision == "fp32":
            checks[s.name] = f"max abs diff to sentence-transformers fp32: {np.abs(v - ref).max():.1e}"
        else:
            n = len(v)
            cos = (v * ours[:n]).sum(1) / (np.linalg.norm(v, axis=1) * np.linalg.norm(ours[:n], axis=1))
            checks[s.name] = f"min cosine to ctxvec fp32: {cos.min():.5f}"
    seed_ours = by["ctxvec EncoderStack fp32"].output
    for name in ("nn.TransformerEncoder fast path, same batches", "nn.TransformerEncoder fast path, unsorted batches of 32"):
        diff = max(np.abs(a - b).max() for a, b in zip(seed_ours, by[name].output))
        checks[name] = f"max abs diff to ctxvec: {diff:.1e}"
    checks["ctxvec EncoderStack fp32"] = "reference: nn.TransformerEncoder (see its rows)"
    return checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=SHARED_WEB)
    parser.add_argument("--lines", type=int, default=1500, help="sample size for MiniLM")
    parser.add_argument("--seed-lines", type=int, default=400, help="sample size for the seed config")
    parser.add_argument("--bf16-lines", type=int, default=None,
                        help="sample for bf16 systems (default: --lines on CPUs with native bf16, else 150)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--no-update", action="store_true", help="do not rewrite BENCHMARKS.md")
    parser.add_argument("--no-exported", action="store_true", help="leave out ONNX Runtime and OpenVINO")
    parser.add_argument("--passages", type=int, default=0, metavar="K",
                        help="time passages of K to 2K random lines of the corpus joined, not single lines "
                             "(results: bench_encode_passages)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    # nn.TransformerEncoder's fast path warns that nested tensors are a prototype, on every call
    warnings.filterwarnings("ignore", message="The PyTorch API of nested tensors")
    facts = machine()
    lines = [line for line in args.corpus.read_text(encoding="utf-8").splitlines() if line.strip()]
    sample = (random.Random(0).sample(lines, args.lines) if not args.passages
              else passages(lines, args.lines, args.passages, random.Random(0)))
    bf16_lines = args.bf16_lines or (args.lines if facts["native_bf16"] else 150)
    print(f"{facts['cpu']} ({facts['matrix_units']}), {args.threads} threads, torch {facts['torch']}; "
          f"{len(sample)} lines of {args.corpus.name}", flush=True)

    limits, routes = {}, {}
    for model, config in (("minilm", ctxvec.load("minilm").encoder.config),
                          ("seed", ctxvec.EncoderConfig())):
        for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            routes[(model, precision)] = matmul_limit(config, dtype)
            limits[(model, precision)] = max(routes[(model, precision)].values())
    routes[("minilm", "int8")] = int8_matmul_limit(ctxvec.load("minilm").encoder.config)
    limits[("minilm", "int8")] = max(routes[("minilm", "int8")].values())
    print("matmul GFLOP/s by route:", {f"{m} {p}": {r: round(v, 1) for r, v in by.items()}
                                       for (m, p), by in routes.items()}, flush=True)

    systems = minilm_systems(sample, sample[:bf16_lines]) + seed_systems(sample[: args.seed_lines])
    workdir = tempfile.TemporaryDirectory(prefix="ctxvec-bench-")
    if not args.no_exported:
        timed = set(sample)
        unseen = [line for line in lines if line not in timed]
        calibration = (random.Random(1).sample(unseen, 256) if not args.passages  # NNCF's: not the timed text
                       else passages(unseen, 64, args.passages, random.Random(1)))
        systems += exported_systems(sample, sample[:bf16_lines], args.threads, Path(workdir.name), calibration)
    worker = command_malloc_systems(systems, sample, sample[:bf16_lines], args.threads, Path(workdir.name))
    time_systems(systems, args.rounds, slow_rounds=1)
    if worker:
        worker.close()
    workdir.cleanup()
    checks = check_outputs(systems)
    configs = {"minilm": ctxvec.load("minilm").encoder.config, "seed": ctxvec.EncoderConfig()}

    rows = []
    for s in systems:
        t = statistics.median(s.times)
        flops = inference_flops(configs[s.model], s.lengths)
        gflops = flops / t / 1e9
        rows.append({
            "system": s.name, "model": s.model, "precision": s.precision, "lines": s.lines,
            "rounds": len(s.times), "median_s": t, "sentences_per_s": s.lines / t,
            "tokens_per_s": sum(s.lengths) / t, "gflops": gflops,
            "matmul_limit_gflops": limits[(s.model, s.precision)],
            "fraction_of_limit": gflops / limits[(s.model, s.precision)],
            "padding_ratio": 1 - sum(s.lengths) / s.padded_slots, "peak_mb": s.peak_mb,
            "check": checks[s.name], "times": s.times,
        })
    by = {r["system"]: r for r in rows}

    def ratio(a, b):
        return by[a]["sentences_per_s"] / by[b]["sentences_per_s"]

    ratios = {
        "ctxvec fp32 / sentence-transformers fp32": ratio("ctxvec fp32", "sentence-transformers fp32"),
        "ctxvec bf16 / sentence-transformers fp32": ratio("ctxvec bf16", "sentence-transformers fp32"),
        "ctxvec bf16 / sentence-transformers bf16": ratio("ctxvec bf16", "sentence-transformers bf16"),
        "ctxvec fp32 / HF BertModel unsorted": ratio("ctxvec fp32", "HF BertModel fp32, unsorted batches of 32"),
        **{f"ctxvec {p} / ctxvec {p}, one stream": ratio(f"ctxvec {p}", f"ctxvec {p}, one stream") for p in ("fp32", "bf16")},
        **{f"ctxvec {p}{COMMAND} / {other}": ratio(f"ctxvec {p}{COMMAND}", other)
           for p in ("fp32", "bf16") if f"ctxvec {p}{COMMAND}" in by
           for other in (f"ctxvec {p}", f"sentence-transformers {p}", f"OpenVINO {p}", f"OpenVINO {p} throughput")
           if other in by},
        **{f"ctxvec {p} / {peer}": ratio(f"ctxvec {p}", peer)
           for p in ("fp32", "bf16") for peer in (f"ONNX Runtime {p}", f"OpenVINO {p}", f"OpenVINO {p} throughput")
           if peer in by},
        "seed: ctxvec / nn.TransformerEncoder, same batches":
            ratio("ctxvec EncoderStack fp32", "nn.TransformerEncoder fast path, same batches"),
        "seed: ctxvec / nn.TransformerEncoder, unsorted":
            ratio("ctxvec EncoderStack fp32", "nn.TransformerEncoder fast path, unsorted batches of 32"),
    }
    result = {"machine": facts, "threads": args.threads, "corpus": args.corpus.name, "lines": args.lines,
              "passages": args.passages, "tokens_per_text": statistics.median(full_lengths(sample)),
              "seed_lines": args.seed_lines, "bf16_lines": bf16_lines, "rounds": args.rounds,
              "batch_tokens": {p: default_batch_tokens(precision_dtype(p)) for p in ("fp32", "bf16")},
              "date": time.strftime("%Y-%m-%d"),
              "matmul_limits": {f"{m} {p}": v for (m, p), v in limits.items()},
              "matmul_routes": {f"{m} {p}": by for (m, p), by in routes.items()}, "systems": rows, "ratios": ratios}
    name = "bench_encode_passages" if args.passages else "bench_encode"
    write_results(name, result, markdown(result), args.out, update=not args.no_update)


def passages(lines: list[str], n: int, k: int, rng: random.Random) -> list[str]:
    """n texts of k to 2k random lines joined by spaces: passages as retrieval indexes them."""
    return [" ".join(rng.sample(lines, rng.randint(k, 2 * k))) for _ in range(n)]


def full_lengths(texts: list[str]) -> list[int]:
    """MiniLM's tokens per text (special tokens included, before truncation)."""
    return [e.n_tokens_full for e in ctxvec.load("minilm").tokenizer.tokenize(texts)]


def markdown(r: dict) -> str:
    m = r["machine"]
    out = [f"Machine: {m['cpu']}, matrix units: **{m['matrix_units']}** ({', '.join(m['simd'])}; native bf16: "
           f"{'yes' if m['native_bf16'] else 'no'}), "
           f"{r['threads']} threads, torch {m['torch']}, Python {m['python']}; {r['date']}. malloc: the system's "
           "for every system in the benchmark's process; the rows \"as the command runs\" are ctxvec in a process "
           "of its own under jemalloc, as the `ctxvec` command runs (`benchmarks/command_malloc.py`).",
           (f"Text: {r['lines']} random lines of `{r['corpus']}` (MiniLM)" if not r.get("passages") else
            f"Text: {r['lines']} passages of {r['passages']} to {2 * r['passages']} random lines of `{r['corpus']}` "
            f"joined (MiniLM; median {r['tokens_per_text']:.0f} tokens, cut to its 256)")
           + f", the first {r['seed_lines']} of them "
           f"(seed config), the first {r['bf16_lines']} for bf16; median of {r['rounds']} rounds "
           f"(bf16 without native support: 1 round); ctxvec batches: length-sorted, "
           + (f"{r['batch_tokens']} tokens. " if isinstance(r['batch_tokens'], int) else
              " and ".join(f"{n} tokens in {p}" for p, n in r['batch_tokens'].items()) + " (its defaults). ") +
           "Padding in batches: padded share of the (B, T) batches; ctxvec's matrix multiplies skip it "
           "(packed tokens), only its attention sees it.",
           "Matmul limit: the model's own GEMMs (QKV, out, FFN) at 1024 tokens, measured in the same run by "
           "PyTorch's CPU routes (fp32, bf16: F.linear and the oneDNN linear; int8: oneDNN's quantized linear, "
           "GOP/s), the best one counting: "
           + ", ".join(f"{k} {max(by.values()):.1f} GFLOP/s ("
                       + " / ".join(f"{route} {v:.1f}" for route, v in by.items()) + ")"
                       for k, by in r["matmul_routes"].items()) + ".",
           "",
           "| system | precision | sentences/s | tokens/s | GFLOP/s | of matmul limit | padding in batches | peak MB | output check |",
           "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for s in r["systems"]:
        out.append(f"| {s['system']} ({s['model']}) | {s['precision']} | {s['sentences_per_s']:.1f} | "
                   f"{s['tokens_per_s']:.0f} | {s['gflops']:.1f} | {100 * s['fraction_of_limit']:.0f}% | "
                   f"{100 * s['padding_ratio']:.0f}% | {s['peak_mb']:.0f} | {s['check']} |")
    out += ["", "| ratio (sentences/s) | value |", "|---|---:|"]
    out += [f"| {k} | {v:.2f}x |" for k, v in r["ratios"].items()]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
