"""Does `ctxvec serve` stay flat in memory under a long load, in every precision?

Starts `ctxvec serve --precision P --threads T` (as bench_serve.py does), then C clients, each on
its own keep-alive connection, send requests back to back for --seconds: each request holds 1 to
32 consecutive verses of the World English Bible (half of them a single verse, the others a
number drawn evenly from 2 to 32, seeded), so that batches of every shape come and go. Every
answer is checked (as many unit vectors as texts). The server's resident memory (VmRSS) is
sampled every --every seconds and reported as embed_memory.py reports it: at a quarter of the
run, half, three quarters, 90%, the end, and the peak, each point the median of the samples
within 5% of the run around it; growth compares 90% with 25%. Flat: what the server holds after
its first quarter does not grow with the requests it has answered (Text Embeddings Inference's
#156: memory that grew over hundreds of thousands of requests).

    .venv/bin/python benchmarks/serve_memory.py [--seconds 300] [--clients 64] [--precisions fp32 bf16]

Writes benchmarks/results/serve_memory.{json,md} and updates BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import random
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import Connection, ctxvec_server  # noqa: E402
from common import ROOT, SHARED_WEB, machine, write_results  # noqa: E402
from embed_memory import MEMORY_COLUMNS, memory_cells, memory_points, rss_mb  # noqa: E402

from ctxvec.malloc import in_use  # noqa: E402

MAX_TEXTS = 32  # texts in the largest request


async def load(port: int, path: str, texts: list[str], clients: int, seconds: float, counts: list[int]) -> None:
    """``clients`` closed loops for ``seconds``; ``counts`` [requests, sentences] grows as answers arrive."""
    connections = [await Connection.open(port, path) for _ in range(clients)]
    stop_at = time.perf_counter() + seconds

    async def client(connection: Connection, rng: random.Random) -> None:
        while time.perf_counter() < stop_at:
            n = 1 if rng.random() < 0.5 else rng.randint(2, MAX_TEXTS)
            first = rng.randrange(len(texts) - n)
            body = json.dumps({"input": texts[first:first + n], "model": "minilm",
                               "encoding_format": "base64"}).encode()
            answer = await connection.post(body)
            vectors = [np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4") for item in answer["data"]]
            norms = np.linalg.norm(np.stack(vectors), axis=1) if vectors else np.zeros(0)
            if len(vectors) != n or not np.allclose(norms, 1.0, atol=1e-3):
                raise RuntimeError(f"{len(vectors)} vectors for {n} texts, norms {norms[:4]}")
            counts[0] += 1
            counts[1] += n

    await asyncio.gather(*(client(c, random.Random(i)) for i, c in enumerate(connections)))
    for c in connections:
        c.close()


def run(texts: list[str], precision: str, threads: int, clients: int, seconds: float, every: float) -> dict:
    server = ctxvec_server(threads, precision)
    counts = [0, 0]
    samples: list[tuple[float, float]] = []  # (seconds, MB)
    done = threading.Event()
    start = time.perf_counter()

    def sample() -> None:
        while not done.is_set():
            mb = rss_mb(server.proc.pid)
            if mb is not None:
                samples.append((time.perf_counter() - start, mb))
            done.wait(every)

    sampler = threading.Thread(target=sample, daemon=True)
    try:
        loaded, malloc = rss_mb(server.proc.pid), in_use(server.proc.pid)
        sampler.start()
        asyncio.run(load(server.port, server.path, texts, clients, seconds, counts))
    finally:
        done.set()
        sampler.join()
        server.stop()
    return {"precision": precision, "malloc": malloc, "seconds": seconds, "requests": counts[0], "sentences": counts[1],
            "samples": len(samples), "loaded_mb": loaded, **memory_points(samples)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=300.0, help="of load, per precision")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--every", type=float, default=1.0, help="seconds between samples")
    args = parser.parse_args()
    if not SHARED_WEB.exists():
        sys.exit(f"{SHARED_WEB} is not here: the benchmark needs the shared corpus.")
    facts = machine()
    texts = [line for line in SHARED_WEB.read_text(encoding="utf-8").splitlines() if line.strip()]
    runs = []
    for precision in args.precisions:
        runs.append(run(texts, precision, args.threads, args.clients, args.seconds, args.every))
        r = runs[-1]
        print(f"{precision}: {r['requests']:,} requests, {r['sentences'] / r['seconds']:.0f} sentences/s, "
              f"resident MB {r['rss_mb']}, growth {r['growth_after_first_quarter_mb']:+.0f}", flush=True)
    result = {"machine": facts, "date": time.strftime("%Y-%m-%d"), "clients": args.clients, "threads": args.threads,
              "runs": runs}
    md = [f"Machine: {facts['cpu']}, matrix units: **{facts['matrix_units']}**, {args.threads} threads, torch "
          f"{facts['torch']}; {result['date']}. `ctxvec serve` (MiniLM) under {args.clients} closed-loop clients "
          f"for {args.seconds:g} s per precision, each request 1 to {MAX_TEXTS} verses of the World English Bible "
          "(half of them one), every answer checked; the server's resident memory (MB) sampled every "
          f"{args.every:g} s, each point the median of the samples within 5% of the run around it; growth: "
          "90% against 25%.", "",
          f"| precision | malloc | requests | sentences/s | loaded | {MEMORY_COLUMNS} |",
          "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        md.append(f"| {r['precision']} | {r['malloc']} | {r['requests']:,} | {r['sentences'] / r['seconds']:.0f} | "
                  f"{r['loaded_mb']:.0f} | {memory_cells(r)} |")
    write_results("serve_memory", result, "\n".join(md) + "\n", ROOT / "benchmarks" / "results", update=True)


if __name__ == "__main__":
    main()
