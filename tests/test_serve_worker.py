"""The server's inference worker on its own: continuous batching around the oldest text, every job
answered in its own order with ``Pipeline``'s numbers, the bound in tokens, cancellation."""

from __future__ import annotations

import random
import threading
import time

import numpy as np
import pytest
import torch

import ctxvec
import ctxvec.serve.worker as worker_module
from ctxvec.engine.batching import padded_width as width_in
from ctxvec.serve.worker import (InferenceWorker, QueueFull, TooBig, WorkerEvents, batch_around_oldest,
                                 share_tokens)


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("budget", [16, 64, 300, 5000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_batch_holds_the_oldest_text_and_its_neighbours_in_length_under_the_budget(seed, budget, dtype):
    """Widths as the pipeline pads them (in bf16 on some CPUs aligned wider for attention)."""
    def padded_width(n: int) -> int:
        return width_in(n, dtype)

    rng = random.Random(seed)
    lengths = [rng.randint(1, 100) for _ in range(rng.randint(1, 60))]
    oldest = rng.randrange(len(lengths))
    batch = batch_around_oldest([padded_width(n) for n in lengths], oldest, budget)
    assert oldest in batch and len(set(batch)) == len(batch)
    width = max(padded_width(lengths[i]) for i in batch)
    assert len(batch) == 1 or len(batch) * width <= budget
    # neighbours: no text left out lies strictly between the batch's shortest and longest
    low, high = min(padded_width(lengths[i]) for i in batch), width
    left_out = [i for i in range(len(lengths)) if i not in batch]
    assert not [i for i in left_out if low < padded_width(lengths[i]) < high]
    # and it is full: no text left out would still fit
    assert all((len(batch) + 1) * max(width, padded_width(lengths[i])) > budget for i in left_out)


@pytest.fixture(scope="module")
def tiny(tiny_model):
    return ctxvec.load(tiny_model)


class Recorder(WorkerEvents):
    def __init__(self) -> None:
        super().__init__()
        self.batches, self.dropped, self.open = [], [], []
        self.on_batch = self.batches.append
        self.on_dropped = lambda reason, n: self.dropped.append((reason, n))
        self.on_queue = lambda texts, tokens: self.open.append((texts, tokens))


@pytest.fixture
def two_threads(intra_op_threads):
    intra_op_threads(2)


@pytest.mark.parametrize("streams", [1, 2, None])
def test_jobs_of_both_kinds_get_their_own_results_in_order(tiny, two_threads, streams):
    rng = random.Random(0)
    words = "light darkness waters deep heaven earth evening morning".split()
    jobs_texts = [[" ".join(rng.choices(words, k=rng.randint(1, 40))) for _ in range(rng.randint(1, 9))]
                  for _ in range(30)]
    events = Recorder()
    worker = InferenceWorker(tiny, batch_tokens=256, max_queue_tokens=10**6, events=events, streams=streams)
    jobs = [worker.submit("embed" if i % 3 else "encode", texts, tiny.tokenizer.tokenize(texts))
            for i, texts in enumerate(jobs_texts)]  # all queued before the worker starts: one pool
    worker.start()
    try:
        for i, (job, texts) in enumerate(zip(jobs, jobs_texts)):
            got = job.future.result(timeout=60)
            if i % 3:
                assert np.abs(np.stack(got) - tiny.embed(texts)).max() < 1e-6
            else:
                want = tiny.encode(texts)
                assert [g.tokens for g in got] == [w.tokens for w in want]
                assert max(np.abs(g.vectors - w.vectors).max() for g, w in zip(got, want)) < 1e-6
    finally:
        worker.stop()
    assert all(shape.rows * shape.width <= 256 or shape.texts == 1 for shape in events.batches)
    assert events.open[-1] == (0, 0)  # nothing left open


def test_a_long_text_is_not_starved_by_a_stream_of_short_ones(tiny):
    worker = InferenceWorker(tiny, batch_tokens=64, max_queue_tokens=10**6).start()
    try:
        shorts = [worker.submit("embed", ["a b"] * 8, tiny.tokenizer.tokenize(["a b"] * 8)) for _ in range(20)]
        long_text = ["word " * 60]
        long = worker.submit("embed", long_text, tiny.tokenizer.tokenize(long_text))
        more = [worker.submit("embed", ["c d"] * 8, tiny.tokenizer.tokenize(["c d"] * 8)) for _ in range(200)]
        long.future.result(timeout=60)
        assert sum(job.future.done() for job in more) < len(more)  # answered before the later stream
        for job in shorts + more:
            job.future.result(timeout=60)
    finally:
        worker.stop()


def test_the_bound_counts_every_token_not_computed_yet(tiny):
    events = Recorder()
    worker = InferenceWorker(tiny, batch_tokens=64, max_queue_tokens=140, events=events)
    texts = ["word " * 20] * 3  # 22 tokens each: 66 a job
    first = worker.submit("embed", texts, tiny.tokenizer.tokenize(texts))
    second = worker.submit("embed", texts, tiny.tokenizer.tokenize(texts))
    with pytest.raises(QueueFull, match="132 tokens queued") as refused:
        worker.submit("embed", texts, tiny.tokenizer.tokenize(texts))
    assert refused.value.retry_after >= 1
    long = ["word " * 40] * 4  # 168 tokens: more than the queue could ever hold
    with pytest.raises(TooBig, match="168 tokens, more than the server's queue holds"):
        worker.submit("embed", long, tiny.tokenizer.tokenize(long))
    assert not worker.alive
    worker.start()
    assert worker.alive
    try:
        first.future.result(timeout=60), second.future.result(timeout=60)
    finally:
        worker.stop()
    assert not worker.alive


def test_a_cancelled_job_is_never_computed_and_a_started_one_is_let_go(tiny):
    events = Recorder()
    worker = InferenceWorker(tiny, batch_tokens=32, max_queue_tokens=10**6, events=events)
    texts = ["light and darkness " * 3] * 400
    started = worker.submit("embed", texts, tiny.tokenizer.tokenize(texts))
    queued = worker.submit("embed", ["never"] * 7, tiny.tokenizer.tokenize(["never"] * 7))
    worker.cancel(queued, "disconnected")
    assert queued.future.cancelled()
    first_batch = threading.Event()
    events.on_batch = lambda shape: first_batch.set()
    worker.start()
    try:
        assert first_batch.wait(60)
        worker.cancel(started, "timeout")
        done = worker.submit("embed", ["after"], tiny.tokenizer.tokenize(["after"]))
        done.future.result(timeout=60)
    finally:
        worker.stop()
    assert events.dropped[0] == ("disconnected", 7)
    reason, n = events.dropped[1]
    assert reason == "timeout" and 0 < n < 400
    assert not started.future.done()  # nobody waits for it any more
    assert events.open[-1] == (0, 0)


def test_under_load_streams_compute_batches_side_by_side_on_their_share_of_the_threads(tiny, two_threads,
                                                                                       monkeypatch):
    """Beside another stream's batch, a batch gets its share (one of two threads); a lone request
    right after still does (load comes in waves); once SIDE_BY_SIDE_MEMORY has passed, a lone
    one gets every thread, in the lead stream."""
    events, seen = Recorder(), []
    events.on_batch = lambda shape: seen.append((threading.current_thread().name, torch.get_num_threads()))
    worker = InferenceWorker(tiny, batch_tokens=64, max_queue_tokens=10**6, events=events)
    assert worker.streams == 2
    texts = ["light and darkness " * 3] * 300
    job = worker.submit("embed", texts, tiny.tokenizer.tokenize(texts))
    worker.start()
    try:
        got = np.stack(job.future.result(timeout=60))
        worker.submit("embed", ["right after"], tiny.tokenizer.tokenize(["right after"])).future.result(timeout=60)
        right_after = seen[-1]
        monkeypatch.setattr(worker_module, "SIDE_BY_SIDE_MEMORY", 0.0)
        worker.submit("embed", ["alone"], tiny.tokenizer.tokenize(["alone"])).future.result(timeout=60)
    finally:
        worker.stop()
    assert np.abs(got - tiny.embed(texts)).max() < 1e-6
    assert {name for name, _ in seen} == {"ctxvec-inference-0", "ctxvec-inference-1"}
    assert 1 in {threads for _, threads in seen}  # side by side
    assert right_after[1] == 1
    assert seen[-1] == ("ctxvec-inference-0", 2)  # alone: all the threads, in the lead stream
    assert {name for name, threads in seen if threads > 1} == {"ctxvec-inference-0"}  # only the lead has a team
    assert events.open[-1] == (0, 0) and not worker.alive


def test_lone_requests_go_to_the_lead_stream_on_every_thread(tiny, two_threads):
    """One request at a time: each is computed by the lead stream on all the threads (only one
    thread of the process keeps a team of OpenMP threads: see the worker's docstring)."""
    events, seen = Recorder(), []
    events.on_batch = lambda shape: seen.append((threading.current_thread().name, torch.get_num_threads()))
    worker = InferenceWorker(tiny, batch_tokens=64, max_queue_tokens=10**6, events=events).start()
    try:
        for i in range(8):
            texts = [f"request {i}"]
            got = worker.submit("embed", texts, tiny.tokenizer.tokenize(texts)).future.result(timeout=60)
            assert np.abs(np.stack(got) - tiny.embed(texts)).max() < 1e-6
    finally:
        worker.stop()
    assert seen == [("ctxvec-inference-0", 2)] * 8


def test_an_idle_worker_gives_memory_back_after_a_while_not_after_every_request(tiny, monkeypatch):
    trims = []
    def release_memory(min_interval: float = 0.0) -> None:  # the idle trims (under load: at most every TRIM_EVERY)
        if min_interval == 0.0:
            trims.append(time.monotonic())

    monkeypatch.setattr(worker_module, "release_memory", release_memory)
    monkeypatch.setattr(worker_module, "IDLE_TRIM_AFTER", 0.5)
    worker = InferenceWorker(tiny, batch_tokens=64, max_queue_tokens=10**6).start()
    try:
        deadline = time.monotonic() + 10
        while not trims and time.monotonic() < deadline:  # the first idle spell, from the start
            time.sleep(0.01)
        assert len(trims) == 1
        worker.submit("embed", ["one"], tiny.tokenizer.tokenize(["one"])).future.result(timeout=60)
        answered = time.monotonic()
        while len(trims) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        worker.stop()
    assert len(trims) == 2 and trims[1] - answered >= 0.4  # after half a second idle, not at once


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2"])
def test_streams_must_be_a_positive_integer(tiny, bad):
    with pytest.raises(ValueError, match="streams must be a positive integer"):
        InferenceWorker(tiny, batch_tokens=64, max_queue_tokens=100, streams=bad)


@pytest.mark.parametrize("widths, budget, streams, expected", [
    ([40] * 32, 2048, 1, 2048),     # one stream: the budget
    ([40] * 200, 2048, 2, 2048),    # a full batch for each stream: the budget
    ([40] * 10, 2048, 2, 2048),     # 400 tokens: under 2 x 256, one batch
    ([40] * 32, 2048, 2, 800),      # 1,280 tokens: each stream's share, a quarter over half
    ([40] * 32, 600, 2, 600),       # never over the budget
], ids=["one stream", "loaded", "small", "lone request", "capped"])
def test_a_lone_request_is_shared_among_the_streams(widths, budget, streams, expected):
    assert share_tokens(widths, budget, streams) == expected


def test_a_lone_request_of_many_texts_runs_in_every_stream(tiny, two_threads):
    """32 texts alone with a budget that holds them all: two batches, computed side by side, with
    the pipeline's numbers; 4 short texts alone: one batch."""
    texts = [" ".join(["light", "darkness", "waters"] * (5 + i % 7)) for i in range(32)]
    events = Recorder()
    worker = InferenceWorker(tiny, batch_tokens=4096, max_queue_tokens=10**6, events=events, streams=2).start()
    try:
        got = worker.submit("embed", texts, tiny.tokenizer.tokenize(texts)).future.result(timeout=60)
        assert len(events.batches) == 2 and sum(b.texts for b in events.batches) == 32
        assert np.abs(np.stack(got) - tiny.embed(texts)).max() < 1e-6
        events.batches.clear()
        worker.submit("embed", texts[:4], tiny.tokenizer.tokenize(texts[:4])).future.result(timeout=60)
        assert len(events.batches) == 1
    finally:
        worker.stop()


def test_beside_a_busy_stream_a_free_one_takes_a_full_batch_not_a_share(tiny, two_threads, monkeypatch):
    """32 texts that arrive while the other stream computes go in one batch: a share left for the
    busy stream would only wait (and, under load, make every batch smaller)."""
    entered, release = threading.Event(), threading.Event()
    compute = InferenceWorker._compute

    def held(self, batch, threads):  # the first batch (the text "hold") keeps its stream busy
        if batch[0].job.texts[batch[0].place] == "hold":
            entered.set()
            release.wait(60)
        return compute(self, batch, threads)

    monkeypatch.setattr(InferenceWorker, "_compute", held)
    texts = [" ".join(["light", "darkness", "waters"] * (5 + i % 7)) for i in range(32)]
    events = Recorder()
    worker = InferenceWorker(tiny, batch_tokens=4096, max_queue_tokens=10**6, events=events, streams=2).start()
    try:
        holding = worker.submit("embed", ["hold"], tiny.tokenizer.tokenize(["hold"]))
        assert entered.wait(60)
        got = worker.submit("embed", texts, tiny.tokenizer.tokenize(texts)).future.result(timeout=60)
        assert [b.texts for b in events.batches] == [32]  # alone, the same 32 texts make two batches
        release.set()
        holding.future.result(timeout=60)
    finally:
        release.set()
        worker.stop()
    assert np.abs(np.stack(got) - tiny.embed(texts)).max() < 1e-6
