"""``ctxvec embed`` / ``embed_file``: nothing lost, nothing silent.

Interrupted jobs resume to the identical result (SIGINT, SIGTERM, SIGKILL); a full disk or a
file size limit is a one-line error before the work (or, mid-way, a resumable one), never a
SIGBUS; a second job on the same output is refused; pipes and standard input are read in full;
a resume is keyed by the input's content; blank and empty inputs are reported.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import ctxvec
from ctxvec.files import OutputError
from ctxvec.embed_file import EmbedInterrupted, embed_file


def _corpus(path: Path, n: int) -> None:
    words = ("the heavens and earth were made in six days light water land sea night day "
             "beginning spirit face deep void form god said let there be").split()
    lines = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(1 + (i * 13) % 60)) for i in range(n)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _embed_command(src: Path | str, out: Path, model: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "ctxvec", "embed", str(src), "-o", str(out), "--model", str(model),
            "--threads", "1", "--chunk-size", "100", *extra]


def _one_line_error(proc) -> str:
    assert proc.returncode not in (0, -signal.SIGBUS), proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def _leftovers(folder: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


@pytest.fixture(scope="module")
def resume_case(tmp_path_factory, tiny_model):
    """An 8,000-line file and its uninterrupted embedding."""
    folder = tmp_path_factory.mktemp("resume")
    src = folder / "big.txt"
    _corpus(src, 8_000)
    reference = folder / "reference.npy"
    proc = subprocess.run(_embed_command(src, reference, tiny_model), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return src, np.load(reference)


def _wait_for_progress(progress: Path, proc: subprocess.Popen, done: int) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if json.loads(progress.read_text())["done"] >= done:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.005)
    raise AssertionError(f"the job did not reach {done} texts")


# ---- interrupted jobs resume to the identical result ------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name)
def test_embed_interrupted_then_resumed_equals_uninterrupted(tmp_path, tiny_model, resume_case, sig):
    src, reference = resume_case
    out = tmp_path / "v.npy"
    progress = tmp_path / ".v.npy.progress.json"
    proc = subprocess.Popen(_embed_command(src, out, tiny_model), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for_progress(progress, proc, 1000)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == (-signal.SIGKILL if sig == signal.SIGKILL else 130), stderr
    if sig != signal.SIGKILL:
        assert "interrupted after" in stderr and "--resume" in stderr and "Traceback" not in stderr
    assert not out.exists()  # never a half-written output
    done = json.loads(progress.read_text())["done"]
    assert 1000 <= done < len(reference)

    resumed = subprocess.run(_embed_command(src, out, tiny_model, "--resume"), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed after {done}" in resumed.stdout
    assert np.array_equal(np.load(out), reference)  # bit-identical
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.npy"]  # no leftovers


# ---- several processes: disjoint line ranges, one output ---------------------------------------

@pytest.mark.slow
def test_two_gloo_processes_equal_one_and_each_resumes_its_own_range(tmp_path, tiny_model, resume_case):
    """``--nproc 2`` (torchrun's launcher, gloo): the same bytes as one process; interrupted, each
    process keeps its own progress, and ``--resume`` finishes to the same bytes again."""
    src, reference = resume_case
    out = tmp_path / "v.npy"
    two = subprocess.run(_embed_command(src, out, tiny_model, "--nproc", "2"), capture_output=True, text=True)
    assert two.returncode == 0, two.stderr
    assert f"embedded {len(reference)} texts" in two.stdout and "Traceback" not in two.stderr
    assert np.array_equal(np.load(out), reference)
    assert _leftovers(tmp_path, {"v.npy"}) == []
    out.unlink()

    # Ctrl-C while both processes are part-way through their ranges (lines 0-3999 and 4000-7999)
    proc = subprocess.Popen(_embed_command(src, out, tiny_model, "--nproc", "2"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    _wait_for_progress(tmp_path / ".v.npy.progress.1-of-2.json", proc, 4500)
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "--resume" in stderr
    assert not out.exists()
    done = [json.loads((tmp_path / f".v.npy.progress.{r}-of-2.json").read_text())["done"] for r in (0, 1)]
    assert 0 < done[0] < 4000 and 4500 <= done[1] < 8000, done

    one = subprocess.run(_embed_command(src, out, tiny_model, "--resume"), capture_output=True, text=True)
    assert "processes was 2, now 1" in _one_line_error(one)  # the ranges are the job's: same --nproc
    resumed = subprocess.run(_embed_command(src, out, tiny_model, "--nproc", "2", "--resume"),
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert np.array_equal(np.load(out), reference)
    assert _leftovers(tmp_path, {"v.npy"}) == []


def _rank_0_interrupted_before_its_first_chunk(rank: int, model: Path, src: Path, out: Path, store: Path) -> None:
    """Process ``rank`` of 2 (gloo): process 1 finishes two chunks of its range, then both get a
    Ctrl-C, process 0 before a chunk of its own is done."""
    import torch.distributed as dist

    from ctxvec.engine.distributed import Dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    record_1 = out.with_name(f".{out.name}.progress.1-of-2.json")
    calls = []

    def on_progress(done: int, total: int) -> None:
        calls.append(done)
        if rank == 1 and len(calls) == 3:  # at the start, then after each of two chunks
            raise KeyboardInterrupt
        if rank == 0:  # still on its first chunk when the signal comes
            deadline = time.monotonic() + 60
            while not (record_1.exists() and json.loads(record_1.read_text())["done"] >= 700):
                assert time.monotonic() < deadline, "process 1 did not finish two chunks"
                time.sleep(0.01)
            raise KeyboardInterrupt

    try:
        embed_file(ctxvec.load(model), src, out, chunk_size=100, on_progress=on_progress, processes=Dist(rank, 2))
    except EmbedInterrupted as interrupted:
        message = str(interrupted)
    else:
        raise AssertionError(f"process {rank} was not interrupted")
    assert "--resume" in message and "nothing was kept" not in message, message
    dist.destroy_process_group()


@pytest.mark.slow
def test_process_0_keeps_the_chunks_of_the_others_when_it_has_none(tmp_path, tiny_model):
    """A Ctrl-C that finds process 0 before its first chunk and process 1 two chunks in: the shared
    partial file stays for process 1's chunks, and ``--resume`` finishes to the one-process bytes."""
    import torch.multiprocessing as mp

    src, out = tmp_path / "in.txt", tmp_path / "v.npy"
    _corpus(src, 1000)
    one = subprocess.run(_embed_command(src, tmp_path / "one.npy", tiny_model), capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    mp.spawn(_rank_0_interrupted_before_its_first_chunk, args=(tiny_model, src, out, tmp_path / "store"), nprocs=2)
    assert (tmp_path / ".v.npy.partial").exists()
    assert not (tmp_path / ".v.npy.progress.0-of-2.json").exists()
    assert json.loads((tmp_path / ".v.npy.progress.1-of-2.json").read_text())["done"] == 700

    resumed = subprocess.run(_embed_command(src, out, tiny_model, "--nproc", "2", "--resume"),
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert np.array_equal(np.load(out), np.load(tmp_path / "one.npy"))
    assert _leftovers(tmp_path, {"v.npy", "one.npy", "in.txt", "store"}) == []


def test_a_failure_in_one_process_is_one_line_naming_it(tmp_path, tiny_model):
    src, out = tmp_path / "in.txt", tmp_path / "v.npy"
    _corpus(src, 300)
    lines = src.read_text().splitlines()
    lines[250] = ""  # in the second process's range
    src.write_text("\n".join(lines) + "\n")
    proc = subprocess.run(_embed_command(src, out, tiny_model, "--nproc", "2", "--strict"),
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "line 251: has no tokens" in proc.stderr
    assert "Error: process 1 of 2 stopped (exit code 1); its message is above." in proc.stderr.splitlines()
    assert not out.exists()


def test_several_processes_refuse_a_pipe(tmp_path, tiny_model):
    out = tmp_path / "v.npy"
    proc = subprocess.run(_embed_command("-", out, tiny_model, "--nproc", "2"), input="a\nb\n",
                          capture_output=True, text=True)
    assert "is a pipe; 2 processes need a file each can read" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.returncode != 0
    assert _leftovers(tmp_path, set()) == []


def _stop_after(n_chunks: int):
    def on_progress(done: int, total: int) -> None:
        on_progress.calls += 1
        if on_progress.calls > n_chunks:  # the first call reports the start
            raise KeyboardInterrupt

    on_progress.calls = 0
    return on_progress


def test_resume_refuses_a_different_job_and_runs_fresh_without_one(tmp_path, tiny_model):
    src, out = tmp_path / "in.txt", tmp_path / "v.npy"
    _corpus(src, 50)
    pipeline = ctxvec.load(tiny_model)
    with pytest.raises(EmbedInterrupted, match="interrupted after 10 of 50 texts"):
        embed_file(pipeline, src, out, chunk_size=10, on_progress=_stop_after(1))
    with pytest.raises(ValueError, match="chunk_size was 10, now 20"):
        embed_file(pipeline, src, out, chunk_size=20, resume=True)
    src.write_text(src.read_text() + "one more line\n")
    with pytest.raises(ValueError, match="cannot resume .*v.npy: .*content changed.*n_texts was 50, now 51"):
        embed_file(pipeline, src, out, chunk_size=10, resume=True)
    result = embed_file(pipeline, src, out, chunk_size=10, resume=False)  # starts over
    assert result.resumed_from == 0 and np.load(out).shape == (51, 32)
    out.unlink()
    result = embed_file(pipeline, src, out, chunk_size=10, resume=True)  # nothing to resume: runs
    assert result.resumed_from == 0
    assert np.abs(np.load(out) - pipeline.embed(src.read_text().splitlines())).max() < 1e-5


def _interrupted(folder: Path, model: Path, n_texts: int, n_chunks: int):
    """(input, output, pipeline) of a job of ``n_texts`` stopped after ``n_chunks`` chunks of 10."""
    src, out = folder / "in.txt", folder / "v.npy"
    _corpus(src, n_texts)
    pipeline = ctxvec.load(model)
    with pytest.raises(EmbedInterrupted):
        embed_file(pipeline, src, out, chunk_size=10, on_progress=_stop_after(n_chunks))
    return src, out, pipeline


def test_resume_is_keyed_by_the_content_not_the_size_and_time(tmp_path, tiny_model):
    """An edit that keeps the size and the modification time (``cp -p``) is still refused."""
    src, out, pipeline = _interrupted(tmp_path, tiny_model, 50, 2)
    before = src.stat()
    text = src.read_text()
    src.write_text(text.replace("heavens", "HEAVENS", 1))  # same length
    os.utime(src, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (src.stat().st_size, src.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    with pytest.raises(ValueError, match=r"cannot resume .*v\.npy: the interrupted job differs \(the input's "
                                         r"content changed"):
        embed_file(pipeline, src, out, chunk_size=10, resume=True)


def test_damaged_progress_is_reported_against_the_output(tmp_path, tiny_model):
    src, out, pipeline = _interrupted(tmp_path, tiny_model, 30, 1)
    (tmp_path / ".v.npy.progress.json").write_text("{half")
    with pytest.raises(ValueError) as err:
        embed_file(pipeline, src, out, chunk_size=10, resume=True)
    message = str(err.value)
    assert f"cannot resume {out}" in message and "without --resume" in message
    assert ".progress.json" not in message and ".partial" not in message  # names no hidden file


# ---- a full disk, a file size limit ---------------------------------------------------------------

def _limit_file_size(limit: int):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def test_a_file_size_limit_is_a_one_line_error_before_any_work(tmp_path, tiny_model):
    """Before: the memory-mapped partial file died by SIGBUS (exit 135) half-way."""
    src, out = tmp_path / "in.txt", tmp_path / "v.npy"
    _corpus(src, 3000)  # 3,000 x 32 float32: 384 kB of vectors
    proc = subprocess.run(_embed_command(src, out, tiny_model), capture_output=True, text=True,
                          preexec_fn=_limit_file_size(100_000))
    message = _one_line_error(proc)
    assert proc.returncode == 1
    assert str(out) in message and "384.1 kB" in message and "file size limit" in message
    assert _leftovers(tmp_path, {"in.txt"}) == []  # no partial file, no lock left behind
    # nothing was kept, so the same command with --resume (as a scheduler would rerun it) starts over
    again = subprocess.run(_embed_command(src, out, tiny_model, "--resume"), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert np.load(out).shape == (3000, 32)


def test_a_full_disk_is_reported_with_the_space_needed(tmp_path, tiny_model, monkeypatch):
    src, out = tmp_path / "in.txt", tmp_path / "v.npy"
    _corpus(src, 50)

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(OutputError, match=rf"not enough disk space for {out}: its 50 vectors need 6.5 kB, "
                                          r"[\d.]+ [kMG]?B(ytes)? are free in "):
        embed_file(ctxvec.load(tiny_model), src, out, chunk_size=10)
    assert _leftovers(tmp_path, {"in.txt"}) == []


def test_a_disk_that_fills_mid_way_keeps_the_work_for_resume(tmp_path, tiny_model, monkeypatch):
    """Where the file system cannot reserve space, a full disk shows at a write: a clean error,
    the finished chunks kept, and --resume completes the identical output once there is room."""
    src, out = tmp_path / "in.txt", tmp_path / "v.npy"
    _corpus(src, 50)
    pipeline = ctxvec.load(tiny_model)
    reference = pipeline.embed(src.read_text().splitlines(), batch_tokens=1024)

    def unsupported(fd, offset, length):
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    real_pwrite, writes = os.pwrite, []

    def pwrite(fd, data, offset):
        writes.append(offset)
        if len(writes) == 4:  # the header, then chunks 1 and 2; the third does not fit
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "posix_fallocate", unsupported)
    monkeypatch.setattr(os, "pwrite", pwrite)
    with pytest.raises(OutputError) as err:
        embed_file(pipeline, src, out, chunk_size=10)
    assert f"cannot write {out}: no space left on the device" in str(err.value)
    assert "20 of 50 texts are saved" in str(err.value) and "--resume" in str(err.value)
    assert not out.exists()
    monkeypatch.setattr(os, "pwrite", real_pwrite)
    result = embed_file(pipeline, src, out, chunk_size=10, resume=True)
    assert result.resumed_from == 20
    assert np.abs(np.load(out) - reference).max() < 1e-6
    assert _leftovers(tmp_path, {"in.txt", "v.npy"}) == []


# ---- two jobs, one output -----------------------------------------------------------------------

# ---- pipes ---------------------------------------------------------------------------------------

@pytest.fixture
def piped_case(tmp_path, tiny_model):
    src = tmp_path / "in.txt"
    _corpus(src, 250)
    reference = tmp_path / "reference.npy"
    assert subprocess.run(_embed_command(src, reference, tiny_model), capture_output=True).returncode == 0
    return src, np.load(reference)


@pytest.mark.parametrize("how", ["dash", "dev-stdin", "process-substitution", "fifo"])
def test_pipes_are_read_in_full(tmp_path, tiny_model, piped_case, how):
    """Before: "embedded 0 texts" with exit 0 (the pipe was used up by the line count), and
    ``-`` was "no such file"."""
    src, reference = piped_case
    out = tmp_path / "v.npy"
    if how in ("dash", "dev-stdin"):  # cat FILE | ctxvec embed - ...
        command = _embed_command("-" if how == "dash" else "/dev/stdin", out, tiny_model)
        proc = subprocess.run(["bash", "-c", 'cat "$0" | "$@"', str(src), *command], capture_output=True, text=True)
    elif how == "process-substitution":
        command = " ".join(f"'{a}'" for a in _embed_command("SRC", out, tiny_model)).replace("'SRC'", f"<(cat '{src}')")
        proc = subprocess.run(["bash", "-c", command], capture_output=True, text=True)
    else:
        fifo = tmp_path / "fifo"
        os.mkfifo(fifo)
        writer = threading.Thread(target=lambda: fifo.write_bytes(src.read_bytes()))
        writer.start()
        proc = subprocess.run(_embed_command(fifo, out, tiny_model), capture_output=True, text=True)
        writer.join()
    assert proc.returncode == 0, proc.stderr
    assert f"embedded {len(reference)} texts" in proc.stdout
    assert np.array_equal(np.load(out), reference)


def test_a_piped_job_resumes_when_the_same_content_is_piped_again(tmp_path, tiny_model, piped_case):
    src, reference = piped_case
    out = tmp_path / "v.npy"
    pipeline = ctxvec.load(tiny_model)
    read_fd, write_fd = os.pipe()
    threading.Thread(target=lambda: (os.write(write_fd, src.read_bytes()), os.close(write_fd))).start()
    with pytest.raises(EmbedInterrupted, match="interrupted after 100 of 250"):
        embed_file(pipeline, f"/dev/fd/{read_fd}", out, chunk_size=100, on_progress=_stop_after(1))
    os.close(read_fd)
    changed = tmp_path / "changed.txt"
    changed.write_text(src.read_text().replace("light", "dark"))
    with open(changed, "rb") as stdin:
        proc = subprocess.run(_embed_command("-", out, tiny_model, "--resume"), stdin=stdin,
                              capture_output=True, text=True)
    assert "the input's content changed" in _one_line_error(proc)
    with open(src, "rb") as stdin:
        proc = subprocess.run(_embed_command("-", out, tiny_model, "--resume"), stdin=stdin,
                              capture_output=True, text=True)
    assert proc.returncode == 0 and "resumed after 100" in proc.stdout, proc.stderr
    assert np.array_equal(np.load(out), reference)


# ---- what the input holds ------------------------------------------------------------------------

def test_empty_input_says_0_texts(tmp_path, tiny_model):
    src, out = tmp_path / "in.txt", tmp_path / "v.npy"
    src.write_bytes(b"")
    proc = subprocess.run(_embed_command(src, out, tiny_model), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "holds 0 texts" in proc.stderr and np.load(out).shape == (0, 32)


def test_blank_lines_are_reported_and_strict_refuses_them(tmp_path, tiny_model):
    src, out = tmp_path / "in.txt", tmp_path / "v.npy"
    src.write_bytes(b"light\n\n   \t\nday\n\x00\x00\nnight\n")
    proc = subprocess.run(_embed_command(src, out, tiny_model), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "3 text(s) had no tokens" in proc.stderr and "line(s) 2, 3, 5" in proc.stderr
    proc = subprocess.run(_embed_command(src, tmp_path / "s.npy", tiny_model, "--strict"), capture_output=True,
                          text=True)
    assert f"{src}, line 2: has no tokens" in _one_line_error(proc)
    assert not (tmp_path / "s.npy").exists()


@pytest.mark.parametrize("line, words", [
    ('{"text": "lone \\ud800 surrogate"}', 'line 3: "text" holds a lone surrogate (an unpaired \\ud800 escape)'),
    ("[" * 100_000 + "]" * 100_000, "line 3: not JSON that can be read (nested too deeply)"),
], ids=["lone surrogate", "deep nesting"])
def test_bad_json_lines_name_the_file_and_line(tmp_path, tiny_model, line, words):
    """Before: "text 12 is not valid Unicode" (an index in its chunk), and a RecursionError."""
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "a"}\n{"text": "b"}\n' + line + "\n")
    proc = subprocess.run(_embed_command(src, tmp_path / "v.npy", tiny_model), capture_output=True, text=True)
    assert f"{src}, {words}" in _one_line_error(proc)


# ---- two jobs, one output -----------------------------------------------------------------------

def test_a_second_job_on_the_same_output_is_refused_at_once(tmp_path, tiny_model, piped_case):
    """Before: both ran; the first reported success for a file holding the second's vectors.
    The first job here reads a FIFO that stays open: it holds the lock while the second starts."""
    src, reference = piped_case
    other, out, fifo = tmp_path / "other.txt", tmp_path / "v.npy", tmp_path / "fifo"
    _corpus(other, 30)
    os.mkfifo(fifo)
    first = subprocess.Popen(_embed_command(fifo, out, tiny_model), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    with open(fifo, "wb") as writer:  # returns once the first job, holding the lock, reads the FIFO
        second = subprocess.run(_embed_command(other, out, tiny_model), capture_output=True, text=True)
        writer.write(src.read_bytes())
    assert second.returncode == 1
    assert second.stderr.strip() == (f"Error: another job (process {first.pid}) is writing {out}; wait for it "
                                     "to finish, or choose another output.")
    stdout, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stderr
    assert f"embedded {len(reference)} texts" in stdout
    assert np.array_equal(np.load(out), reference)  # the first job's vectors, as it reported
    assert _leftovers(tmp_path, {"other.txt", "v.npy", "fifo", "in.txt", "reference.npy"}) == []
    third = subprocess.run(_embed_command(other, out, tiny_model), capture_output=True, text=True)
    assert third.returncode == 0, third.stderr


def test_errors_before_the_job_starts_are_one_line_on_stderr(tmp_path, tiny_model):
    """Before this was checked, the progress bar was drawn before the input was opened."""
    proc = subprocess.run(_embed_command(tmp_path / "missing.txt", tmp_path / "v.npy", tiny_model),
                          capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr == f"Error: {tmp_path / 'missing.txt'}: no such file.\n"


def test_a_lock_that_cannot_be_made_names_the_output(tmp_path, tiny_model, monkeypatch):
    import ctxvec.files as files

    src, out = tmp_path / "in.txt", tmp_path / "ro" / "v.npy"
    _corpus(src, 10)

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(files.os, "open", read_only)
    with pytest.raises(OutputError, match=rf"^cannot lock {out}: read-only file system\.$"):
        embed_file(ctxvec.load(tiny_model), src, out)


# ---- nothing to resume, nothing kept ------------------------------------------------------------

def test_an_interruption_before_the_first_chunk_keeps_nothing(tmp_path, tiny_model):
    """Before: a full-size .partial stayed, and the message suggested --resume."""
    src, out = tmp_path / "in.txt", tmp_path / "v.npy"
    _corpus(src, 50)
    with pytest.raises(EmbedInterrupted, match="before the first chunk of 50 texts was done; nothing was kept: "
                                               "run the command again"):
        embed_file(ctxvec.load(tiny_model), src, out, chunk_size=10, on_progress=_stop_after(0))
    assert _leftovers(tmp_path, {"in.txt"}) == []


def test_a_full_disk_in_the_first_chunk_keeps_nothing(tmp_path, tiny_model, monkeypatch):
    src, out = tmp_path / "in.txt", tmp_path / "v.npy"
    _corpus(src, 50)
    real_pwrite, writes = os.pwrite, []

    def pwrite(fd, data, offset):
        writes.append(offset)
        if len(writes) == 2:  # the header, then the first chunk
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "posix_fallocate", lambda *a: (_ for _ in ()).throw(OSError(errno.EOPNOTSUPP, "")))
    monkeypatch.setattr(os, "pwrite", pwrite)
    with pytest.raises(OutputError, match="no space left on the device .* nothing was kept: make room on the "
                                          "disk and run the command again"):
        embed_file(ctxvec.load(tiny_model), src, out, chunk_size=10)
    assert _leftovers(tmp_path, {"in.txt"}) == []


def test_a_pipe_too_big_to_copy_is_one_line(tmp_path, tiny_model):
    src = tmp_path / "in.txt"
    _corpus(src, 3000)
    command = _embed_command("-", tmp_path / "v.npy", tiny_model)
    with open(src, "rb") as stdin:
        proc = subprocess.run(command, stdin=stdin, capture_output=True, text=True,
                              preexec_fn=_limit_file_size(50_000))
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"Error: cannot keep a copy of standard input in {tmp_path} (file too large")
    assert _leftovers(tmp_path, {"in.txt"}) == []


def test_json_lines_from_a_pipe_need_a_format(tmp_path, tiny_model, piped_case):
    """Before: a pipe has no suffix, so its JSON lines were embedded as raw text without a word."""
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "light"}\n{"text": "day"}\n')
    with open(src, "rb") as stdin:
        proc = subprocess.run(_embed_command("-", tmp_path / "v.npy", tiny_model), stdin=stdin,
                              capture_output=True, text=True)
    assert "standard input looks like JSON lines" in _one_line_error(proc) and "--format jsonl" in proc.stderr
    with open(src, "rb") as stdin:
        proc = subprocess.run(_embed_command("-", tmp_path / "v.npy", tiny_model, "--format", "jsonl"),
                              stdin=stdin, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert np.array_equal(np.load(tmp_path / "v.npy"), ctxvec.load(tiny_model).embed(["light", "day"]))
