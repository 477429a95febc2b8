"""The inference worker: one thread owns the model and batches the texts of every waiting request.

Requests hand in ``Job``s (texts already tokenized, so that the queue is counted in tokens).
The worker keeps one pool of the texts still to compute, whatever request they came from, and
before every forward pass it takes in the jobs that arrived meanwhile (continuous batching: a
request never waits for the batch at hand to finish before it can join the next one). Each batch
is built around the oldest text in the pool: its neighbours in length, under the token budget, so
that padding stays small and no text waits behind more than the texts older than it (where what
waits would not give every idle stream a full batch, under one stream's share: ``share_tokens``;
a stream that finds the others all busy takes a full batch, as no other could take the rest now). A job is
answered, in its own order, as soon as its last text is done. The worker wakes as soon as a job
arrives: a request never waits for a full batch when the worker is idle.

The worker computes in streams (as ``engine.streams`` does for a long call): one thread per
stream, each taking the next batch from the pool as it is free. Under load each stream runs its
batch on its share of the CPU threads, side by side, so that the forward passes' many small
steps do not each wait for every thread (and for the cores the HTTP side takes). A batch that
finds the other streams idle (and none ran side by side in the last ``SIDE_BY_SIDE_MEMORY``)
runs on all the threads (one request alone gets the whole machine), but only in the lead
stream, which is woken first whenever it is idle: it is the one thread that ever runs kernels
on several OpenMP threads. GNU OpenMP, which PyTorch runs on,
stops spinning between parallel steps while a second team of its threads is alive, even an idle
one, and each step then waits for its threads to wake: a single text took 2.5x as long on 2
threads (16.5 against 6.2 ms, bf16, AMX Xeon; ``ctxvec serve`` loads the model in a thread
that ends, so that the lead stream's team is the only one).

The queue is bounded in tokens (texts not yet computed): ``submit`` refuses a job that would
overflow it (the server answers 429). A job whose request gave up (timeout, client gone) is
cancelled: its texts not yet computed are dropped. Freed memory goes back to the system once the
worker has been idle for ``IDLE_TRIM_AFTER`` (trimming after every lone request cost it ~1.5 ms)
and every ``TRIM_EVERY`` under constant load.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Literal

import torch

from ctxvec.engine.runtime import release_memory
from ctxvec.engine.streams import plan_streams
from ctxvec.pipeline import BatchShape, Pipeline
from ctxvec.tokenizer import Encoded

log = logging.getLogger(__name__)

Kind = Literal["embed", "encode"]
POOL_WINDOW = 4096  # the oldest texts a batch is chosen from (a full pool would cost a sort per batch)
MIN_SHARE_TOKENS = 256  # below this many padded tokens a stream's share of a lone request, it stays whole
TRIM_EVERY = 10.0  # seconds between giving freed memory back under constant load
IDLE_TRIM_AFTER = 1.0  # seconds idle before freed memory goes back
SIDE_BY_SIDE_MEMORY = 1.0  # seconds after batches last ran side by side that a lone one still takes its share


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
    lengths: list[int] = field(init=False)  # each text's tokens
    tokens: int = field(init=False)  # of all its texts

    def __post_init__(self) -> None:
        self.results, self.left = [None] * len(self.texts), len(self.texts)
        self.lengths = [len(e.ids) for e in self.encoded]
        self.tokens = sum(self.lengths)


@dataclass(eq=False, slots=True)
class Pending:
    """One text of a started job, waiting in the pool, with its length and padded width (found
    once: a loaded server chooses every batch from up to ``POOL_WINDOW`` of them)."""

    job: Job
    place: int  # its index in the job
    length: int  # its tokens
    width: int  # its tokens as the pipeline pads them (``Pipeline.width_rule``)


@dataclass
class WorkerEvents:
    """What the worker reports (the server turns it into metrics); every hook is optional."""

    on_queue: Callable[[int, int], None] = lambda texts, tokens: None  # texts, tokens not computed yet
    on_batch: Callable[[BatchShape], None] = lambda shape: None  # every forward pass
    on_computed: Callable[[int, float], None] = lambda tokens, seconds: None  # a forward pass: tokens, time
    on_dropped: Callable[[str, int], None] = lambda reason, texts: None  # texts never computed


def share_tokens(widths: Iterable[int], batch_tokens: int, streams: int) -> int:
    """The budget of the next batch, given the padded widths of the texts it may be chosen from
    (read only until they fill a batch for every stream):
    ``batch_tokens``, unless they hold less than a full batch for each of the ``streams`` (those
    free to take one now); then
    each stream's share, a quarter over an equal one (a batch pads its texts to its longest, and
    a third batch for a remainder would run after the others), so that a lone request of many
    texts is computed by every stream at once: on 2 AMX Xeon cores in bf16, 32 texts in ~47 ms
    against ~60 as one batch on both threads, while a loaded server still runs full batches.
    Texts of less than ``MIN_SHARE_TOKENS`` a stream stay one batch."""
    if streams < 2:
        return batch_tokens
    waiting = 0
    for width in widths:
        waiting += width
        if waiting >= streams * batch_tokens:
            return batch_tokens
    if waiting < streams * MIN_SHARE_TOKENS:
        return batch_tokens
    return min(batch_tokens, -(-5 * waiting // (4 * streams)))


def batch_around_oldest(widths: list[int], oldest: int, batch_tokens: int) -> list[int]:
    """Indices into ``widths`` (texts' lengths as the pipeline pads them: its ``width_rule()``)
    for the next batch: the text ``oldest`` and its neighbours in width, taken one at a time from
    whichever side is closer, while ``len(batch) * widest <= batch_tokens``."""
    order = sorted(range(len(widths)), key=widths.__getitem__)
    lo = hi = order.index(oldest)
    width = widths[oldest]
    while True:
        n = hi - lo + 2
        left = lo > 0 and n * width <= batch_tokens
        right = hi + 1 < len(order) and n * max(width, widths[order[hi + 1]]) <= batch_tokens
        if left and right:  # the closer in length; the shorter one on a tie (no wider batch)
            left = width - widths[order[lo - 1]] <= widths[order[hi + 1]] - width
            right = not left
        if left:
            lo -= 1
        elif right:
            hi += 1
            width = max(width, widths[order[hi]])
        else:
            return order[lo:hi + 1]


class InferenceWorker:
    """The threads that own ``pipeline`` (see the module's docstring).

    Args:
        pipeline: the model; nothing else may use it while the worker runs.
        batch_tokens: padded tokens per forward pass.
        max_queue_tokens: the queue's bound, in tokens not computed yet.
        events: hooks for metrics.
        streams: batches computed side by side (default: one per CPU thread PyTorch uses; 1:
            one batch at a time on all of them).
    """

    def __init__(self, pipeline: Pipeline, batch_tokens: int, max_queue_tokens: int,
                 events: WorkerEvents | None = None, streams: int | None = None) -> None:
        self.threads = torch.get_num_threads()
        plan = plan_streams(None, self.threads, streams)
        self.streams, self._threads_each = plan.streams, plan.threads_each
        self.pipeline = pipeline
        self.batch_tokens = batch_tokens
        self.max_queue_tokens = max_queue_tokens
        self.events = events or WorkerEvents()
        self._width_of = pipeline.width_rule()  # the pipeline's dtype and limit, fixed while it serves
        self._queue: deque[Job] = deque()  # submitted, not yet in the pool
        self._pool: list[Pending] = []  # in arrival order; batches leave it as a stream takes them
        self._open_texts = 0  # texts not computed yet: queued, pooled or being computed
        self._open_tokens = 0
        lock = threading.Lock()  # guards all of the above and the jobs' counts
        self._wake = threading.Condition(lock)  # the streams but the lead wait on it
        self._wake_lead = threading.Condition(lock)  # the lead stream waits on this one
        self._lead_idle = False  # the lead waits, and nobody has called it yet
        self._side_by_side_at = float("-inf")  # when batches last ran (or were about to run) side by side
        self._stop = False
        self._busy = 0  # streams computing a batch
        self._running = 0  # streams not yet ended
        self._tokens_per_second = 0.0
        self._untrimmed = True  # batches ran since memory was last given back
        self._threads = [threading.Thread(target=self._run, args=(i == 0,), name=f"ctxvec-inference-{i}",
                                          daemon=True) for i in range(self.streams)]

    def start(self) -> InferenceWorker:
        self._running = len(self._threads)
        for thread in self._threads:
            thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the batches at hand, refuse the rest, and end the threads."""
        with self._wake:
            self._stop = True
            self._wake.notify_all()
            self._wake_lead.notify_all()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

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
            self._call_a_stream()
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
        """Every stream's thread runs (``/health`` says 503 otherwise)."""
        return all(thread.is_alive() for thread in self._threads)

    def _run(self, lead: bool) -> None:
        """One stream: take a batch, compute it, answer the jobs it finishes; until stopped."""
        while True:
            with self._wake:
                batch = self._take_batch(lead)
                if batch is None:
                    break
                if batch:
                    threads = self._threads_for(lead)
                    self._busy += 1
            if not batch:  # idle: freed memory back to the system, outside the lock
                release_memory()
                continue
            try:
                results = self._compute(batch, threads)
            except Exception as err:  # reported to every request of the batch, never lost
                log.exception("inference failed")
                self._finish(batch, None, err)
                continue
            self._finish(batch, results)
        with self._wake:
            self._running -= 1
            if self._running == 0:  # the last stream out refuses what is left
                self._fail({p.job for p in self._pool}, RuntimeError("the server stopped before computing it."))
                for job in self._queue:
                    job.future.cancel()
                self._queue.clear()

    def _threads_for(self, lead: bool) -> int:
        """(With the lock held, a batch just taken.) All the threads for the lead stream when the
        batch is all there is to do and no batches ran side by side lately (a lone request);
        else the stream's share (under load: a team of threads spinning beside the other streams
        would take the cores they and the HTTP side need)."""
        now = time.monotonic()
        if self._busy > 0 or self._pool:
            self._side_by_side_at = now
        elif lead and now - self._side_by_side_at > SIDE_BY_SIDE_MEMORY:
            return self.threads
        return self._threads_each

    def _take_batch(self, lead: bool) -> list[Pending] | None:
        """(With the lock held.) The next batch, taken out of the pool, waiting while there is
        nothing to do; [] once per idle spell, after ``IDLE_TRIM_AFTER`` (time to give memory
        back); None when stopping."""
        idle_since = None
        while not self._stop:
            while self._queue:  # arrivals join the pool
                job = self._queue.popleft()
                job.future.set_running_or_notify_cancel()  # only cancel() cancels, and it removes the job
                self._pool.extend(Pending(job, place, n, self._width_of(n)) for place, n in enumerate(job.lengths))
            self._drop_abandoned()
            if self._pool:
                batch = self._next_batch()
                taken = set(batch)  # by identity (eq=False)
                self._pool = [p for p in self._pool if p not in taken]
                if self._pool:
                    self._call_a_stream()  # another stream may take the next batch
                return batch
            timeout = None
            if self._busy == 0 and self._untrimmed:
                idle_since = time.monotonic() if idle_since is None else idle_since
                timeout = idle_since + IDLE_TRIM_AFTER - time.monotonic()
                if timeout <= 0:
                    self._untrimmed = False
                    return []
            if lead:
                self._lead_idle = True
                self._wake_lead.wait(timeout)
                self._lead_idle = False
            else:
                self._wake.wait(timeout)
        return None

    def _call_a_stream(self) -> None:
        """(With the lock held.) Wake a waiting stream for the work in hand: the lead if it waits."""
        if self._lead_idle:
            self._lead_idle = False  # called: the next call goes to another stream
            self._wake_lead.notify()
        else:
            self._wake.notify()

    def _drop_abandoned(self) -> None:
        gone = {p.job for p in self._pool if p.job.abandoned}  # read once: cancel() may mark more meanwhile
        for job, dropped in self._release(gone).items():
            self.events.on_dropped(job.abandoned, dropped)

    def _release(self, jobs: set[Job]) -> dict[Job, int]:
        """(With the lock held.) The pooled texts of ``jobs`` leave the pool and the count; how
        many each job lost. (Texts a stream is computing are counted when it is done.)"""
        if not jobs:
            return {}
        dropped = {job: 0 for job in jobs}
        kept = []
        for p in self._pool:
            if p.job in dropped:
                dropped[p.job] += 1
                p.job.left -= 1
                self._count(-1, -p.length)
            else:
                kept.append(p)
        self._pool = kept
        return dropped

    def _next_batch(self) -> list[Pending]:
        """(With the lock held, this stream not yet busy.) The oldest text of the pool and its
        neighbours in length of the same kind, under the budget; or, where what waits would not
        give this stream and each idle one a full batch, under their share (``share_tokens``).
        A busy stream gets none: a share left for it would wait, and under load every batch
        would shrink (64 clients of one text, bf16: 14.5 texts a batch against 17.4)."""
        oldest = self._pool[0]  # the pool stays in arrival order
        same = [p for p in self._pool[:POOL_WINDOW] if p.job.kind == oldest.job.kind]
        budget = share_tokens((p.width for p in same), self.batch_tokens, self.streams - self._busy)
        chosen = batch_around_oldest([p.width for p in same], 0, budget)  # same[0] is oldest
        return [same[i] for i in chosen]

    def _compute(self, batch: list[Pending], threads: int) -> list:
        """One forward pass on ``threads`` CPU threads (the batch fits the budget): its results,
        in the batch's order."""
        if torch.get_num_threads() != threads:  # this thread's own count
            torch.set_num_threads(threads)
        encoded = [p.job.encoded[p.place] for p in batch]
        start = time.perf_counter()
        if batch[0].job.kind == "embed":
            runs = self.pipeline.sentence_vector_batches(encoded, self.batch_tokens, self.events.on_batch, trim=False)
        else:
            texts = [p.job.texts[p.place] for p in batch]
            runs = self.pipeline.token_vector_batches(texts, encoded, self.batch_tokens, self.events.on_batch,
                                                      trim=False)
        results: list = [None] * len(batch)
        for indices, batch_results in runs:
            for index, result in zip(indices, batch_results):
                results[index] = result
        seconds = time.perf_counter() - start
        tokens = sum(map(len, (e.ids for e in encoded)))
        self._tokens_per_second = tokens / max(seconds, 1e-9) * max(1, self._busy)
        self.events.on_computed(tokens, seconds)
        return results

    def _finish(self, batch: list[Pending], results: list | None, err: BaseException | None = None) -> None:
        """The batch's texts leave the count; every job it finishes is answered (``err``: every
        job in it fails)."""
        with self._wake:
            self._busy -= 1
            self._count(-len(batch), -sum(p.length for p in batch))
            for i, p in enumerate(batch):
                p.job.left -= 1
                if results is not None:
                    p.job.results[p.place] = results[i]
            if err is not None:
                self._fail({p.job for p in batch}, err)
            for job in {p.job for p in batch}:
                if job.left == 0 and not job.abandoned and not job.future.done():
                    job.future.set_result(job.results)
            self._untrimmed = True
        release_memory(TRIM_EVERY)  # under constant load, now and then

    def _fail(self, jobs: set[Job], err: BaseException) -> None:
        """(With the lock held.) Every job of ``jobs`` gets ``err``; its texts leave the pool."""
        self._release(jobs)
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(err)
