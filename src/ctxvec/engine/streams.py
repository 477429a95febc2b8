"""Streams: whole forward passes side by side, each on its own share of the CPU threads.

One forward pass on N intra-op threads splits every operator N ways and joins the threads
after it: worth it for the large matrix multiplies, a loss for the many small steps around
them (residual adds, LayerNorm, softmax, gathers), each of which pays the fork and join. With
a CPU's matrix units the multiplies are short and the small steps are much of the time. N
streams instead run N batches at once, one per thread (as OpenVINO's throughput mode does):
the same batches, so the same vectors in fp32; more batches in flight, so more memory.
Measured on 2 threads (MiniLM, 1,500 lines; ``benchmarks/bench_encode.py`` races both):
+15% in bf16 on an AMX Xeon, +3% in fp32. A call with few batches keeps one stream, so that
its latency does not grow.

Each stream is a thread that sets its own intra-op thread count (OpenMP's count is per
thread); the caller's count is restored for threads started later.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import chain, islice
from typing import TypeVar

import torch

from ctxvec.validation import is_int

Item = TypeVar("Item")
Result = TypeVar("Result")

MIN_BATCHES_PER_STREAM = 2  # fewer: the last batches would leave threads idle


@dataclass(frozen=True)
class StreamPlan:
    """``streams`` threads side by side, each running its batches on ``threads_each`` intra-op threads."""

    streams: int
    threads_each: int


def plan_streams(batches: int | None, threads: int, streams: int | None = None) -> StreamPlan:
    """How ``batches`` forward passes (None: an endless run of them, a server's) share
    ``threads`` CPU threads.

    ``streams`` None: one stream per thread, as many as have ``MIN_BATCHES_PER_STREAM`` batches
    each (one stream for a short call). A number: that many (at most one per thread and batch).
    """
    most = threads if batches is None else min(threads, batches)
    if streams is None:
        streams = most if batches is None else batches // MIN_BATCHES_PER_STREAM
    elif not is_int(streams) or streams < 1:
        raise ValueError(f"streams must be a positive integer or None (automatic), got {streams!r}.")
    streams = max(1, min(streams, most))
    return StreamPlan(streams, max(1, threads // streams))


def off_main_thread(plan: StreamPlan, items: int) -> bool:
    """Whether a single stream of one thread runs in a thread of its own: where the caller is the
    process's main thread and there are two items or more. Under jemalloc (the ``ctxvec``
    command's malloc) the main thread's forward passes in bf16 fault pages in again and again:
    2,048-token batches on one AMX Xeon thread took ~200,000 page faults a run of 1,500 lines
    (16-21% of the time in the kernel) where the same batches in another thread took 5,000-20,000
    and ran ~1.25x as fast (`ctxvec embed --threads 1`, 6,000 lines: 8.69 against 9.87 s). A single
    item stays: starting the thread costs ~0.75 ms, a sixth of one short text's call. Several
    threads in one stream stay too: the caller's OpenMP team must stay the only one (``serve.worker``)."""
    return plan.threads_each == 1 and items > 1 and threading.current_thread() is threading.main_thread()


def run_in_streams(work: Callable[[Item], Result], items: Iterable[Item], plan: StreamPlan,
                   ) -> Iterator[Result]:
    """``work(item)`` for every item, in order, on ``plan.streams`` threads under inference mode.

    At most two items per stream are in flight besides the one handed back, so memory stays
    bounded however many items come; an error in ``work`` is raised here, and the items not
    yet started are dropped. One stream runs in the calling thread, unless ``off_main_thread``
    moves it. Inference mode holds only around ``work``: never across a ``yield``, so the
    caller's own code between results runs in its own mode, whatever the plan.
    """
    remaining = iter(items)
    first = list(islice(remaining, 2))
    remaining = chain(first, remaining)
    if plan.streams == 1 and not off_main_thread(plan, len(first)):
        for item in remaining:
            with torch.inference_mode():
                result = work(item)
            yield result
        return

    def in_stream(item: Item) -> Result:
        if torch.get_num_threads() != plan.threads_each:  # this thread's own count (OpenMP's is per thread)
            torch.set_num_threads(plan.threads_each)
        with torch.inference_mode():  # inference mode is per thread too
            return work(item)

    caller_threads = torch.get_num_threads()
    pool = ThreadPoolExecutor(plan.streams, thread_name_prefix="ctxvec-stream")
    try:
        pending: deque[Future[Result]] = deque(pool.submit(in_stream, item)
                                               for item in islice(remaining, 2 * plan.streams))
        while pending:
            result = pending.popleft().result()
            pending.extend(pool.submit(in_stream, item) for item in islice(remaining, 1))
            yield result
    finally:
        try:
            pool.shutdown(wait=True, cancel_futures=True)
        finally:  # even when a second Ctrl-C cuts the wait short
            torch.set_num_threads(caller_threads)  # the default for threads started from now on
