"""The inference worker: one thread owns the model and batches the texts of every waiting request.

Requests hand in ``Job``s (texts already tokenized, so that the queue is counted in tokens).
The worker keeps one pool of the texts still to compute, whatever request they came from, and
before every forward pass it takes in the jobs that arrived meanwhile (continuous batching: a
request never waits for the batch at hand to finish before it can join the next one). Each batch
is built around the oldest text in the pool: its neighbours in length, under the token budget, so
that padding stays small and no text waits behind more than the texts older than it. A job is
answered, in its own order, as soon as its last text is done. The worker wakes as soon as a job
arrives: a request never waits for a full batch when the worker is idle. PyTorch's intra-op
threads do the parallel work inside each forward pass.

The queue is bounded in tokens (texts not yet computed): ``submit`` refuses a job that would
overflow it (the server answers 429). A job whose request gave up (timeout, client gone) is
cancelled: its texts not yet computed are dropped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Literal

from ctxvec.engine.batching import LENGTH_MULTIPLE
from ctxvec.engine.runtime import release_memory
from ctxvec.pipeline import BatchShape, Pipeline
from ctxvec.tokenizer import Encoded

log = logging.getLogger(__name__)

Kind = Literal["embed", "encode"]
POOL_WINDOW = 4096  # the oldest texts a batch is chosen from (a full pool would cost a sort per batch)
TRIM_EVERY = 10.0  # seconds between giving freed memory back under constant load (and on going idle)


class TooBig(Exception):
    """A job with more tokens than the queue may ever hold."""


class QueueFull(Exception):
    """The queue has no room for the job now; ``retry_after`` seconds is a fair wait."""

    def __init__(self, queued_tokens: int, retry_after: int) -> None:
        super().__init__(f"the server is busy ({queued_tokens} tokens queued); retry in {retry_after} s.")
        self.retry_after = retry_after


@dataclass(eq=False)
class Job:
    """One request's texts, and the future its results arrive on (in the texts' order)."""

    kind: Kind
    texts: list[str]
    encoded: list[Encoded]
    future: Future = field(default_factory=Future)
    abandoned: str | None = None  # why its request gave up, if it did
    results: list = field(init=False)
    left: int = field(init=False)  # texts not computed yet
    tokens: int = field(init=False)  # of all its texts

    def __post_init__(self) -> None:
        self.results, self.left = [None] * len(self.texts), len(self.texts)
        self.tokens = sum(len(e.ids) for e in self.encoded)


@dataclass(eq=False)
class Pending:
    """One text of a started job, waiting in the pool."""

    job: Job
    place: int  # its index in the job

    @property
    def length(self) -> int:
        return len(self.job.encoded[self.place].ids)


@dataclass
class WorkerEvents:
    """What the worker reports (the server turns it into metrics); every hook is optional."""

    on_queue: Callable[[int, int], None] = lambda texts, tokens: None  # texts, tokens not computed yet
    on_batch: Callable[[BatchShape], None] = lambda shape: None  # every forward pass
    on_computed: Callable[[int, float], None] = lambda tokens, seconds: None  # a forward pass: tokens, time
    on_dropped: Callable[[str, int], None] = lambda reason, texts: None  # texts never computed


def batch_around_oldest(lengths: list[int], oldest: int, batch_tokens: int) -> list[int]:
    """Indices into ``lengths`` for the next batch: the text ``oldest`` and its neighbours in
    length, taken one at a time from whichever side is closer in length, while ``len(batch) *
    longest <= batch_tokens`` (lengths rounded up to ``LENGTH_MULTIPLE``, as the pipeline pads)."""
    rounded = [-(-n // LENGTH_MULTIPLE) * LENGTH_MULTIPLE for n in lengths]
    order = sorted(range(len(lengths)), key=rounded.__getitem__)
    lo = hi = order.index(oldest)
    width = rounded[oldest]
    while True:
        n = hi - lo + 2
        left = lo > 0 and n * width <= batch_tokens
        right = hi + 1 < len(order) and n * max(width, rounded[order[hi + 1]]) <= batch_tokens
        if left and right:  # the closer in length; the shorter one on a tie (no wider batch)
            left = width - rounded[order[lo - 1]] <= rounded[order[hi + 1]] - width
            right = not left
        if left:
            lo -= 1
        elif right:
            hi += 1
            width = max(width, rounded[order[hi]])
        else:
            return order[lo:hi + 1]


class InferenceWorker:
    """The thread that owns ``pipeline`` (see the module's docstring).

    Args:
        pipeline: the model; nothing else may use it while the worker runs.
        batch_tokens: padded tokens per forward pass.
        max_queue_tokens: the queue's bound, in tokens not computed yet.
        events: hooks for metrics.
    """

    def __init__(self, pipeline: Pipeline, batch_tokens: int, max_queue_tokens: int,
                 events: WorkerEvents | None = None) -> None:
        self.pipeline = pipeline
        self.batch_tokens = batch_tokens
        self.max_queue_tokens = max_queue_tokens
        self.events = events or WorkerEvents()
        self._queue: deque[Job] = deque()  # submitted, not yet in the pool
        self._pool: list[Pending] = []  # the worker's alone, in arrival order
        self._open_texts = 0  # texts not computed yet, queued or pooled
        self._open_tokens = 0
        self._wake = threading.Condition()
        self._stop = False
        self._tokens_per_second = 0.0
        self._trimmed_at = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="ctxvec-inference", daemon=True)

    def start(self) -> InferenceWorker:
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the batch at hand, refuse the rest, and end the thread."""
        with self._wake:
            self._stop = True
            self._wake.notify()
        self._thread.join(timeout)

    # ---- requests' side -----------------------------------------------------------------------
    def submit(self, kind: Kind, texts: list[str], encoded: list[Encoded]) -> Job:
        """Queue a job, or raise ``QueueFull`` (no room now) or ``TooBig`` (never room). Its
        results arrive on ``job.future``."""
        job = Job(kind, texts, encoded)
        if job.tokens > self.max_queue_tokens:
            raise TooBig(f"the request has {job.tokens:,} tokens, more than the server's queue holds "
                         f"({self.max_queue_tokens:,}, --max-queue-tokens); send its texts in several requests.")
        with self._wake:
            if self._open_tokens + job.tokens > self.max_queue_tokens:
                raise QueueFull(self._open_tokens, self._retry_after())
            self._queue.append(job)
            self._count(len(job.texts), job.tokens)
            self._wake.notify()
        return job

    def cancel(self, job: Job, reason: str) -> None:
        """The request gave up: its texts not computed yet are dropped (the worker drops those
        already in its pool before the next batch)."""
        with self._wake:
            job.abandoned = reason
            if job in self._queue:
                self._queue.remove(job)
                self._count(-len(job.texts), -job.tokens)
                job.future.cancel()
                self.events.on_dropped(reason, len(job.texts))

    def _count(self, texts: int, tokens: int) -> None:
        """Change the open texts and tokens (with the lock held) and report them."""
        self._open_texts += texts
        self._open_tokens += tokens
        self.events.on_queue(self._open_texts, self._open_tokens)

    def _retry_after(self) -> int:
        rate = self._tokens_per_second or 1000.0
        return max(1, round(self._open_tokens / rate))

    # ---- the worker's side --------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        """The worker's thread runs (``/health`` says 503 otherwise)."""
        return self._thread.is_alive()

    def _run(self) -> None:
        while self._take_arrivals():
            batch: list[Pending] = []
            try:
                self._drop_abandoned()
                if not self._pool:
                    continue
                batch = self._next_batch()
                self._compute(batch)
            except Exception as err:  # reported to every request of the batch, never lost
                log.exception("inference failed")
                self._fail({p.job for p in batch}, err)
        self._fail({p.job for p in self._pool}, RuntimeError("the server stopped before computing it."))
        with self._wake:
            for job in self._queue:
                job.future.cancel()
            self._queue.clear()

    def _take_arrivals(self) -> bool:
        """Move the jobs that arrived into the pool, waiting while there is nothing to do (and
        giving freed memory back on going idle); False once the worker is stopping."""
        with self._wake:
            idle = not self._queue and not self._pool and not self._stop
        if idle and self._trimmed_at is not None:  # once per idle spell, outside the lock
            release_memory()
            self._trimmed_at = None
        with self._wake:
            while not self._queue and not self._pool and not self._stop:
                self._wake.wait()
            if self._stop:
                return False
            while self._queue:
                job = self._queue.popleft()
                job.future.set_running_or_notify_cancel()  # only cancel() cancels, and it removes the job
                for place in range(len(job.texts)):
                    self._pool.append(Pending(job, place))
            return True

    def _drop_abandoned(self) -> None:
        gone = {p.job for p in self._pool if p.job.abandoned}  # read once: cancel() may mark more meanwhile
        for job in gone:
            self.events.on_dropped(job.abandoned, job.left)
        self._release(gone)

    def _release(self, jobs: set[Job]) -> None:
        """The texts of ``jobs`` not computed yet leave the pool and the count."""
        if not jobs:
            return
        self._pool = [p for p in self._pool if p.job not in jobs]
        with self._wake:
            for job in jobs:
                self._count(-job.left, -sum(len(job.encoded[i].ids) for i, r in enumerate(job.results) if r is None))
                job.left = 0

    def _next_batch(self) -> list[Pending]:
        """The oldest text of the pool, and its neighbours in length of the same kind."""
        oldest = self._pool[0]  # the pool stays in arrival order
        same = [p for p in self._pool[:POOL_WINDOW] if p.job.kind == oldest.job.kind]
        chosen = batch_around_oldest([p.length for p in same], 0, self.batch_tokens)  # same[0] is oldest
        return [same[i] for i in chosen]

    def _compute(self, batch: list[Pending]) -> None:
        """One forward pass (the batch fits the budget); every job it finishes is answered."""
        encoded = [p.job.encoded[p.place] for p in batch]
        start = time.perf_counter()
        if batch[0].job.kind == "embed":
            runs = self.pipeline.sentence_vector_batches(encoded, self.batch_tokens, self.events.on_batch, trim=False)
        else:
            texts = [p.job.texts[p.place] for p in batch]
            runs = self.pipeline.token_vector_batches(texts, encoded, self.batch_tokens, self.events.on_batch,
                                                      trim=False)
        for indices, results in runs:
            for index, result in zip(indices, results):
                batch[index].job.results[batch[index].place] = result
        seconds = time.perf_counter() - start
        done = set(map(id, batch))
        self._pool = [p for p in self._pool if id(p) not in done]
        tokens = sum(map(len, (e.ids for e in encoded)))
        with self._wake:
            self._count(-len(batch), -tokens)
        for p in batch:
            p.job.left -= 1
            if p.job.left == 0:
                p.job.future.set_result(p.job.results)
        self._tokens_per_second = tokens / max(seconds, 1e-9)
        self.events.on_computed(tokens, seconds)
        now = time.monotonic()
        if self._trimmed_at is None:
            self._trimmed_at = now
        elif now - self._trimmed_at > TRIM_EVERY:  # under constant load, now and then
            release_memory()
            self._trimmed_at = now

    def _fail(self, jobs: set[Job], err: BaseException) -> None:
        """Every job of ``jobs`` gets ``err``; its texts leave the pool."""
        self._release(jobs)
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(err)
