"""Training text: documents, a held-out split by document, fixed-length token sequences.

A document is a block of lines separated by a blank line; a file without blank lines is cut
into documents of ``doc_lines`` consecutive lines (for a Bible, about a chapter), so that the
held-out split never puts neighbouring lines on both sides.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ctxvec.texts import check_readable, iter_texts
from ctxvec.tokenizer import SPECIAL_TOKENS, Tokenizer


def read_documents(paths: Sequence[str | Path], doc_lines: int = 100) -> list[list[str]]:
    """The documents of some text files, each a list of non-empty lines."""
    documents: list[list[str]] = []
    for path in paths:
        path = Path(path)
        check_readable(path)
        lines = list(iter_texts(path, "text"))
        if any(not line.strip() for line in lines):
            block: list[str] = []
            for line in lines + [""]:
                if line.strip():
                    block.append(line)
                elif block:
                    documents.append(block)
                    block = []
        else:
            documents += [lines[i:i + doc_lines] for i in range(0, len(lines), doc_lines)]
    return [d for d in documents if d]


def split_documents(documents: list[list[str]], eval_fraction: float, seed: int
                    ) -> tuple[list[list[str]], list[list[str]]]:
    """(train, held-out): whole documents, chosen at random with ``seed``."""
    if not 0 < eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}.")
    if len(documents) < 2:
        raise ValueError("the corpus needs at least two documents to hold one out.")
    order = list(range(len(documents)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(eval_fraction * len(documents)))
    held = set(order[:n_eval])
    return ([d for i, d in enumerate(documents) if i not in held],
            [d for i, d in enumerate(documents) if i in held])


def pack_sequences(tokenizer: Tokenizer, documents: list[list[str]], seq_len: int) -> np.ndarray:
    """(n, seq_len) int64 sequences ``[CLS] ... [SEP]``: each document's token stream cut into
    full-length pieces (a document's last piece, shorter than the rest, is dropped)."""
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    body = seq_len - 2
    rows = []
    for document in documents:
        stream = [i for enc in tokenizer.backend.encode_batch(document, add_special_tokens=False)
                  for i in enc.ids]
        for start in range(0, len(stream) - body + 1, body):
            rows.append([cls_id, *stream[start:start + body], sep_id])
    return np.array(rows, dtype=np.int64).reshape(-1, seq_len)


@dataclass
class Masking:
    """BERT's masked-LM corruption: choose 15% of the ordinary tokens; of those, 80% -> [MASK],
    10% -> a random token, 10% kept. Seeded per (step, sequence), so the masks of a step do not
    depend on how sequences are spread over processes, and a resumed run draws the same ones."""

    mask_id: int
    vocab_size: int
    special_ids: np.ndarray
    probability: float = 0.15

    @classmethod
    def for_tokenizer(cls, tokenizer: Tokenizer, probability: float = 0.15) -> Masking:
        special = [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS if tokenizer.token_to_id(t) is not None]
        if tokenizer.token_to_id("[MASK]") is None:
            raise ValueError("masked-LM training needs a tokenizer with a [MASK] token.")
        return cls(tokenizer.token_to_id("[MASK]"), tokenizer.vocab_size, np.array(special), probability)

    def __call__(self, sequences: np.ndarray, indices: np.ndarray, seed: int, step: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(inputs, labels, chosen) for ``sequences`` (their global ``indices`` seed the draws)."""
        inputs = sequences.copy()
        chosen = np.zeros(sequences.shape, dtype=bool)
        ordinary = ~np.isin(sequences, self.special_ids)
        for row, index in enumerate(indices):
            rng = np.random.default_rng((seed, step, int(index)))
            pick = (rng.random(sequences.shape[1]) < self.probability) & ordinary[row]
            how = rng.random(sequences.shape[1])
            random_ids = rng.integers(0, self.vocab_size, sequences.shape[1])
            random_ids = np.where(np.isin(random_ids, self.special_ids), sequences[row], random_ids)
            inputs[row] = np.where(pick & (how < 0.8), self.mask_id,
                                   np.where(pick & (how >= 0.8) & (how < 0.9), random_ids, sequences[row]))
            chosen[row] = pick
        return inputs, sequences, chosen
