"""Embedding a whole file: streamed, written incrementally, resumable after any interruption.

The job reads the file in fixed chunks of lines, embeds each chunk and writes its vectors into
a memory-mapped ``.npy`` beside the output (``.NAME.partial``). After every chunk the vectors
are flushed to disk *first*, then a small progress file (``.NAME.progress.json``) is replaced
atomically to say how many texts are done. Whatever kills the process (Ctrl-C, SIGTERM, even
SIGKILL or a power cut), the progress file never claims more than the disk holds, so
``resume=True`` continues from the last finished chunk. The chunks are the same on every run,
so a resumed job's output is bit-identical to an uninterrupted one. When the last chunk is
done the partial file is renamed onto the output: the output is complete or absent.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path

import numpy as np

from ctxvec.checkpoint import atomic_write_text, fsync_dir
from ctxvec.pipeline import DEFAULT_BATCH_TOKENS, Pipeline
from ctxvec.textfile import FileFormat, InputFileError, check_readable, chunks, count_lines, iter_texts
from ctxvec.tokenizer import TruncationError

DEFAULT_CHUNK = 2048  # texts read, sorted by length and embedded together


@dataclass
class JobKey:
    """What must be the same for a partial output to be continued (else the result would differ)."""

    input: str
    input_size: int
    input_mtime_ns: int
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
        n_texts: texts in the file (rows of the output).
        resumed_from: texts already done by an earlier, interrupted run (0 for a fresh run).
        truncated_lines: 1-based line numbers of texts cut to the model's length limit.
    """

    n_texts: int
    resumed_from: int = 0
    truncated_lines: list[int] = field(default_factory=list)


class EmbedInterrupted(Exception):
    """The job stopped early (a signal); the partial output is kept for ``resume``."""

    def __init__(self, done: int, total: int) -> None:
        super().__init__(f"interrupted after {done} of {total} texts; run the same command with "
                         "--resume to continue.")
        self.done, self.total = done, total


def partial_paths(output: Path) -> tuple[Path, Path]:
    """(partial vectors, progress file) that sit beside ``output`` while a job runs."""
    return (output.with_name(f".{output.name}.partial"),
            output.with_name(f".{output.name}.progress.json"))


def embed_file(pipeline: Pipeline, path: str | Path, output: str | Path, *, fmt: FileFormat = "auto",
               batch_tokens: int = DEFAULT_BATCH_TOKENS, strict: bool = False, resume: bool = False,
               chunk_size: int = DEFAULT_CHUNK, on_progress: Callable[[int], None] | None = None,
               ) -> EmbedFileResult:
    """Write the sentence vectors of every line of ``path`` to ``output`` (.npy, float32, in order).

    Args:
        pipeline: the model.
        path: a text file (one text per line) or JSON lines with a "text" field.
        output: the .npy file to write; it appears only when complete.
        fmt: "auto" (by suffix), "text" or "jsonl".
        batch_tokens, strict: as in ``Pipeline.embed``.
        resume: continue an interrupted job on the same input, model and settings.
        chunk_size: texts per chunk (the unit of progress and of resumption).
        on_progress: called with the number of texts finished by each chunk.

    Raises:
        InputFileError, TruncationError (strict), ValueError (a partial job that does not match),
        EmbedInterrupted (KeyboardInterrupt while running; the partial output is kept).
    """
    path, output = Path(path), Path(output)
    if output.suffix != ".npy":
        raise ValueError(f"the output must be a .npy file, got {output}.")
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}.")
    check_readable(path)
    stat = path.stat()
    total = count_lines(path)
    key = JobKey(str(path.resolve()), stat.st_size, stat.st_mtime_ns, total, pipeline.name,
                 pipeline.precision, pipeline.dim, fmt, strict, batch_tokens, chunk_size)
    output.parent.mkdir(parents=True, exist_ok=True)
    partial, progress = partial_paths(output)

    done, truncated = 0, []
    if resume and partial.exists() and progress.exists():
        done, truncated = _read_progress(progress, key)
        vectors = np.lib.format.open_memmap(partial, mode="r+")
        if vectors.shape != (total, pipeline.dim) or vectors.dtype != np.float32:
            raise ValueError(f"{partial} holds {vectors.shape} {vectors.dtype}, not ({total}, {pipeline.dim}) "
                             "float32; delete it to start over.")
    else:
        progress.unlink(missing_ok=True)
        vectors = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float32, shape=(total, pipeline.dim))
    result = EmbedFileResult(total, resumed_from=done)
    if on_progress is not None and done:
        on_progress(done)
    try:
        texts = islice(iter_texts(path, fmt), done, None)  # done is always a whole number of chunks
        for chunk in chunks(texts, chunk_size):
            details = pipeline.embed_with_details(chunk, batch_tokens=batch_tokens, strict=strict)
            vectors[done : done + len(chunk)] = details.vectors
            truncated.extend(int(done + 1 + i) for i in np.flatnonzero(details.truncated))
            done += len(chunk)
            vectors.flush()  # the vectors reach the disk before the progress file says so
            atomic_write_text(progress, json.dumps({"key": asdict(key), "done": done,
                                                    "truncated_lines": truncated}) + "\n")
            if on_progress is not None:
                on_progress(len(chunk))
    except KeyboardInterrupt:
        del vectors
        raise EmbedInterrupted(done, total) from None
    except TruncationError as err:
        _discard(partial, progress)
        raise TruncationError(done + err.index, err.n_tokens, err.max_len) from None  # index in the file
    except BaseException:
        _discard(partial, progress)
        raise
    if done != total:
        _discard(partial, progress)
        raise InputFileError(f"{path} changed while it was read ({done} texts, expected {total}).")
    vectors.flush()
    del vectors
    os.replace(partial, output)
    fsync_dir(output.parent)
    progress.unlink(missing_ok=True)  # (an empty file has no chunk, so no progress file)
    result.truncated_lines = truncated
    return result


def _read_progress(progress: Path, key: JobKey) -> tuple[int, list[int]]:
    try:
        state = json.loads(progress.read_text(encoding="utf-8"))
        saved, done, truncated = state["key"], int(state["done"]), [int(n) for n in state["truncated_lines"]]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{progress} is damaged ({err}); delete it to start over.") from None
    differences = [f"{name} was {saved.get(name)!r}, now {value!r}"
                   for name, value in asdict(key).items() if saved.get(name) != value]
    if differences:
        raise ValueError("cannot resume: the interrupted job differs (" + "; ".join(differences)
                         + "). Run without --resume to start over.")
    if done % key.chunk_size and done != key.n_texts:
        raise ValueError(f"{progress} is damaged (done={done}); delete it to start over.")
    return done, truncated


def _discard(partial: Path, progress: Path) -> None:
    partial.unlink(missing_ok=True)
    progress.unlink(missing_ok=True)
