"""Sentence pairs from a CSV or TSV file: what ``ctxvec evaluate`` and ``ctxvec finetune`` read.

Two shapes, one row per example:
- scored pairs, ``sentence1, sentence2, score`` (the STS benchmark's shape; ``ScoredPairs``);
- contrastive rows, ``anchor, positive[, negative]`` (``TextRows``).

Comma-separated (quoted as CSV quotes) unless the name ends in ``.tsv`` or the first line has a
tab (then tab-separated, unquoted: a quote is part of the text). A header line is optional: it is recognised by a score that is not a number (scored pairs)
or by column names (contrastive rows); a header that names ``sentence1``, ``sentence2`` and
``score`` (or ``label``) picks those columns out of wider files. Every problem is a
``ValueError`` of one line that names the file and the line.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PAIR_COLUMNS = ("sentence1", "sentence2", "score")
SCORE_NAMES = ("score", "label", "similarity")
ROW_NAMES = {"anchor", "positive", "negative", "query", "document", "sentence1", "sentence2", "text1", "text2",
             "question", "answer", "pos", "neg"}


@dataclass
class ScoredPairs:
    """Sentence pairs with a gold similarity score each."""

    first: list[str]
    second: list[str]
    scores: np.ndarray  # (n,) float64
    source: str = ""

    def __len__(self) -> int:
        return len(self.scores)

    @classmethod
    def from_rows(cls, rows, source: str = "pairs") -> ScoredPairs:
        """From (sentence1, sentence2, score) tuples."""
        rows = list(rows)
        for i, row in enumerate(rows):
            if len(row) != 3 or not all(isinstance(t, str) for t in row[:2]) or not _finite(row[2]):
                raise ValueError(f"{source}: pair {i} must be (sentence1, sentence2, score) with two strings "
                                 f"and a finite number, got {row!r:.200}.")
        return cls([r[0] for r in rows], [r[1] for r in rows], np.array([float(r[2]) for r in rows]), source)


@dataclass
class TextRows:
    """Contrastive rows: anchors, their positives, and optionally a hard negative each."""

    anchors: list[str]
    positives: list[str]
    negatives: list[str] | None
    source: str = ""

    def __len__(self) -> int:
        return len(self.anchors)

    @property
    def columns(self) -> list[list[str]]:
        return [self.anchors, self.positives] + ([self.negatives] if self.negatives is not None else [])


def _number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _finite(value) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _records(path: str | Path) -> tuple[list[tuple[int, list[str]]], str]:
    """(line number, cells) of every non-blank row, and the file's name for messages."""
    path = Path(path)
    name = str(path)
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise ValueError(f"{name} line {line}: not UTF-8 text (byte {err.start}).") from None
    first = text.split("\n", 1)[0]
    delimiter = "\t" if path.suffix.lower() == ".tsv" or "\t" in first else ","
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL  # TSV: a quote is a character
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting, strict=True)
    records = []
    try:
        for cells in reader:
            if cells and any(c.strip() for c in cells):
                records.append((reader.line_num, cells))
    except csv.Error as err:
        raise ValueError(f"{name} line {reader.line_num}: {err}.") from None
    if not records:
        raise ValueError(f"{name} has no rows.")
    return records, name


def read_scored_pairs(path: str | Path) -> ScoredPairs:
    """``sentence1, sentence2, score`` rows of a CSV or TSV file (see the module's docstring)."""
    records, name = _records(path)
    columns = (0, 1, 2)
    line, header = records[0]
    if len(header) < 3:
        raise ValueError(f"{name} line {line}: expected 3 columns (sentence1, sentence2, score), found {len(header)}.")
    if not _number(header[2]):  # a header line
        names = [c.strip().lower() for c in header]
        score = next((s for s in SCORE_NAMES if s in names), None)
        if "sentence1" in names and "sentence2" in names and score:
            columns = (names.index("sentence1"), names.index("sentence2"), names.index(score))
        records = records[1:]
        if not records:
            raise ValueError(f"{name} has a header line but no pairs.")
    width = max(columns) + 1
    first, second, scores = [], [], []
    for line, cells in records:
        if len(cells) < width or (columns == (0, 1, 2) and len(cells) != 3):
            raise ValueError(f"{name} line {line}: expected 3 columns (sentence1, sentence2, score), "
                             f"found {len(cells)}.")
        a, b, s = (cells[c] for c in columns)
        if not _finite(s):
            raise ValueError(f"{name} line {line}: the score {s.strip()[:40]!r} is not a finite number.")
        for text, column in ((a, "sentence1"), (b, "sentence2")):
            if not text.strip():
                raise ValueError(f"{name} line {line}: {column} is empty.")
        first.append(a)
        second.append(b)
        scores.append(float(s))
    return ScoredPairs(first, second, np.array(scores, dtype=np.float64), name)


def read_text_rows(path: str | Path) -> TextRows:
    """``anchor, positive[, negative]`` rows of a CSV or TSV file (see the module's docstring)."""
    records, name = _records(path)
    if {c.strip().lower() for c in records[0][1]} <= ROW_NAMES:  # a header line
        records = records[1:]
        if not records:
            raise ValueError(f"{name} has a header line but no rows.")
    n_columns = len(records[0][1])
    if n_columns not in (2, 3):
        raise ValueError(f"{name} line {records[0][0]}: expected 2 or 3 columns (anchor, positive[, negative]), "
                         f"found {n_columns}.")
    columns: list[list[str]] = [[] for _ in range(n_columns)]
    for line, cells in records:
        if len(cells) != n_columns:
            raise ValueError(f"{name} line {line}: expected {n_columns} columns like the first row, "
                             f"found {len(cells)}.")
        for column, text in enumerate(cells):
            if not text.strip():
                raise ValueError(f"{name} line {line}: column {column + 1} is empty.")
            columns[column].append(text)
    return TextRows(columns[0], columns[1], columns[2] if n_columns == 3 else None, name)
