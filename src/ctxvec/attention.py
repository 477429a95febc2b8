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
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from ctxvec.dropout import Dropout
from ctxvec.runtime import linear


@dataclass
class AttentionOutput:
    """What one attention layer returns."""

    output: torch.Tensor  # (B, T, D)
    probabilities: torch.Tensor | None  # (B, H, T, S), only when asked for
    # The keys and values attended to, 2 x (B, H, S, Dh): what a decoder caches between steps.
    key_value: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass
class TokenPacking:
    """Where the real tokens of a padded (B, T) batch are, to pack them as (M, C) rows.

    Everything in a layer but attention works token by token (projections, feed-forward,
    LayerNorm, residuals), so it can skip padding altogether: the encoder packs the N real
    tokens once, and attention unpacks them to (B, T, C) only around softmax(Q·Kᵀ)·V.

    Rows N..M-1 (M = N rounded up to ``row_multiple``) are spare copies of real tokens that
    nothing reads: they keep the matrix shapes to a few buckets (see ``runtime.linear``).
    """

    index: torch.Tensor  # (N,) positions of the real tokens in the flattened (B * T) batch
    batch_size: int
    seq_len: int
    rows: torch.Tensor  # (M,) the position each packed row is read from: index, then spares
    sources: torch.Tensor  # (B * T,) the packed row each position is read from (padding: row 0)
    # (kind, G) -> flat gather index of unpack_heads / pack_heads, made once per batch
    _head_index: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict, repr=False)

    @classmethod
    def from_mask(cls, real: torch.Tensor, row_multiple: int = 1) -> TokenPacking:
        """real: (B, T) bool, True = real token; the packed rows are a multiple of ``row_multiple``."""
        flat = real.flatten()
        index = flat.nonzero().squeeze(1)  # (N,)
        n = len(index)
        m = -(-n // row_multiple) * row_multiple
        rows = index if m == n else index[torch.arange(m, device=index.device) % n]
        sources = torch.zeros_like(flat, dtype=torch.long).index_copy_(
            0, index, torch.arange(n, device=index.device))
        return cls(index, real.shape[0], real.shape[1], rows, sources)

    @property
    def n_tokens(self) -> int:
        """N, the real tokens (the first N packed rows)."""
        return len(self.index)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, x.shape[-1]).index_select(0, self.rows)  # (B, T, C) -> (M, C)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.new_zeros(self.batch_size * self.seq_len, x.shape[-1])
        flat.index_copy_(0, self.index, x[: self.n_tokens])
        return flat.view(self.batch_size, self.seq_len, x.shape[-1])  # (M, C) -> (B, T, C), 0 at padding

    def unpack_heads(self, x: torch.Tensor, n_heads: int) -> torch.Tensor:
        """(M, G * Dh) packed rows of G head slices -> (G, B * T, Dh), heads first, by one gather.

        Each head's (B * T, Dh) slab comes out contiguous, so attention's batched matrix
        multiplies need no further copy. Padding positions hold a copy of a real token: finite,
        and never attended to (the key mask gives them probability exactly 0).
        """
        BT, Dh = self.batch_size * self.seq_len, x.shape[1] // n_heads
        if self.n_tokens == 0:
            return x.new_zeros(n_heads, BT, Dh)
        index = self._head_index.get(("unpack", n_heads))
        if index is None:  # slice g of position p is row sources[p] * G + g of x as (M * G, Dh)
            heads = torch.arange(n_heads, device=x.device)[:, None]  # (G, 1)
            index = self._head_index[("unpack", n_heads)] = (self.sources * n_heads + heads).flatten()
        slices = x.reshape(-1, Dh)  # (M, G * Dh) -> (M * G, Dh), a view
        return slices.index_select(0, index).view(n_heads, BT, Dh)  # (G, B * T, Dh)

    def pack_heads(self, heads: torch.Tensor) -> torch.Tensor:
        """(B, H, T, Dh) attention output -> (M, H * Dh) packed rows, the heads concatenated.

        One gather when the heads are head-major in memory, as ``batched_attention`` leaves them
        (otherwise a copy to that layout first).
        """
        B, H, T, Dh = heads.shape
        index = self._head_index.get(("pack", H))
        if index is None:  # head h of packed row r is row h * B * T + rows[r] of (H * B * T, Dh)
            offsets = torch.arange(H, device=heads.device) * (B * T)  # (H,)
            index = self._head_index[("pack", H)] = (self.rows[:, None] + offsets).flatten()
        slabs = heads.transpose(0, 1).reshape(H * B * T, Dh)  # (B, H, T, Dh) -> (H * B * T, Dh)
        return slabs.index_select(0, index).view(-1, H * Dh)  # (M * H, Dh) -> (M, H * Dh)


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


# From this many scores per head (T * S) on, PyTorch's fused CPU kernel is the faster one; below,
# ``batched_attention`` is (benchmarks/bench_attention.py, 2-core AVX-512 CPU, batches of ~1k
# tokens: in fp32 1.5-3x faster at T = S = 16..128, even at 256, slower from 384 on; in bf16
# 1.4-3x faster up to 512, the longest measured). Other dtypes: always the fused kernel.
FUSED_CPU_MIN_SCORES = {torch.float32: 256 * 256 + 1, torch.bfloat16: 512 * 512 + 1}


