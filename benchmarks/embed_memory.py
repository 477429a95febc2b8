"""Does `ctxvec embed` stay flat in memory over a long file, in every precision?

Writes a file of --lines texts (the lines of web_en.txt, shuffled, repeated as needed), runs
`ctxvec embed FILE -o vectors.npy --precision P --threads T` for each precision, samples the
process's resident memory (VmRSS) every --every seconds, and reports it at a quarter of the run,
half, three quarters, the end, and the peak. Flat: what the process holds after its first
quarter does not grow with the lines it has read. Each point is the median of the samples in a
window of a tenth of the run around it (a single sample can fall just after ctxvec hands freed
memory back, ~70-90 MB lower); the growth compares the window at 90% of the run with the one at 25%
(the last sample comes after the final hand-back).

    .venv/bin/python benchmarks/embed_memory.py [--lines 100000] [--precisions fp32 bf16] [--threads 2]

Writes benchmarks/results/embed_memory.{json,md} and updates BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, SHARED_WEB, machine, write_results  # noqa: E402

from ctxvec.malloc import in_use  # noqa: E402


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def run(file: Path, out: Path, precision: str, threads: int, every: float) -> dict:
    cmd = [sys.executable, "-m", "ctxvec", "embed", str(file), "-o", str(out), "--precision", precision,
           "--threads", str(threads)]
    start = time.perf_counter()
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    samples = []  # (seconds, MB)
    malloc = None
    while process.poll() is None:
        mb = rss_mb(process.pid)
        if mb is not None:
            samples.append((time.perf_counter() - start, mb))
            malloc = in_use(process.pid) or malloc  # the command starts itself under jemalloc
        time.sleep(every)
    stderr = process.stderr.read()
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({process.returncode}): {stderr.strip()[-500:]}")
    seconds = time.perf_counter() - start
    return {"precision": precision, "malloc": malloc, "seconds": seconds, "samples": len(samples),
            **memory_points(samples)}


def memory_points(samples: list[tuple[float, float]]) -> dict:
    """The resident memory of (seconds, MB) samples at 25%, 50%, 75% and 90% of the run (each the
    median of the samples within 5% of the run around it), at the end and at its peak; and the
    growth after the first quarter (90% against 25%)."""
    total = samples[-1][0]

    def at(fraction: float) -> float:
        window = [mb for t, mb in samples if abs(t - fraction * total) <= 0.05 * total]
        return statistics.median(window or [min(samples, key=lambda s: abs(s[0] - fraction * total))[1]])

    return {"rss_mb": {"25%": at(0.25), "50%": at(0.5), "75%": at(0.75), "90%": at(0.9), "end": samples[-1][1],
                       "peak": max(mb for _, mb in samples)},
            "growth_after_first_quarter_mb": at(0.9) - at(0.25)}


MEMORY_COLUMNS = "at 25% | 50% | 75% | 90% | end | peak | growth after the first quarter"


def memory_cells(run: dict) -> str:
    """A run's ``memory_points`` as the table's cells under ``MEMORY_COLUMNS``."""
    m = run["rss_mb"]
    return (f"{m['25%']:.0f} | {m['50%']:.0f} | {m['75%']:.0f} | {m['90%']:.0f} | {m['end']:.0f} | "
            f"{m['peak']:.0f} | {run['growth_after_first_quarter_mb']:+.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=100_000)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--every", type=float, default=1.0, help="seconds between samples")
    args = parser.parse_args()
    facts = machine()
    lines = [line for line in SHARED_WEB.read_text(encoding="utf-8").splitlines() if line.strip()]
    rng = random.Random(0)
    texts = []
    while len(texts) < args.lines:
        texts += rng.sample(lines, len(lines))
    with tempfile.TemporaryDirectory(prefix="ctxvec-memory-") as tmp:
        file = Path(tmp) / "texts.txt"
        file.write_text("\n".join(texts[: args.lines]) + "\n", encoding="utf-8")
        runs = [run(file, Path(tmp) / f"{p}.npy", p, args.threads, args.every) for p in args.precisions]
    result = {"machine": facts, "date": time.strftime("%Y-%m-%d"), "lines": args.lines, "threads": args.threads,
              "runs": runs}
    md = [f"Machine: {facts['cpu']}, matrix units: **{facts['matrix_units']}**, {args.threads} threads, torch "
          f"{facts['torch']}; {result['date']}. `ctxvec embed` of {args.lines:,} lines of `web_en.txt` "
          "(shuffled, repeated), MiniLM; the process's resident memory (MB) sampled every "
          f"{args.every:g} s, each point the median of the samples within 5% of the run around it; growth: "
          "90% against 25%.", "",
          f"| precision | malloc | lines/s | {MEMORY_COLUMNS} |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        md.append(f"| {r['precision']} | {r['malloc']} | {args.lines / r['seconds']:.0f} | {memory_cells(r)} |")
    write_results("embed_memory", result, "\n".join(md) + "\n", ROOT / "benchmarks" / "results", update=True)


if __name__ == "__main__":
    main()
