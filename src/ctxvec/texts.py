"""Reading texts from files, one per line, streamed (never the whole file in memory).

An input is a regular file, standard input (``-``), or a pipe, a FIFO or a process
substitution (``<(cat f)``). ``open_texts`` reads a pipe once, in full, into an unnamed
temporary file, so that every input can be counted, hashed and read again.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import json
import os
import stat
import sys
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

FileFormat = Literal["auto", "text", "jsonl"]
STDIN = "-"
_BLOCK = 1 << 20


class InputFileError(ValueError):
    """A file that cannot be read as texts; the message names the file and line."""


def resolve_format(path: str | Path, fmt: FileFormat) -> Literal["text", "jsonl"]:
    if fmt != "auto":
        return fmt
    return "jsonl" if Path(path).suffix.lower() in (".jsonl", ".ndjson") else "text"


def check_readable(path: Path) -> None:
    if not path.exists():
        raise InputFileError(f"{path}: no such file.")
    if path.is_dir():
        raise InputFileError(f"{path} is a directory, not a file.")
    try:
        with open(path, "rb"):
            pass
    except OSError as err:
        raise InputFileError(f"{path}: cannot be read ({err.strerror}).") from None


@dataclass
class TextSource:
    """An input ready to be read (again): its texts can be streamed with ``texts()``.

    Attributes:
        name: how messages name it (the path, or "standard input").
        file: the content, seekable (a pipe's content lies in an unnamed temporary file).
        n_texts: lines in it (a last line without a final newline counts).
        digest: blake2b of the content: the same digest means the same texts.
        piped: whether it came from a pipe, a FIFO or standard input.
    """

    name: str
    file: BinaryIO
    n_texts: int
    digest: str
    piped: bool

    def looks_like_json_lines(self) -> bool:
        """Whether the first line is a JSON object with a "text" field."""
        self.file.seek(0)
        first = self.file.readline(_BLOCK).strip()
        try:
            record = json.loads(first) if first.startswith(b"{") else None
        except (ValueError, RecursionError):
            return False
        return isinstance(record, dict) and "text" in record

    def texts(self, fmt: FileFormat, digest: hashlib.blake2b | None = None) -> Iterator[str]:
        """Every text from the first line on; ``digest`` (if given) is fed every byte read."""
        self.file.seek(0)
        lines: Iterable[bytes] = self.file
        if digest is not None:
            lines = _hashed(lines, digest)
        return parse_lines(lines, self.name, resolve_format(self.name, fmt))


@contextlib.contextmanager
def open_texts(path: str | Path, spool_dir: Path | None = None) -> Iterator[TextSource]:
    """Open ``path`` (``-`` for standard input) as a ``TextSource``, counted and hashed.

    A pipe is copied, as it is read, into an unnamed temporary file in ``spool_dir`` (default:
    the system's), which disappears when the context ends.
    """
    if str(path) == STDIN:
        with tempfile.TemporaryFile(dir=spool_dir) as copy:
            n, digest = _scan(sys.stdin.buffer, copy, "standard input", spool_dir)
            yield TextSource("standard input", copy, n, digest, piped=True)
        return
    path = Path(path)
    check_readable(path)
    with open(path, "rb") as f:
        if stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            n, digest = _scan(f)
            yield TextSource(str(path), f, n, digest, piped=False)
            return
        with tempfile.TemporaryFile(dir=spool_dir) as copy:
            n, digest = _scan(f, copy, str(path), spool_dir)
            yield TextSource(str(path), copy, n, digest, piped=True)


def _scan(f: BinaryIO, copy: BinaryIO | None = None, name: str = "", spool_dir: Path | None = None
          ) -> tuple[int, str]:
    """(lines, blake2b hex digest) of everything ``f`` holds, written to ``copy`` if given."""
    n, last, size, digest = 0, b"\n", 0, hashlib.blake2b(digest_size=20)
    for block in iter(lambda: f.read(_BLOCK), b""):
        n += block.count(b"\n")
        last = block[-1:]
        size += len(block)
        digest.update(block)
        if copy is not None:
            _spool(copy, block, name, spool_dir, size)
    if copy is not None:
        _spool(copy, b"", name, spool_dir, size)
    return n + (last != b"\n"), digest.hexdigest()


def _spool(copy: BinaryIO, block: bytes, name: str, spool_dir: Path | None, size: int) -> None:
    try:
        copy.write(block)
        copy.flush()
    except OSError as err:
        folder = spool_dir or Path(tempfile.gettempdir())
        raise InputFileError(f"cannot keep a copy of {name} in {folder} ({(err.strerror or str(err)).lower()}, "
                             f"after {size:,} bytes): a piped input is copied to disk to be counted and read "
                             "again; make room there, or give a regular file.") from None


def _hashed(lines: Iterable[bytes], digest: hashlib.blake2b) -> Iterator[bytes]:
    for line in lines:
        digest.update(line)
        yield line


def check_utf8(path: str | Path) -> None:
    """Raise ``InputFileError`` naming the line of the first byte of ``path`` that is not UTF-8."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    lines = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            try:
                decoder.decode(block)
            except UnicodeDecodeError as err:
                line = lines + block.count(b"\n", 0, err.start) + 1
                raise InputFileError(f"{path}, line {line}: not valid UTF-8.") from None
            lines += block.count(b"\n")
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise InputFileError(f"{path}, line {lines + 1}: not valid UTF-8 (the file ends inside a "
                                 "character).") from None


def iter_texts(path: Path, fmt: FileFormat = "auto") -> Iterator[str]:
    """Yield one text per line of a file: plain lines (CRLF or LF), or the "text" field of JSON lines."""
    with open(path, "rb") as f:
        yield from parse_lines(f, str(path), resolve_format(path, fmt))


def parse_lines(lines: Iterable[bytes], name: str, kind: Literal["text", "jsonl"]) -> Iterator[str]:
    """The texts of raw lines; errors name ``name`` and the 1-based line."""
    for number, raw in enumerate(lines, start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise InputFileError(f"{name}, line {number}: not valid UTF-8 (byte {err.start}).") from None
        if number == 1 and line.startswith("\ufeff"):
            line = line[1:]  # a byte-order mark is not part of the text
        line = line.rstrip("\n").removesuffix("\r")
        if kind == "text":
            yield line
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputFileError(f"{name}, line {number}: not JSON ({err.msg}).") from None
        except RecursionError:
            raise InputFileError(f"{name}, line {number}: not JSON that can be read (nested too deeply).") from None
        if not isinstance(record, dict) or "text" not in record:
            raise InputFileError(f'{name}, line {number}: a JSON object with a "text" field is expected.')
        text = record["text"]
        if not isinstance(text, str):
            raise InputFileError(f'{name}, line {number}: "text" is a {type(text).__name__}, not a string.')
        if (at := lone_surrogate(text)) is not None:
            raise InputFileError(f'{name}, line {number}: "text" holds a lone surrogate (an unpaired '
                                 f"\\u{ord(text[at]):04x} escape) at character {at}, which is not valid "
                                 "Unicode.")
        yield text


def lone_surrogate(text: str) -> int | None:
    """Where ``text`` holds half of a UTF-16 surrogate pair (it cannot be UTF-8), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return err.start
    return None


def chunks(texts: Iterable[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for text in texts:
        chunk.append(text)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
