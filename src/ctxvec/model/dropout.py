"""Dropout, the regulariser inside every step of the assembly line (embeddings, attention
probabilities, after each sub-layer, inside the feed-forward), with a cheaper mask on CPU.

Why not just ``nn.Dropout``: on CPU, PyTorch draws one Bernoulli sample per element from its
Mersenne-Twister generator, one element at a time (about 12 ns each here); in masked-LM
training at the seed's dimensions that alone was 13% of a step (``torch.profiler``,
``aten::bernoulli_``). ``Dropout`` draws 64 random bits per *four* elements instead, from the
same generator (``random_`` on int64, full range), and compares each 16-bit lane with a
threshold: a quarter of the generator calls and no float conversion.

The one difference from ``nn.Dropout``: the drop probability is rounded to a multiple of
2⁻¹⁶ (p = 0.1 drops with probability 6554 / 65536 = 0.1000061) and the kept values are scaled
by 1 / (1 - that probability), so the output's expectation is still exactly the input.
Everything else is the same: identity in eval mode or with p = 0, the torch generator's state
decides the mask (``torch.manual_seed`` reproduces it, checkpoints resume it), and on any other
device (CUDA's dropout is already a fused kernel) it calls ``F.dropout``.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

LANE_BITS = 16  # one 64-bit draw -> four lanes of 16 bits


def drop_probability(p: float) -> float:
    """The probability ``keep_mask`` really drops with: p rounded to a multiple of 2⁻¹⁶."""
    return round(p * 2**LANE_BITS) / 2**LANE_BITS


def keep_mask(shape: torch.Size | tuple[int, ...], p: float, device: torch.device | str = "cpu",
              generator: torch.Generator | None = None) -> torch.Tensor:
    """A bool tensor of ``shape``, each element True (kept) with probability 1 - drop_probability(p)."""
    n = math.prod(shape)
    lanes_per_word = 64 // LANE_BITS
    words = torch.empty((n + lanes_per_word - 1) // lanes_per_word, dtype=torch.int64, device=device)
    words.random_(-2**63, None, generator=generator)  # full 64-bit range: every bit uniform
    lanes = words.view(torch.int16)[:n].view(shape)  # four signed 16-bit lanes per draw
    threshold = round(p * 2**LANE_BITS) - 2**(LANE_BITS - 1)  # P(lane < threshold) = drop_probability(p)
    return lanes >= threshold


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``F.dropout`` with the CPU mask above: zero elements with probability ~p, scale the rest."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, training=True)
    dropped = drop_probability(p)
    if dropped >= 1.0:
        return x * 0.0
    scale = 1.0 / (1.0 - dropped)
    # one float mask (0 or 1/(1-p)): the forward is one multiply and so is the backward
    return x * (keep_mask(x.shape, p, x.device) * scale).to(x.dtype)


class Dropout(nn.Dropout):
    """``nn.Dropout`` (same ``p``, same behaviour in eval mode) with the faster CPU mask."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__(p)  # never in place

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)
