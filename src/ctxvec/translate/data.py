"""Parallel text for translation: pairs from a TSV file, and their held-out split.

Data: a TSV file with a header row; the source and target columns are named (default: the
last two columns, so ``ref  es  en`` translates es -> en). Pairs are grouped for the held-out
split: by the book of a Bible-style ``ref`` column ("1 Samuel 3:4" -> "1 Samuel"), else by
blocks of consecutive lines, so that held-out lines come in stretches rather than one by one
(``split_pairs`` has the rule, and its fallback for files with too few groups).
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from ctxvec.texts import InputFileError, check_readable, iter_texts

# Whole books held out of the Bible corpus (../shared/data/bible_es_en.tsv): short books from
# both testaments and several genres: 287 validation and 351 test verses of 31,032.
BIBLE_VALID_BOOKS = ("Ruth", "Joel", "Philippians", "Jude")
BIBLE_TEST_BOOKS = ("Jonah", "Nahum", "Titus", "James", "I John")
_REF = re.compile(r"^(?P<book>.+?)\s+\d+:\d+$")
_LINES = re.compile(r"lines\s+(\d+)\s*-\s*(\d+)")  # a range of lines named as a group: "lines 2-101"
HELD_OUT_FRACTION = 0.03  # of the pairs, held out for validation and again for the test
BLOCK_LINES = 100  # the longest block of consecutive lines held out as one group


@dataclass
class Pair:
    source: str
    target: str
    group: str  # held-out unit: a book, or a block of lines ("lines 2-101")
    line: int  # the pair's line in the file (the header is line 1)


def read_pairs(path: str | Path, source_column: str | None = None, target_column: str | None = None,
               block_lines: int = BLOCK_LINES) -> tuple[list[Pair], int]:
    """(pairs, skipped) of a TSV file with a header row (columns chosen by name).

    A pair's group is the book of a Bible-style ``ref`` column ("1 Samuel 3:4" -> "1 Samuel"),
    else its block of ``block_lines`` lines of the file ("lines 2-101", "lines 102-201", ...).
    Blank lines are ignored; ``skipped`` counts the rows whose source or target cell is empty.
    """
    path = Path(path)
    check_readable(path)
    lines = iter_texts(path, "text")
    header = next(lines, None)
    if header is None:
        raise InputFileError(f"{path} is empty; a header row naming the columns is expected.")
    columns = header.split("\t")
    if len(columns) < 2:
        raise InputFileError(f"{path}, line 1: a tab-separated header with at least two columns is expected.")
    source_column = source_column or columns[-2]
    target_column = target_column or columns[-1]
    for name in (source_column, target_column):
        if name not in columns:
            raise InputFileError(f"{path}: no column {name!r}; the header has {', '.join(columns)}.")
    s, t = columns.index(source_column), columns.index(target_column)
    if s == t:
        raise InputFileError(f"{path}: the source and target columns are both {source_column!r}; name two "
                             f"different columns of {', '.join(columns)} (--source-column, --target-column).")
    ref = columns.index("ref") if "ref" in columns else None
    pairs, skipped = [], 0
    for number, line in enumerate(lines, start=2):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != len(columns):
            raise InputFileError(f"{path}, line {number}: {len(fields)} fields, the header has {len(columns)}.")
        source, target = fields[s].strip(), fields[t].strip()
        if not (source and target):
            skipped += 1
            continue
        if ref is not None and (m := _REF.match(fields[ref])):
            group = m["book"]
        else:
            start = (number - 2) // block_lines * block_lines + 2
            group = f"lines {start}-{start + block_lines - 1}"
        pairs.append(Pair(source, target, group, number))
    if not pairs:
        empty = f" ({skipped} rows have an empty {source_column} or {target_column} cell)" if skipped else ""
        raise InputFileError(f"{path} holds no pairs{empty}.")
    return pairs, skipped


def split_pairs(pairs: list[Pair], valid_groups: Sequence[str] | None = None,
                test_groups: Sequence[str] | None = None, fraction: float = HELD_OUT_FRACTION, seed: int = 0,
                ) -> tuple[list[Pair], list[Pair], list[Pair]]:
    """(train, valid, test), held out by whole groups; each list in file order.

    A named group is a group of the data (a book, "lines 2-101") or any range of lines
    ("lines 250-259"). A split not named gets a share of about ``fraction`` of the pairs (at
    least one): the groups, shuffled by ``seed``, each join the first split they bring closer
    to its share. If that leaves a split under half a share (one book, or a file too small for
    its 100-line blocks), blocks of consecutive lines are dealt the same way instead, at most
    ``BLOCK_LINES`` long and sized so that whole blocks make a share. A split dealt ends with
    half a share to two. Held-out pairs carry as their group the name that selects them, so
    typing a split's names reproduces it.

    Raises ``ValueError`` for an unknown name, a pair named for both splits, or a training split
    smaller than the held-out ones (a file too small to hold out from).
    """
    splits = [None if names is None else _named(pairs, names) for names in (valid_groups, test_groups)]
    missing = [k for k, chosen in enumerate(splits) if chosen is None]
    if missing:
        share = max(1, round(fraction * len(pairs)))
        taken = {i for chosen in splits if chosen for i in chosen}
        groups: dict[str, list[int]] = {}
        for i, p in enumerate(pairs):
            groups.setdefault(p.group, []).append(i)
        size = math.ceil(share / math.ceil(share / BLOCK_LINES))  # blocks of <= BLOCK_LINES, one share in all
        dealt = (_deal(groups, share, len(missing), seed, taken)
                 or _deal(_line_blocks(pairs, size), share, len(missing), seed, taken) or [{}] * len(missing))
        for k, chosen in zip(missing, dealt):
            splits[k] = chosen
    valid, test = splits
    if both := valid.keys() & test.keys():
        raise ValueError(f"{len(both)} pairs would be both validation and test; name groups that do not overlap.")
    held = valid.keys() | test.keys()
    train = [p for i, p in enumerate(pairs) if i not in held]
    if not train or len(train) < len(held) or not (valid and test):
        raise ValueError(f"{len(pairs)} pairs are too few to train on most and hold out validation and test ones "
                         f"({len(train)} training, {len(valid)} validation, {len(test)} test): give a file with "
                         "more pairs, or name smaller held-out groups (--valid-groups, --test-groups).")
    return (train, [replace(pairs[i], group=name) for i, name in sorted(valid.items())],
            [replace(pairs[i], group=name) for i, name in sorted(test.items())])


def _named(pairs: list[Pair], names: Sequence[str]) -> dict[int, str]:
    """{pair index: name} of the pairs in the named groups or ranges of lines ("lines 2-101")."""
    chosen: dict[int, str] = {}
    for name in names:
        picked = [i for i, p in enumerate(pairs) if p.group == name]
        if not picked and (m := _LINES.fullmatch(name.strip())):
            name = f"lines {m[1]}-{m[2]}"
            picked = [i for i, p in enumerate(pairs) if int(m[1]) <= p.line <= int(m[2])]
        if not picked:
            groups = list(dict.fromkeys(p.group for p in pairs))
            raise ValueError(f"no group {name!r} in the data; its groups are {_first_few(groups)}; a range of "
                             "lines such as 'lines 2-101' also names one.")
        chosen.update(dict.fromkeys(picked, name))
    return chosen


def _line_blocks(pairs: list[Pair], size: int) -> dict[str, list[int]]:
    """Consecutive pairs in blocks of ``size`` (the last one takes the rest), named "lines 2-10"."""
    starts = list(range(0, len(pairs) - size + 1, size)) or [0]
    ends = starts[1:] + [len(pairs)]
    return {f"lines {pairs[a].line}-{pairs[b - 1].line}": list(range(a, b)) for a, b in zip(starts, ends)}


def _deal(units: dict[str, list[int]], share: int, splits: int, seed: int, taken: set[int],
          ) -> list[dict[int, str]] | None:
    """``splits`` x {pair index: unit name} of about ``share`` pairs each; None if one is under half.

    The units (less the pairs already ``taken``) are shuffled by ``seed``, and each joins the
    first split it brings closer to ``share``, so no split ends with two shares or more.
    """
    order = list(units)
    random.Random(seed).shuffle(order)
    dealt: list[dict[int, str]] = [{} for _ in range(splits)]
    for name in order:
        members = [i for i in units[name] if i not in taken]
        for chosen in dealt:
            if abs(len(chosen) + len(members) - share) < abs(len(chosen) - share):
                chosen.update(dict.fromkeys(members, name))
                break
    return dealt if all(2 * len(chosen) >= share for chosen in dealt) else None


def _first_few(names: Sequence[str], n: int = 6) -> str:
    """The names joined ("a, b, c"), or the first ``n`` of them and "and 12 more"."""
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def _natural(name: str) -> list:
    """A sort key that puts "lines 2-101" before "lines 102-201"."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]
