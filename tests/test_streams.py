import threading

import pytest
import torch

from conftest import threads_of_a_new_thread
from ctxvec.engine.streams import StreamPlan, plan_streams, run_in_streams


@pytest.fixture
def three_threads(intra_op_threads):
    """The caller on 3 intra-op threads: a count no plan below gives its streams."""
    return intra_op_threads(3)


@pytest.mark.parametrize("batches, threads, streams, plan", [
    (100, 2, None, StreamPlan(2, 1)),   # one stream per thread
    (3, 2, None, StreamPlan(1, 2)),     # too few batches for two streams: one, on both threads
    (4, 2, None, StreamPlan(2, 1)),
    (1, 8, None, StreamPlan(1, 8)),
    (0, 4, None, StreamPlan(1, 4)),
    (100, 8, 2, StreamPlan(2, 4)),      # asked for: the threads shared out
    (100, 2, 5, StreamPlan(2, 1)),      # never more streams than threads
    (1, 4, 3, StreamPlan(1, 4)),        # nor than batches
    (100, 1, None, StreamPlan(1, 1)),
    (None, 4, None, StreamPlan(4, 1)),  # a server's endless run of batches
    (None, 4, 2, StreamPlan(2, 2)),
    (None, 2, 8, StreamPlan(2, 1)),
])
def test_plan_streams(batches, threads, streams, plan):
    assert plan_streams(batches, threads, streams) == plan


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_streams_must_be_a_positive_integer(bad):
    with pytest.raises(ValueError, match="streams must be a positive integer or None"):
        plan_streams(10, 2, bad)


@pytest.mark.parametrize("plan", [StreamPlan(1, 2), StreamPlan(2, 1), StreamPlan(3, 1)], ids=str)
def test_results_come_in_order_with_bounded_work_in_flight(plan, three_threads):
    pulled, yielded, ahead = [0], [0], []

    def items():
        for i in range(40):
            pulled[0] += 1
            ahead.append(pulled[0] - yielded[0])
            yield i

    def work(i):
        assert torch.is_inference_mode_enabled()
        return i * i, torch.get_num_threads(), threading.current_thread().name

    results = []
    for result in run_in_streams(work, items(), plan):
        assert not torch.is_inference_mode_enabled()  # the caller's code between results: its own mode
        yielded[0] += 1
        results.append(result)
    assert [r[0] for r in results] == [i * i for i in range(40)]
    assert max(ahead) <= 2 * plan.streams + 1  # in flight, and the one being handed back
    if plan.streams > 1:
        assert {r[1] for r in results} == {plan.threads_each}
        assert all(r[2].startswith("ctxvec-stream") for r in results)
    else:
        assert {r[2] for r in results} == {threading.current_thread().name}
    assert torch.get_num_threads() == three_threads
    assert threads_of_a_new_thread() == three_threads  # the default put back
    assert not torch.is_inference_mode_enabled()


def test_an_error_in_a_stream_reaches_the_caller_and_stops_the_rest(three_threads):
    started = []

    def work(i):
        started.append(i)
        if i == 3:
            raise RuntimeError("batch 3 failed")
        return i

    got = []
    with pytest.raises(RuntimeError, match="batch 3 failed"):
        for r in run_in_streams(work, range(1000), StreamPlan(2, 1)):
            got.append(r)
    assert got == [0, 1, 2]
    assert len(started) < 20
    assert threads_of_a_new_thread() == three_threads


def test_a_caller_that_stops_early_leaves_no_thread_behind(three_threads):
    before = set(threading.enumerate())
    results = run_in_streams(lambda i: i, range(1000), StreamPlan(2, 1))
    assert next(results) == 0
    assert set(threading.enumerate()) - before  # the streams' threads run
    results.close()
    assert not set(threading.enumerate()) - before
    assert threads_of_a_new_thread() == three_threads


@pytest.mark.parametrize("plan, items, caller, runs_in", [
    (StreamPlan(1, 1), 2, "main", "a stream"),  # one thread, two batches or more, from the main thread: off it
    (StreamPlan(1, 1), 40, "main", "a stream"),
    (StreamPlan(1, 1), 1, "main", "the caller"),  # one batch stays: a thread costs more than it saves
    (StreamPlan(1, 1), 0, "main", "the caller"),
    (StreamPlan(1, 2), 5, "main", "the caller"),  # several threads stay: the caller's OpenMP team
    (StreamPlan(1, 1), 5, "another thread", "the caller"),  # only the main thread is moved off
])
def test_where_a_single_stream_runs(plan, items, caller, runs_in, three_threads):
    seen = []

    def call() -> None:
        work = lambda i: (i, threading.current_thread(), torch.get_num_threads())  # noqa: E731
        seen.append((threading.current_thread(), list(run_in_streams(work, range(items), plan))))

    if caller == "main":
        assert threading.current_thread() is threading.main_thread()
        call()
    else:
        thread = threading.Thread(target=call)
        thread.start()
        thread.join()
    (calling, results), = seen
    assert [r[0] for r in results] == list(range(items))
    threads = {r[1] for r in results}
    if runs_in == "the caller":
        assert threads <= {calling}
    else:
        assert len(threads) == 1 and threads != {calling}
        assert next(iter(threads)).name.startswith("ctxvec-stream")
        assert {r[2] for r in results} == {1}
    assert torch.get_num_threads() == three_threads
    assert threads_of_a_new_thread() == three_threads