def batched_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      key_mask: torch.Tensor | None, dropout: Dropout | None = None) -> torch.Tensor:
    """softmax(Q·Kᵀ / √d + mask) · V as two batched matrix multiplies around one softmax.

    The same numbers as ``attention`` (within rounding) without the probabilities: the scaling
    and the mask (a bias of 0 or -inf) are one broadcast pass, and they and the softmax run in
    fp32 whatever the input's precision. In bf16 the scores come out of their matrix multiply
    rounded to bf16, as in eager bf16 attention; the fused kernel keeps them in fp32 and errs
    about 1.5x less (a test bounds it).
    For short sequences on a CPU this beats the fused kernel, whose blocking is made for long
    ones; inputs laid out head-major, as ``TokenPacking.unpack_heads`` leaves them, are not copied.

    q: (B, H, T, Dh); k, v: (B, H, S, Dh); key_mask: bool broadcastable to (B, H, T, S), every
    row allowing at least one key. Returns (B, H, T, Dh).
    """
    B, H, T, Dh = q.shape
    S = k.shape[2]
    # heads first: (B, H, T, Dh) -> (H, B, T, Dh) -> (H * B, T, Dh), a view when head-major
    q3, k3, v3 = (t.transpose(0, 1).reshape(H * B, t.shape[2], Dh) for t in (q, k, v))
    scores = torch.bmm(q3, k3.transpose(1, 2)).view(H, B, T, S)  # Q·Kᵀ: (H, B, T, S)
    scale = 1 / math.sqrt(Dh)
    if key_mask is None:
        scores = scores.to(torch.float32).mul_(scale)
    else:
        bias = torch.zeros(key_mask.shape, dtype=torch.float32, device=q.device)
        bias = bias.masked_fill_(~key_mask, float("-inf")).expand(B, H, T, S).transpose(0, 1)
        scores = torch.add(bias, scores, alpha=scale)  # ÷ √d + mask, in fp32: (H, B, T, S)
    weights = scores.softmax(dim=-1).to(v.dtype)
    if dropout is not None:
        weights = dropout(weights)
    heads = torch.bmm(weights.view(H * B, T, S), v3)  # (H * B, T, Dh)
    return heads.view(H, B, T, Dh).transpose(0, 1)  # (B, H, T, Dh), head-major in memory


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None,
           dropout: Dropout, return_probabilities: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Step 2 of every multi-head attention here, by one of three routes with the same inputs
    and the same outputs (a test holds them equal):

    - the eager ``attention`` when the probabilities are asked for;
    - ``batched_attention`` on a CPU for short sequences (T * S below ``FUSED_CPU_MIN_SCORES``),
      and in CPU training with dropout (PyTorch's CPU kernel has no dropout and falls back to
      eager steps with its slower per-element mask);
    - PyTorch's fused ``scaled_dot_product_attention`` otherwise (GPUs, long sequences).

    q: (B, H, T, Dh); k, v: (B, H, S, Dh); key_mask: bool broadcastable to (B, H, T, S).
    Returns ``(heads (B, H, T, Dh), probabilities (B, H, T, S) or None)``.
    """
    if return_probabilities:
        return attention(q, k, v, key_mask, dropout)
    if q.device.type == "cpu":
        with_dropout = dropout.training and dropout.p > 0
        if with_dropout or q.shape[2] * k.shape[2] < FUSED_CPU_MIN_SCORES.get(q.dtype, 0):
            return batched_attention(q, k, v, key_mask, dropout if with_dropout else None), None
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
        qkv = linear(x, self.qkv)  # (B, T, 3D) or (M, 3D)
        if packing is not None:
            B, T = packing.batch_size, packing.seq_len
            qkv = packing.unpack_heads(qkv, 3 * H)  # (N, 3D) -> (3H, B * T, Dh), heads first
        else:
            B, T = qkv.shape[:2]
            qkv = qkv.view(B * T, 3 * H, D // H).transpose(0, 1)  # (3H, B * T, Dh), a view
        # 3 x (B, H, T, Dh); head-major in memory when packed (no copy for batched_attention)
        q, k, v = qkv.reshape(3, H, B, T, D // H).transpose(1, 2).unbind(0)
        if past_key_value is not None:
            k = torch.cat([past_key_value[0], k], dim=2)  # (B, H, P + T, Dh)
            v = torch.cat([past_key_value[1], v], dim=2)  # (B, H, P + T, Dh)
        # 2) attend, per head
        heads, probabilities = attend(q, k, v, key_mask, self.attn_dropout, return_probabilities)
        # 3) concat the heads back to D, 4) mix them with the output projection
        if packing is not None:
            heads = packing.pack_heads(heads)  # (B, H, T, Dh) -> (M, H*Dh)
        else:
            heads = heads.transpose(1, 2).reshape(B, T, D)  # (B, H, T, Dh) -> (B, T, H*Dh)
        if rows is not None:
            heads = heads.reshape(-1, D).index_select(0, rows)  # (B * T or N, D) -> (M, D)
        return AttentionOutput(linear(heads, self.out), probabilities, (k, v))


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
