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
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path

import numpy as np

from ctxvec.engine.batching import DEFAULT_BATCH_TOKENS
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

    def __init__(self, done: int, total: int) -> None:
        super().__init__(f"interrupted after {done} of {total} texts; run the same command with --resume to "
                         "continue." if done else
                         f"interrupted before the first chunk of {total} texts was done; nothing was kept: "
                         "run the command again.")
        self.done, self.total = done, total


def partial_paths(output: Path) -> tuple[Path, Path]:
    """(partial vectors, progress file) that sit beside ``output`` while a job runs."""
    return (output.with_name(f".{output.name}.partial"),
            output.with_name(f".{output.name}.progress.json"))


def embed_file(pipeline: Pipeline, path: str | Path, output: str | Path, *, fmt: FileFormat = "auto",
               batch_tokens: int = DEFAULT_BATCH_TOKENS, strict: bool = False, resume: bool = False,
               chunk_size: int = DEFAULT_CHUNK, on_progress: Callable[[int, int], None] | None = None,
               ) -> EmbedFileResult:
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
        on_progress: called with (texts done, texts in all) when the job starts and after each chunk.

    Raises:
        InputFileError, StrictError (strict), ValueError (a partial job that does not match, or
        another job writing ``output``), OutputError (the disk is full, a file size limit;
        the message says what to free, and the partial output is kept for ``resume`` when there
        is work to keep), EmbedInterrupted (KeyboardInterrupt; the partial output is kept).
    """
    output = Path(output)
    if output.suffix != ".npy":
        raise ValueError(f"the output must be a .npy file, got {output}.")
    if not is_int(chunk_size) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}.")
    output.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(output, "output"), open_texts(path, spool_dir=output.parent) as source:
        if fmt == "auto" and source.piped and source.looks_like_json_lines():  # no suffix to go by
            raise InputFileError(f'{source.name} looks like JSON lines (its first line is an object with a '
                                 '"text" field): say --format jsonl, or --format text to embed the lines as '
                                 "they are.")
        key = JobKey(source.digest, source.n_texts, pipeline.name, pipeline.precision, pipeline.dim,
                     resolve_format(source.name, fmt), strict, batch_tokens, chunk_size)
        job = PartialOutput(output, key)
        with job.open(resume) as result:
            if on_progress is not None:
                on_progress(result.resumed_from, key.n_texts)
            _embed_chunks(pipeline, source, job, result, fmt, on_progress)
    return result


def _embed_chunks(pipeline: Pipeline, source: TextSource, job: PartialOutput, result: EmbedFileResult,
                  fmt: FileFormat, on_progress: Callable[[int, int], None] | None) -> None:
    key = job.key
    n_special = pipeline.tokenizer.n_special
    digest = hashlib.blake2b(digest_size=20)  # the content read now, against the content counted
    done = result.resumed_from
    texts = islice(source.texts(fmt, digest), done, None)  # done is always a whole number of chunks
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
            on_progress(done, key.n_texts)
    if done != key.n_texts or digest.hexdigest() != key.input_blake2b:
        raise InputFileError(f"{source.name} changed while it was read; run again on a file that stays put.")


class PartialOutput:
    """The ``.partial`` vectors and the progress record of one job, beside ``output``."""

    def __init__(self, output: Path, key: JobKey) -> None:
        self.output, self.key = output, key
        self.partial, self.progress = partial_paths(output)
        self.fd = -1
        self.offset = 0  # where the rows start, after the .npy header

    @property
    def size(self) -> int:
        return self.offset + self.key.n_texts * self.key.dim * 4

    def open(self, resume: bool) -> _Job:
        return _Job(self, resume)

    # -- a new job: the header, and the whole file reserved on the disk ----------------------
    def start(self) -> EmbedFileResult:
        self.progress.unlink(missing_ok=True)
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
        return EmbedFileResult(self.key.n_texts)

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
        changed = [name for name, value in asdict(self.key).items() if saved.get(name) != value]
        if changed:
            raise ValueError(f"cannot resume {self.output}: the interrupted job differs ("
                             + "; ".join(_difference(name, saved.get(name), getattr(self.key, name))
                                         for name in changed)
                             + "). Run without --resume to start over.")
        if done % self.key.chunk_size and done != self.key.n_texts or not 0 <= done <= self.key.n_texts:
            raise ValueError(f"cannot resume {self.output}: the record of the interrupted run is damaged "
                             f"(done={done}); run without --resume to start over.")
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
        self.fd = os.open(self.partial, os.O_RDWR)
        return EmbedFileResult(self.key.n_texts, resumed_from=done, truncated_lines=truncated, blank_lines=blank)

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
            then = (f"{row} of {self.key.n_texts} texts are saved: {fix} and run the same command with --resume "
                    "to continue." if row else f"nothing was kept: {fix} and run the command again.")
            raise OutputError(f"{write_error(self.output, err)} {then}") from None

    def finish(self) -> None:
        os.close(self.fd)
        self.fd = -1
        try:
            os.replace(self.partial, self.output)
            fsync_dir(self.output.parent)
        except OSError as err:
            raise write_error(self.output, err) from None
        self.progress.unlink(missing_ok=True)  # (an empty input has no chunk, so no progress file)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def discard(self) -> None:
        self.close()
        self.partial.unlink(missing_ok=True)
        self.progress.unlink(missing_ok=True)


class _Job:
    """``with job.open(resume) as result``: finish on success; keep the partial output for a
    resume after an interruption or a full disk; discard it after any other failure."""

    def __init__(self, job: PartialOutput, resume: bool) -> None:
        self.job, self.resume = job, resume

    def __enter__(self) -> EmbedFileResult:
        job = self.job
        self.result = job.resume() if self.resume and job.partial.exists() and job.progress.exists() else job.start()
        return self.result

    def __exit__(self, kind, error, traceback) -> bool:
        if kind is None:
            self.job.finish()
            return False
        saved = self.job.progress.exists()  # a chunk is done: there is something to resume
        if saved and (kind is KeyboardInterrupt or isinstance(error, OutputError)):
            self.job.close()  # the finished chunks stay, for --resume (once there is room)
        else:
            self.job.discard()
        if kind is KeyboardInterrupt:
            done = json.loads(self.job.progress.read_text())["done"] if saved else 0
            raise EmbedInterrupted(done, self.job.key.n_texts) from None
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
