"""Step 5 of the assembly line: multi-head self-attention (and the decoder's cross-attention).

Two layers, as in the Annotated Transformer and nanoGPT:
- ``attention``: a pure function, softmax(Q·Kᵀ / √d) · V, returning output *and* probabilities;
- ``MultiHeadSelfAttention``: project to Q, K, V, split into heads, attend, concat, project.
  It calls PyTorch's fused ``scaled_dot_product_attention`` unless the probabilities are asked
  for; both paths take the same inputs and give the same outputs (a test holds them equal).
- ``MultiHeadCrossAttention``: the same, with queries from the decoder and keys/values from the
  encoder's context vectors; both modules share ``attend`` (step 2), so there is one attention.

Letters: B batch, T sequence length (queries), S keys (the encoder's length for cross-attention,
the past plus the new tokens for cached self-attention), H heads, Dh head width, D = H * Dh.
Masks here are boolean "may attend" masks, True = real key; the encoder builds one from the
public ``attention_mask`` once and shares it with every layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ctxvec.dropout import Dropout


@dataclass
class AttentionOutput:
    """What one attention layer returns."""

    output: torch.Tensor  # (B, T, D)
    probabilities: torch.Tensor | None  # (B, H, T, S), only when asked for
    # The keys and values attended to, 2 x (B, H, S, Dh): what a decoder caches between steps.
    key_value: tuple[torch.Tensor, torch.Tensor] | None = None


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


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None,
           dropout: Dropout, return_probabilities: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Step 2 of every multi-head attention here: the eager ``attention`` when probabilities are
    asked for, PyTorch's fused kernel otherwise (same inputs, same outputs).

    Training on CPU with dropout also takes the eager path: PyTorch's CPU kernel has no dropout
    and falls back to the same eager steps, but with its slower per-element dropout mask.

    q: (B, H, T, Dh); k, v: (B, H, S, Dh); key_mask: bool broadcastable to (B, H, T, S).
    Returns ``(heads (B, H, T, Dh), probabilities (B, H, T, S) or None)``.
    """
    if return_probabilities:
        return attention(q, k, v, key_mask, dropout)
    if dropout.training and dropout.p > 0 and q.device.type == "cpu":
        return attention(q, k, v, key_mask, dropout)[0], None
    heads = F.scaled_dot_product_attention(
        q, k, v, attn_mask=key_mask, dropout_p=dropout.p if dropout.training else 0.0)
    return heads, None


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
        self.attn_dropout = Dropout(dropout)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None,
                return_probabilities: bool = False, packing: TokenPacking | None = None,
                past_key_value: tuple[torch.Tensor, torch.Tensor] | None = None,
                rows: torch.Tensor | None = None) -> AttentionOutput:
        """x: (B, T, D), or (N, D) real tokens with their ``packing``; key_mask: bool (B, 1, 1, T).

        ``past_key_value`` (a decoder's cache, 2 x (B, H, P, Dh)) is prepended to this call's keys
        and values, so T new tokens attend to P + T keys; key_mask is then (B, 1, T, P + T).
        ``rows`` (M,): indices into ``x``'s rows (flattened to (B * T, D) or (N, D)); when given,
        only those rows go through the output projection and the output is (M, D).
        Returns an output shaped like ``x`` (or (M, D)), with the keys and values attended to.
        """
        D, H = x.shape[-1], self.n_heads
        if past_key_value is not None and packing is not None:
            raise ValueError("past_key_value (decoding) and packing (encoding) cannot be combined.")
        # 1) project: one matmul for Q, K and V, then split into heads
        qkv = self.qkv(x)  # (B, T, 3D) or (N, 3D)
        if packing is not None:
            qkv = packing.unpack(qkv)  # (N, 3D) -> (B, T, 3D)
        B, T = qkv.shape[:2]
        qkv = qkv.view(B, T, 3, H, D // H)  # (B, T, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, T, Dh)
        if past_key_value is not None:
            k = torch.cat([past_key_value[0], k], dim=2)  # (B, H, P + T, Dh)
            v = torch.cat([past_key_value[1], v], dim=2)  # (B, H, P + T, Dh)
        # 2) attend, per head
        heads, probabilities = attend(q, k, v, key_mask, self.attn_dropout, return_probabilities)
        # 3) concat the heads back to D, 4) mix them with the output projection
        heads = heads.transpose(1, 2).reshape(B, T, D)  # (B, H, T, Dh) -> (B, T, H*Dh)
        if packing is not None:
            heads = packing.pack(heads)  # (B, T, D) -> (N, D)
        if rows is not None:
            heads = heads.reshape(-1, D).index_select(0, rows)  # (B * T or N, D) -> (M, D)
        return AttentionOutput(self.out(heads), probabilities, (k, v))


class MultiHeadCrossAttention(nn.Module):
    """The decoder's look at the source: queries from the decoder, keys and values from the
    encoder's context vectors (the "memory"), then heads, attend, concat, project as above.

    Q has its own (D -> D) projection; K and V share one fused (D -> 2D) projection whose weight
    is ``[W_k; W_v]``, rows D:3D of PyTorch's ``in_proj_weight``. The memory's keys and values do
    not change while a translation is decoded: ``project_memory`` computes them once.
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads}).")
        self.n_heads = n_heads
        self.q = nn.Linear(d_model, d_model)
        self.kv = nn.Linear(d_model, 2 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.attn_dropout = Dropout(dropout)

    def project_memory(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """memory: (B, S, D) -> keys, values: 2 x (B, H, S, Dh)."""
        B, S, D = memory.shape
        kv = self.kv(memory).view(B, S, 2, self.n_heads, D // self.n_heads)  # (B, S, 2, H, Dh)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # 2 x (B, H, S, Dh)
        return k, v

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None,
                key_mask: torch.Tensor | None = None, return_probabilities: bool = False,
                key_value: tuple[torch.Tensor, torch.Tensor] | None = None) -> AttentionOutput:
        """x: (B, T, D) queries; memory: (B, S, D), or its ``key_value`` from ``project_memory``;
        key_mask: bool (B, 1, 1, S), True = real source token. Returns (B, T, D)."""
        B, T, D = x.shape
        if key_value is None:
            if memory is None:
                raise ValueError("cross-attention needs the encoder's memory or its key_value.")
            key_value = self.project_memory(memory)
        # 1) project the queries and split them into heads
        q = self.q(x).view(B, T, self.n_heads, D // self.n_heads).transpose(1, 2)  # (B, H, T, Dh)
        # 2) attend, per head, over the source tokens
        heads, probabilities = attend(q, *key_value, key_mask, self.attn_dropout, return_probabilities)
        # 3) concat the heads back to D, 4) mix them with the output projection
        heads = heads.transpose(1, 2).reshape(B, T, D)  # (B, H, T, Dh) -> (B, T, H*Dh)
        return AttentionOutput(self.out(heads), probabilities, key_value)
