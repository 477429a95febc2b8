"""Losses that teach sentence vectors similarity, on a batch of sentence vectors (B, D).

- ``cosent_loss``: scored pairs; every pair the gold scores rank above another must have the
  higher cosine (a ranking loss, blind to the scores' scale; Su 2022).
- ``cosine_loss``: scored pairs; the cosine regresses onto the score (mean squared error).
- ``mnrl_loss``: (anchor, positive[, negative]) rows; each anchor must pick its own positive out
  of every candidate in the batch (cross-entropy over scaled cosines, in-batch negatives; van den
  Oord 2018, Henderson 2017), optionally in both directions.

They are the sentence-transformers losses of the same names (``CoSENTLoss``,
``CosineSimilarityLoss``, ``MultipleNegativesRankingLoss``), written from their definitions; the
tests hold them to those classes' values and gradients.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch.nn import functional as F

LossName = Literal["cosent", "cosine", "mnrl"]
LOSSES: tuple[str, ...] = ("cosent", "cosine", "mnrl")
DEFAULT_SCALE = 20.0  # cosines x 20 (a temperature of 0.05), for CoSENT and MNRL


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, D), (M, D) -> (N, M) cosines."""
    return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T


def cosent_loss(a: torch.Tensor, b: torch.Tensor, scores: torch.Tensor, scale: float = DEFAULT_SCALE
                ) -> torch.Tensor:
    """log(1 + sum over pairs (i, j) with score_i > score_j of exp(scale * (cos_j - cos_i))).

    a, b: (B, D) the two sentences of each pair; scores: (B,) gold similarity (any scale).
    """
    cos = F.cosine_similarity(a.float(), b.float(), dim=-1) * scale  # (B,)
    gap = cos[None, :] - cos[:, None]  # gap[i, j] = cos_j - cos_i
    ranked_above = scores[:, None] > scores[None, :]  # pair i should beat pair j
    terms = gap.masked_fill(~ranked_above, float("-inf")).flatten()
    return torch.logsumexp(torch.cat([terms.new_zeros(1), terms]), dim=0)  # the 1 in log(1 + ...)


def cosine_loss(a: torch.Tensor, b: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean squared error between cos(a_i, b_i) and ``targets`` (B,): the scores in the cosine's range
    (``ctxvec finetune`` divides them by ``--max-score``)."""
    return F.mse_loss(F.cosine_similarity(a.float(), b.float(), dim=-1), targets.float())


def mnrl_loss(anchors: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor | None = None,
              scale: float = DEFAULT_SCALE, symmetric: bool = False) -> torch.Tensor:
    """Cross-entropy of each anchor over all candidates (every positive, every negative), its own
    positive the right answer; ``symmetric`` adds the same from each positive over the anchors
    and averages the two.

    anchors, positives, negatives: (B, D).
    """
    candidates = positives if negatives is None else torch.cat([positives, negatives])  # (B or 2B, D)
    logits = cosine_matrix(anchors.float(), candidates.float()) * scale  # (B, B or 2B)
    right = torch.arange(len(anchors), device=anchors.device)
    loss = F.cross_entropy(logits, right)
    if symmetric:
        backward = cosine_matrix(positives.float(), anchors.float()) * scale  # (B, B)
        loss = (loss + F.cross_entropy(backward, right)) / 2
    return loss
