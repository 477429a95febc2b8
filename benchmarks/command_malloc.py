"""ctxvec's pipelines in a process of their own, under the malloc the ``ctxvec`` command runs with.

The ``ctxvec`` command starts itself under jemalloc where installed (``ctxvec.malloc``); a program
that imports ctxvec keeps its own malloc. bench_encode's process keeps the system's, since
OpenVINO aborts under a preloaded jemalloc (its plugins free with glibc what jemalloc allocated),
so it times ctxvec as the command runs it here: this worker loads MiniLM in fp32 and bf16 under
jemalloc, and embeds the benchmark's texts when asked, one request at a time; the benchmark's
process waits on the pipe meanwhile, using no CPU, and times each answer as it times the others.

Protocol (stdin/stdout): the benchmark writes ``PRECISION N`` (N texts from the start, or
``all``); the worker answers a JSON line ``{"rows", "dim", "peak_mb"}`` and rows x dim
little-endian float32 values.

    python benchmarks/command_malloc.py TEXTS.json THREADS   (started by CommandMalloc)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np


class CommandMalloc:
    """The worker, seen from the benchmark: ``embed(precision, n)`` -> (n, dim) float32."""

    def __init__(self, texts: dict[str, list[str]], threads: int, workdir: Path) -> None:
        from ctxvec.malloc import JEMALLOC_CONF, jemalloc_path

        library = jemalloc_path()
        if library is None:
            raise RuntimeError("no jemalloc installed")
        spec = workdir / "command_malloc_texts.json"
        spec.write_text(json.dumps(texts), encoding="utf-8")
        env = {**os.environ, "LD_PRELOAD": library, "MALLOC_CONF": os.environ.get("MALLOC_CONF", JEMALLOC_CONF)}
        self.proc = subprocess.Popen([sys.executable, __file__, str(spec), str(threads)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=env)
        malloc = self.proc.stdout.readline().decode().strip()  # what the worker's loader mapped
        if malloc != "jemalloc":
            raise RuntimeError(f"the worker runs under {malloc or 'nothing: it stopped'}, not jemalloc")
        self.peak_mb = 0.0

    def embed(self, precision: str, n: int | None = None) -> np.ndarray:
        self.proc.stdin.write(f"{precision} {'all' if n is None else n}\n".encode())
        self.proc.stdin.flush()
        head = json.loads(self.proc.stdout.readline())
        data = self.proc.stdout.read(head["rows"] * head["dim"] * 4)
        self.peak_mb = head["peak_mb"]
        return np.frombuffer(data, dtype="<f4").reshape(head["rows"], head["dim"])

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def serve(spec: Path, threads: int) -> None:
    import torch

    import ctxvec
    from ctxvec.malloc import in_use
    from common import peak_rss, reset_peak_rss

    # The pipe carries answers only: whatever else writes to standard output (Python, or a C
    # library's own messages) goes to standard error.
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    torch.set_num_threads(threads)
    texts = json.loads(spec.read_text(encoding="utf-8"))
    pipelines = {p: ctxvec.load("minilm", precision=p) for p in texts}
    out.write(f"{in_use()}\n".encode())
    out.flush()
    for line in sys.stdin:
        precision, n = line.split()
        base = reset_peak_rss()
        vectors = np.ascontiguousarray(pipelines[precision].embed(texts[precision][:None if n == "all" else int(n)]),
                                       dtype="<f4")
        head = {"rows": vectors.shape[0], "dim": vectors.shape[1], "peak_mb": (peak_rss() - base) / 2**20}
        out.write((json.dumps(head) + "\n").encode() + vectors.tobytes())
        out.flush()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    serve(Path(sys.argv[1]), int(sys.argv[2]))
