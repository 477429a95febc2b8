"""Step 5 of the assembly line: multi-head self-attention.

Two layers, as in the Annotated Transformer and nanoGPT:
- ``attention``: a pure function, softmax(Q·Kᵀ / √d) · V, returning output *and* probabilities;
- ``MultiHeadSelfAttention``: project to Q, K, V, split into heads, attend, concat, project.
  It calls PyTorch's fused ``scaled_dot_product_attention`` unless the probabilities are asked
  for; both paths take the same inputs and give the same outputs (a test holds them equal).

Letters: B batch, T sequence length, H heads, Dh head width, D = H * Dh.
Masks here are boolean "may attend" masks, True = real key; the encoder builds one from the
public ``attention_mask`` once and shares it with every layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass
class AttentionOutput:
    """What one attention layer returns."""

    output: torch.Tensor  # (B, T, D)
    probabilities: torch.Tensor | None  # (B, H, T, T), only when asked for


@dataclass
class TokenPacking:
    """Where the real tokens of a padded (B, T) batch are, to pack them as (N, C) rows.

    Everything in a layer but attention works token by token (projections, feed-forward,
    LayerNorm, residuals), so it can skip padding altogether: the encoder packs the real tokens
    once, and attention unpacks them to (B, T, C) only around softmax(Q·Kᵀ)·V.
    """

    index: torch.Tensor  # (N,) positions of the real tokens in the flattened (B * T) batch
    batch_size: int
    seq_len: int

    @classmethod
    def from_mask(cls, real: torch.Tensor) -> TokenPacking:
        """real: (B, T) bool, True = real token."""
        return cls(real.flatten().nonzero().squeeze(1), real.shape[0], real.shape[1])

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, x.shape[-1]).index_select(0, self.index)  # (B, T, C) -> (N, C)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.new_zeros(self.batch_size * self.seq_len, x.shape[-1]).index_copy(0, self.index, x)
        return flat.view(self.batch_size, self.seq_len, x.shape[-1])  # (N, C) -> (B, T, C), 0 at padding


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              key_mask: torch.Tensor | None = None, dropout: nn.Module | None = None,
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled dot-product attention, step by step.

    Args:
        q, k, v: (B, H, T, Dh).
        key_mask: bool, broadcastable to (B, H, T, T); True where a query may attend to a key.
            Every row must allow at least one key (the encoder guarantees it).
        dropout: applied to the probabilities (identity in eval mode).

    Returns:
        ``(output (B, H, T, Dh), probabilities (B, H, T, T))``; each probability row sums to 1
        over the allowed keys and is exactly 0 on the others.
    """
    scores = q @ k.transpose(-2, -1)  # Q·Kᵀ: (B, H, T, T)
    scores = scores / math.sqrt(q.shape[-1])  # ÷ √d_head keeps the softmax out of saturation
    if key_mask is not None:
        # -inf, not -1e9: exact zeros after softmax, and no overflow in half precision.
        scores = scores.masked_fill(~key_mask, float("-inf"))
    probabilities = scores.softmax(dim=-1)  # over keys
    weights = dropout(probabilities) if dropout is not None else probabilities
    return weights @ v, probabilities  # (B, H, T, Dh), (B, H, T, T)


class MultiHeadSelfAttention(nn.Module):
    """Q, K, V projections -> per-head attention -> concat -> output projection.

    Q, K and V come from one fused (D -> 3D) projection: one larger matrix multiply instead of
    three, the same numbers (its weight is ``[W_q; W_k; W_v]`` stacked, as in PyTorch's
    ``nn.MultiheadAttention.in_proj_weight``).
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads}).")
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.dropout_p = dropout
        self.attn_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None,
                return_probabilities: bool = False, packing: TokenPacking | None = None) -> AttentionOutput:
        """x: (B, T, D), or (N, D) real tokens with their ``packing``; key_mask: bool (B, 1, 1, T).

        Returns an output shaped like ``x``.
        """
        D, H = x.shape[-1], self.n_heads
        # 1) project: one matmul for Q, K and V, then split into heads
        qkv = self.qkv(x)  # (B, T, 3D) or (N, 3D)
        if packing is not None:
            qkv = packing.unpack(qkv)  # (N, 3D) -> (B, T, 3D)
        B, T = qkv.shape[:2]
        qkv = qkv.view(B, T, 3, H, D // H)  # (B, T, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, T, Dh)
        # 2) attend, per head
        if return_probabilities:
            heads, probabilities = attention(q, k, v, key_mask, self.attn_dropout)
        else:
            heads = F.scaled_dot_product_attention(
                q, k, v, attn_mask=key_mask, dropout_p=self.dropout_p if self.training else 0.0)
            probabilities = None
        # 3) concat the heads back to D, 4) mix them with the output projection
        heads = heads.transpose(1, 2).reshape(B, T, D)  # (B, H, T, Dh) -> (B, T, H*Dh)
        if packing is not None:
            heads = packing.pack(heads)  # (B, T, D) -> (N, D)
        return AttentionOutput(self.out(heads), probabilities)
