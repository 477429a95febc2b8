"""How good sentence vectors are for similarity: correlation with human scores (STS).

``evaluate_pairs(pipeline, pairs)`` embeds both sentences of every pair, takes the cosine of
the two vectors, and reports Spearman's and Pearson's correlation (x100) between those cosines
and the gold scores, as sentence-transformers' ``EmbeddingSimilarityEvaluator`` and the MTEB STS
tasks do (Spearman of the cosine is the figure papers quote).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import stats

from ctxvec.pairs import ScoredPairs, read_scored_pairs
from ctxvec.pipeline import Pipeline


@dataclass
class PairsEvaluation:
    """Correlations between the cosine of a pair's sentence vectors and its gold score.

    Attributes:
        spearman: Spearman's rank correlation x 100 (what STS results quote).
        pearson: Pearson's correlation x 100.
        n_pairs: pairs evaluated.
        n_texts: their texts (two per pair).
        n_truncated: of those, how many were cut to the model's length limit.
    """

    spearman: float
    pearson: float
    n_pairs: int
    n_texts: int
    n_truncated: int

    def to_dict(self) -> dict:
        return asdict(self)


def pair_cosines(pipeline: Pipeline, pairs: ScoredPairs, batch_tokens: int | None = None
                 ) -> tuple[np.ndarray, int]:
    """(the cosine of each pair's two sentence vectors, how many of the 2n texts were truncated).

    Each distinct text is embedded once."""
    texts = list(dict.fromkeys(pairs.first + pairs.second))
    where = {text: i for i, text in enumerate(texts)}
    result = pipeline.embed_with_details(texts, batch_tokens=batch_tokens)
    vectors = result.vectors.astype(np.float64)
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    a = np.array([where[t] for t in pairs.first])
    b = np.array([where[t] for t in pairs.second])
    truncated = int(result.truncated[a].sum() + result.truncated[b].sum())
    return (vectors[a] * vectors[b]).sum(1), truncated


def correlations(predicted: np.ndarray, gold: np.ndarray, source: str = "pairs") -> tuple[float, float]:
    """(Spearman, Pearson) x 100 of ``predicted`` against ``gold``."""
    if len(gold) < 2:
        raise ValueError(f"{source}: a correlation needs at least 2 pairs, got {len(gold)}.")
    if np.ptp(gold) == 0:
        raise ValueError(f"{source}: every gold score is {gold[0]:g}; a correlation needs scores that differ.")
    if np.ptp(predicted) == 0:  # a degenerate model: no ranking at all
        return 0.0, 0.0
    return 100.0 * float(stats.spearmanr(gold, predicted)[0]), 100.0 * float(stats.pearsonr(gold, predicted)[0])


def evaluate_pairs(pipeline: Pipeline, pairs: str | Path | ScoredPairs | Iterable[tuple[str, str, float]],
                   batch_tokens: int | None = None) -> PairsEvaluation:
    """Spearman and Pearson (x100) between the cosine of each pair's sentence vectors and its score.

    Args:
        pipeline: the model (``ctxvec.load(...)``).
        pairs: a CSV/TSV file of ``sentence1, sentence2, score`` rows (``ctxvec.pairs``), a
            ``ScoredPairs``, or (sentence1, sentence2, score) tuples.
        batch_tokens: padded tokens per forward pass (None: the pipeline's budget).

    Example:
        >>> result = evaluate_pairs(ctxvec.load("minilm"), "stsb_en_dev.csv")  # doctest: +SKIP
        >>> round(result.spearman, 2)  # doctest: +SKIP
        86.71
    """
    if isinstance(pairs, (str, Path)):
        pairs = read_scored_pairs(pairs)
    elif not isinstance(pairs, ScoredPairs):
        pairs = ScoredPairs.from_rows(pairs)
    cosines, truncated = pair_cosines(pipeline, pairs, batch_tokens)
    spearman, pearson = correlations(cosines, pairs.scores, pairs.source or "pairs")
    return PairsEvaluation(spearman, pearson, len(pairs), 2 * len(pairs), truncated)
