"""After the encoder: token vectors -> one sentence vector (masked pooling, L2 normalisation)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

PoolingMode = Literal["mean", "cls", "max"]
POOLING_MODES: tuple[str, ...] = ("mean", "cls", "max")


class Pooling(nn.Module):
    """Pool a (B, T, D) batch into (B, D), counting only real tokens.

    Args:
        mode: "mean" (the average of the real tokens' vectors, as sentence-transformers'
            MiniLM does), "cls" (the first token's vector) or "max" (per dimension).
        normalize: scale each sentence vector to unit L2 norm (so a dot product is a cosine).

    A text without a real token pools to 0 in every mode (never NaN).
    """

    def __init__(self, mode: PoolingMode = "mean", normalize: bool = False) -> None:
        super().__init__()
        if mode not in POOLING_MODES:
            raise ValueError(f"pooling mode must be one of {POOLING_MODES}, got {mode!r}.")
        self.mode = mode
        self.normalize = normalize

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """hidden: (B, T, D); attention_mask: (B, T), 1/True = real token. Returns (B, D)."""
        real = attention_mask.bool()
        return self.pool_rows(hidden[real], real.sum(1))  # (N, D): the real tokens, text after text

    def pool_rows(self, rows: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """rows: (N, D), the real tokens' vectors, text after text (as ``Route.real_rows`` gives
        them); lengths: (B,) each text's tokens, summing to N. Returns (B, D)."""
        B, D = len(lengths), rows.shape[-1]
        text = torch.repeat_interleave(torch.arange(B, device=rows.device), lengths)  # (N,) each row's text
        if self.mode == "mean":
            # each text's sum, over its own rows in order, and its count; an empty text stays 0
            sums = rows.new_zeros(B, D).index_add(0, text, rows)  # (B, D)
            pooled = sums / lengths.clamp(min=1).to(rows.dtype)[:, None]
        else:
            if self.mode == "cls":
                first = (torch.cumsum(lengths, 0) - lengths).clamp(max=max(len(rows) - 1, 0))  # (B,) first rows
                pooled = rows[first] if len(rows) else rows.new_zeros(B, D)
            else:
                pooled = rows.new_full((B, D), float("-inf")).scatter_reduce(0, text[:, None].expand(-1, D),
                                                                             rows, "amax")
            pooled = torch.where((lengths > 0)[:, None], pooled, 0.0)  # (B, D): an empty text is 0
        return F.normalize(pooled, p=2, dim=-1) if self.normalize else pooled

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, normalize={self.normalize}"
