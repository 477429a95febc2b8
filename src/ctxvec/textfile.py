"""Reading texts from files, one per line, streamed (never the whole file in memory)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

FileFormat = Literal["auto", "text", "jsonl"]


class InputFileError(ValueError):
    """A file that cannot be read as texts; the message names the file and line."""


def resolve_format(path: Path, fmt: FileFormat) -> Literal["text", "jsonl"]:
    if fmt != "auto":
        return fmt
    return "jsonl" if path.suffix.lower() in (".jsonl", ".ndjson") else "text"


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


def count_lines(path: Path) -> int:
    """Number of texts in the file (a last line without a final newline counts)."""
    n, last = 0, b"\n"
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            n += block.count(b"\n")
            last = block[-1:]
    return n + (last != b"\n")


def iter_texts(path: Path, fmt: FileFormat = "auto") -> Iterator[str]:
    """Yield one text per line: plain lines (CRLF or LF), or the "text" field of JSON lines."""
    kind = resolve_format(path, fmt)
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise InputFileError(f"{path}, line {number}: not valid UTF-8 (byte {err.start}).") from None
            if number == 1 and line.startswith("\ufeff"):
                line = line[1:]  # a byte-order mark is not part of the text
            line = line.rstrip("\n").removesuffix("\r")
            if kind == "text":
                yield line
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputFileError(f"{path}, line {number}: not JSON ({err.msg}).") from None
            if not isinstance(record, dict) or "text" not in record:
                raise InputFileError(f'{path}, line {number}: a JSON object with a "text" field is expected.')
            if not isinstance(record["text"], str):
                raise InputFileError(f'{path}, line {number}: "text" is a {type(record["text"]).__name__}, '
                                     "not a string.")
            yield record["text"]


def chunks(texts: Iterator[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for text in texts:
        chunk.append(text)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
