"""Embedding a whole file: streamed, written incrementally, resumable after any interruption.

The job reads the input in fixed chunks of lines, embeds each chunk and writes its vectors into
a ``.npy`` file beside the output (``.NAME.partial``), whose full size is reserved on the disk
before the first chunk (``posix_fallocate``): a disk too small is an error before any work, not
a crash half-way. After every chunk the vectors are written and fsynced *first*, then a small
progress file (``.NAME.progress.json``) is replaced atomically to say how many texts are done.
Whatever kills the process (Ctrl-C, SIGTERM, even SIGKILL or a power cut), the progress file
never claims more than the disk holds, so ``resume=True`` continues from the last finished
chunk. The chunks are the same on every run, so a resumed job's output is bit-identical to an
uninterrupted one. When the last chunk is done the partial file is renamed onto the output: the
output is complete or absent.

A job is keyed by the blake2b hash of the input's content (and the model and options), so a
resume on an input that changed in any way is refused. An exclusive lock beside the output
(``.NAME.lock``) refuses a second job on the same output while one runs.

Past one process (``torchrun``, ``ctxvec embed --nproc N``): the chunks are split into
contiguous ranges, one per process, every process writing its rows into the one partial file
(the output's folder must be one that every machine sees) with a progress record of its own,
each resumable on its own; process 0 holds the lock, prepares the file and renames it when all
are done. The chunks are the same as in one process, so the output is identical.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import io
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, fields
from itertools import islice
from pathlib import Path

import numpy as np

from ctxvec.engine.distributed import Dist, PeerStopped
from ctxvec.files import OutputError, atomic_write_text, exclusive_lock, format_bytes, fsync_dir, write_error
from ctxvec.validation import is_int
from ctxvec.pipeline import Pipeline
from ctxvec.texts import FileFormat, InputFileError, TextSource, chunks, open_texts, resolve_format
from ctxvec.tokenizer import StrictError

DEFAULT_CHUNK = 2048  # texts read, sorted by length and embedded together


@dataclass
class JobKey:
    """What must be the same for a partial output to be continued (else the result would differ)."""

    input_blake2b: str
    n_texts: int
    model: str
    precision: str
    dim: int
    format: str
    strict: bool
    batch_tokens: int
    chunk_size: int
    processes: int = 1


@dataclass
class EmbedFileResult:
    """What ``embed_file`` did.

    Attributes:
        n_texts: texts in the input (rows of the output).
        resumed_from: texts already done by an earlier, interrupted run (0 for a fresh run).
        truncated_lines: 1-based line numbers of texts cut to the model's length limit.
        blank_lines: 1-based line numbers of texts without a single token (empty, whitespace
            or control characters only): each got the vector of an empty text.
    """

    n_texts: int
    resumed_from: int = 0
    truncated_lines: list[int] = field(default_factory=list)
    blank_lines: list[int] = field(default_factory=list)


class EmbedInterrupted(Exception):
    """The job stopped early (a signal); the partial output is kept for ``resume``."""

    def __init__(self, done: int, total: int, kept: bool = False) -> None:
        if done:
            message = f"interrupted after {done} of {total} texts; run the same command with --resume to continue."
        elif kept:  # this process had nothing done, other processes of the job had
            message = (f"interrupted before this process's first chunk of {total} texts was done; the other "
                       "processes' finished chunks are kept: run the same command with --resume to continue.")
        else:
            message = (f"interrupted before the first chunk of {total} texts was done; nothing was kept: "
                       "run the command again.")
        super().__init__(message)
        self.done, self.total = done, total


def partial_paths(output: Path, rank: int = 0, world: int = 1) -> tuple[Path, Path]:
    """(partial vectors, the progress file of process ``rank`` of ``world``) beside ``output``."""
    progress = "progress.json" if world == 1 else f"progress.{rank}-of-{world}.json"
    return output.with_name(f".{output.name}.partial"), output.with_name(f".{output.name}.{progress}")


def progress_records(output: Path) -> list[Path]:
    """The progress records beside ``output``, of one process or of several."""
    return sorted(output.parent.glob(f".{glob.escape(output.name)}.progress*.json"))


def embed_file(pipeline: Pipeline, path: str | Path, output: str | Path, *, fmt: FileFormat = "auto",
               batch_tokens: int | None = None, strict: bool = False, resume: bool = False,
               chunk_size: int = DEFAULT_CHUNK, on_progress: Callable[[int, int], None] | None = None,
               processes: Dist | None = None) -> EmbedFileResult:
    """Write the sentence vectors of every line of ``path`` to ``output`` (.npy, float32, in order).

    Args:
        pipeline: the model.
        path: a text file (one text per line) or JSON lines with a "text" field; ``-`` for
            standard input; pipes and FIFOs are read in full.
        output: the .npy file to write; it appears only when complete.
        fmt: "auto" (by suffix), "text" or "jsonl".
        batch_tokens, strict: as in ``Pipeline.embed`` (strict also refuses texts without tokens).
        resume: continue an interrupted job on the same input content, model and settings.
        chunk_size: texts per chunk (the unit of progress and of resumption).
        on_progress: called with (texts done, texts in all) when the job starts and after each chunk
            (this process's share of them, with several processes).
        processes: this process's place among ``torchrun``'s (default: one process).

    Raises:
        InputFileError, StrictError (strict), ValueError (a partial job that does not match, or
        another job writing ``output``), OutputError (the disk is full, a file size limit;
        the message says what to free, and the partial output is kept for ``resume`` when there
        is work to keep), EmbedInterrupted (KeyboardInterrupt; the partial output is kept).
    """
    output = Path(output)
    batch_tokens = pipeline.batch_tokens if batch_tokens is None else batch_tokens
    if output.suffix != ".npy":
        raise ValueError(f"the output must be a .npy file, got {output}.")
    if not is_int(chunk_size) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}.")
    d = processes or Dist()
    output.parent.mkdir(parents=True, exist_ok=True)
    lock = exclusive_lock(output, "output") if d.main else contextlib.nullcontext()
    with lock, open_texts(path, spool_dir=output.parent) as source:
        if d.world > 1 and source.piped:
            raise InputFileError(f"{source.name} is a pipe; {d.world} processes need a file each can read.")
        if fmt == "auto" and source.piped and source.looks_like_json_lines():  # no suffix to go by
            raise InputFileError(f'{source.name} looks like JSON lines (its first line is an object with a '
                                 '"text" field): say --format jsonl, or --format text to embed the lines as '
                                 "they are.")
        key = JobKey(source.digest, source.n_texts, pipeline.name, pipeline.precision, pipeline.dim,
                     resolve_format(source.name, fmt), strict, batch_tokens, chunk_size, d.world)
        job = PartialOutput(output, key, d.rank)
        # one decision for every process: resume only what process 0 can see was interrupted
        resume = d.agree(resume and job.partial.exists())
        with job.open(resume, d) as result:
            if on_progress is not None:
                on_progress(result.resumed_from - job.first, job.last - job.first)
            _embed_chunks(pipeline, source, job, result, fmt, on_progress)
    return result


def _embed_chunks(pipeline: Pipeline, source: TextSource, job: PartialOutput, result: EmbedFileResult,
                  fmt: FileFormat, on_progress: Callable[[int, int], None] | None) -> None:
    key = job.key
    n_special = pipeline.tokenizer.n_special
    digest = hashlib.blake2b(digest_size=20)  # the content read now, against the content counted
    done = result.resumed_from
    lines = source.texts(fmt, digest)
    texts = islice(lines, done, job.last)  # done is always a whole number of chunks
    for chunk in chunks(texts, key.chunk_size):
        try:
            details = pipeline.embed_with_details(chunk, batch_tokens=key.batch_tokens, strict=key.strict)
        except StrictError as err:
            raise err.at(done + err.index) from None  # its index in the file
        result.truncated_lines.extend(done + 1 + int(i) for i in np.flatnonzero(details.truncated))
        result.blank_lines.extend(done + 1 + int(i) for i in np.flatnonzero(details.n_tokens == n_special))
        job.write(done, details.vectors, result)
        done += len(chunk)
        if on_progress is not None:
            on_progress(done - job.first, job.last - job.first)
    for _ in lines:  # the rest of the file, to hash all of it
        pass
    if done != job.last or digest.hexdigest() != key.input_blake2b:
        raise InputFileError(f"{source.name} changed while it was read; run again on a file that stays put.")


class PartialOutput:
    """The ``.partial`` vectors and the progress record of one job, beside ``output``."""

    def __init__(self, output: Path, key: JobKey, rank: int = 0) -> None:
        self.output, self.key, self.rank = output, key, rank
        self.partial, self.progress = partial_paths(output, rank, key.processes)
        self.fd = -1
        self.offset = 0  # where the rows start, after the .npy header
        # this process's lines: a contiguous range of whole chunks
        n_chunks = -(-key.n_texts // key.chunk_size)
        share = [n_chunks * r // key.processes for r in (rank, rank + 1)]
        self.first, self.last = (min(c * key.chunk_size, key.n_texts) for c in share)

    @property
    def size(self) -> int:
        return self.offset + self.key.n_texts * self.key.dim * 4

    def open(self, resume: bool, d: Dist) -> _Job:
        return _Job(self, resume, d)

    # -- a new job: the header, and the whole file reserved on the disk ----------------------
    def start(self) -> EmbedFileResult:
        """Process 0: write the header and reserve the whole file (the others ``attach``)."""
        for record in progress_records(self.output):  # of an earlier job, whatever its processes
            record.unlink(missing_ok=True)
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, {
            "descr": "<f4", "fortran_order": False, "shape": (self.key.n_texts, self.key.dim)})
        self.offset = len(header.getvalue())
        self.fd = os.open(self.partial, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            _write_all(self.fd, header.getvalue(), 0)
            self._reserve()
        except OSError as err:
            self.discard()
            raise self._too_big(err) from None
        return EmbedFileResult(self.key.n_texts, resumed_from=self.first)

    def attach(self, resume: bool) -> EmbedFileResult:
        """The partial file process 0 prepared (or an interrupted run left), and this process's
        own progress when it resumes."""
        if resume and self.progress.exists():
            return self.resume()
        if resume:  # nothing of this process's own: a record of another number of processes?
            for other in sorted(set(progress_records(self.output)) - set(self._records())):
                self.progress = other
                self.resume()  # refuses, naming what differs
        self.progress.unlink(missing_ok=True)
        self._read_header()
        self.fd = os.open(self.partial, os.O_RDWR)
        return EmbedFileResult(self.key.n_texts, resumed_from=self.first)

    def _reserve(self) -> None:
        try:
            os.posix_fallocate(self.fd, 0, self.size)
        except OSError as err:
            if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
            os.ftruncate(self.fd, self.size)  # no reservation here: a full disk shows at a write

    def _too_big(self, err: OSError) -> OSError:
        need = format_bytes(self.size)
        if err.errno == errno.ENOSPC:
            free = format_bytes(shutil.disk_usage(self.output.parent).free)
            message = (f"not enough disk space for {self.output}: its {self.key.n_texts} vectors need "
                       f"{need}, {free} are free in {self.output.parent}.")
        elif err.errno == errno.EFBIG:
            message = (f"{self.output} would be {need}, more than this process's file size limit "
                       "(ulimit -f).")
        else:
            return write_error(self.output, err)
        error = OutputError(message)
        error.errno = err.errno
        return error

    # -- an interrupted job, continued ----------------------------------------------------------
    def resume(self) -> EmbedFileResult:
        try:
            state = json.loads(self.progress.read_text(encoding="utf-8"))
            saved, done = state["key"], int(state["done"])
            truncated = [int(n) for n in state["truncated_lines"]]
            blank = [int(n) for n in state["blank_lines"]]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"cannot resume {self.output}: the record of the interrupted run is damaged "
                             f"({type(err).__name__}: {err}); run without --resume to start over.") from None
        # (a field newer than the record has its default there: processes=1)
        saved = {f.name: f.default for f in fields(JobKey) if f.default is not MISSING} | saved
        changed = [name for name, value in asdict(self.key).items() if saved.get(name) != value]
        if changed:
            raise ValueError(f"cannot resume {self.output}: the interrupted job differs ("
                             + "; ".join(_difference(name, saved.get(name), getattr(self.key, name))
                                         for name in changed)
                             + "). Run without --resume to start over.")
        if done % self.key.chunk_size and done != self.last or not self.first <= done <= self.last:
            raise ValueError(f"cannot resume {self.output}: the record of the interrupted run is damaged "
                             f"(done={done}); run without --resume to start over.")
        self._read_header()
        self.fd = os.open(self.partial, os.O_RDWR)
        return EmbedFileResult(self.key.n_texts, resumed_from=done, truncated_lines=truncated, blank_lines=blank)

    def _read_header(self) -> None:
        """Check the partial file's header against the job, and find where its rows start."""
        with open(self.partial, "rb") as f:
            try:
                version = np.lib.format.read_magic(f)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, fortran, dtype = read_header(f)
            except ValueError as err:
                raise ValueError(f"cannot resume {self.output}: its partial vectors are damaged ({err}); "
                                 "run without --resume to start over.") from None
            self.offset = f.tell()
            actual = os.fstat(f.fileno()).st_size
        if shape != (self.key.n_texts, self.key.dim) or fortran or dtype != np.float32 or actual != self.size:
            raise ValueError(f"cannot resume {self.output}: its partial vectors hold {shape} {dtype} in "
                             f"{actual} bytes, not ({self.key.n_texts}, {self.key.dim}) float32; run "
                             "without --resume to start over.")

    # -- each chunk -----------------------------------------------------------------------------
    def write(self, row: int, vectors: np.ndarray, result: EmbedFileResult) -> None:
        """Rows ``row..`` of the output, on the disk, then the progress record that says so."""
        done = row + len(vectors)
        state = {"key": asdict(self.key), "done": done, "truncated_lines": result.truncated_lines,
                 "blank_lines": result.blank_lines}
        try:
            _write_all(self.fd, np.ascontiguousarray(vectors, dtype="<f4").tobytes(),
                       self.offset + row * self.key.dim * 4)
            os.fsync(self.fd)  # the vectors reach the disk before the progress record says so
            atomic_write_text(self.progress, json.dumps(state) + "\n")
        except OSError as err:
            fix = {errno.ENOSPC: "make room on the disk", errno.EFBIG: "raise the file size limit"}.get(
                err.errno, "fix that")
            then = (f"{row - self.first} of {self.last - self.first} texts are saved: {fix} and run the same "
                    "command with --resume to continue." if row > self.first else
                    f"nothing was kept: {fix} and run the command again.")
            raise OutputError(f"{write_error(self.output, err)} {then}") from None

    def finish(self, result: EmbedFileResult) -> None:
        """Process 0, once every process is done: the others' reports into ``result``, then the
        partial file renamed onto the output and the progress records removed."""
        self.close()
        records = self._records()
        for record in records[1:]:
            if record.exists():  # (a process with no chunk has none)
                state = json.loads(record.read_text(encoding="utf-8"))
                result.truncated_lines.extend(state["truncated_lines"])
                result.blank_lines.extend(state["blank_lines"])
        result.resumed_from = 0 if self.key.processes > 1 else result.resumed_from
        try:
            os.replace(self.partial, self.output)
            fsync_dir(self.output.parent)
        except OSError as err:
            raise write_error(self.output, err) from None
        for record in records:
            record.unlink(missing_ok=True)  # (an empty input has no chunk, so no progress file)

    def _records(self) -> list[Path]:
        """The progress records of this job's processes, process 0's first."""
        return [partial_paths(self.output, r, self.key.processes)[1] for r in range(self.key.processes)]

    def any_saved(self) -> bool:
        """Whether any of this job's processes has a chunk done (then its partial file is worth keeping)."""
        return any(record.exists() for record in self._records())

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def discard(self) -> None:
        self.close()
        if self.rank == 0:
            self.partial.unlink(missing_ok=True)
        self.progress.unlink(missing_ok=True)


class _Job:
    """``with job.open(resume, d) as result``: on success, the output once every process is done;
    the partial output kept for a resume after an interruption or a full disk; discarded after
    any other failure."""

    def __init__(self, job: PartialOutput, resume: bool, d: Dist) -> None:
        self.job, self.resume, self.d = job, resume, d

    def __enter__(self) -> EmbedFileResult:
        job, d = self.job, self.d
        if d.main:  # a resume keeps the partial file even where process 0 itself had nothing done
            self.result = job.attach(True) if self.resume else job.start()
        d.barrier()  # the partial file is ready for every process
        if not d.main:
            self.result = job.attach(self.resume)
        return self.result

    def __exit__(self, kind, error, traceback) -> bool:
        if kind is None:
            self.d.barrier()  # every process has written its rows
            if self.d.main:
                self.job.finish(self.result)
            else:
                self.job.close()
            return False
        saved = self.job.progress.exists()  # this process has a chunk done
        kept = self.job.any_saved()  # the shared file stays while any process has chunks in it (its own or not)
        if kept and (kind is KeyboardInterrupt or isinstance(error, (OutputError, PeerStopped))):
            self.job.close()  # the finished chunks stay, for --resume (once there is room)
        else:
            self.job.discard()
        if kind is KeyboardInterrupt:
            done = json.loads(self.job.progress.read_text())["done"] - self.job.first if saved else 0
            raise EmbedInterrupted(done, self.job.last - self.job.first, kept) from None
        return False


def _write_all(fd: int, data: bytes, offset: int) -> None:
    """``pwrite`` until every byte is written: a full disk or a size limit raises ``OSError``
    (a memory-mapped file would die of SIGBUS instead)."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _difference(name: str, before: object, now: object) -> str:
    if name == "input_blake2b":
        return "the input's content changed (its blake2b hash differs)"
    return f"{name} was {before!r}, now {now!r}"
