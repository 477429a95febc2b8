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
    """

    def __init__(self, mode: PoolingMode = "mean", normalize: bool = False) -> None:
        super().__init__()
        if mode not in POOLING_MODES:
            raise ValueError(f"pooling mode must be one of {POOLING_MODES}, got {mode!r}.")
        self.mode = mode
        self.normalize = normalize

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        real = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
        if self.mode == "mean":
            # padding is excluded from the sum *and* the count; an empty row stays 0, not NaN
            pooled = (hidden * real).sum(1) / real.sum(1).clamp(min=1e-9)  # (B, D)
        elif self.mode == "cls":
            pooled = hidden[:, 0]
        else:
            pooled = hidden.masked_fill(real == 0, torch.finfo(hidden.dtype).min).amax(1)
        return F.normalize(pooled, p=2, dim=-1) if self.normalize else pooled

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, normalize={self.normalize}"
