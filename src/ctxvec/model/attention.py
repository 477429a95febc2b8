"""Step 5 of the assembly line: multi-head self-attention (and the decoder's cross-attention).

Two layers, as in the Annotated Transformer and nanoGPT:
- ``attention``: a pure function, softmax(Q·Kᵀ / √d) · V, returning output *and* probabilities;
- ``MultiHeadSelfAttention``: 1) project to Q, K, V, 2) split into heads, 3) attend, 4) concat
  the heads, 5) project (and add the residual stream, when given: the Add of Add & Norm). Step
  3 is ``attention`` when the probabilities are asked for (the scores come with them, for the
  explain page), else the route's fused kernel: the same inputs, the same outputs (a test
  holds them equal).
- ``MultiHeadCrossAttention``: the same steps with queries from the decoder and keys/values from
  the encoder's context vectors.

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

from ctxvec.model.dropout import Dropout
from ctxvec.model.route import Route, default_route


@dataclass
class AttentionOutput:
    """What one attention layer returns.

    Attributes:
        output: (B, T, D), or the route's view of the tokens (or (M, D) for ``selected`` rows);
            with a ``residual``, the residual plus the (dropped-out) output.
        probabilities: (B, H, T, S) softmax over the keys, only when asked for.
        key_value: the keys and values attended to, 2 x (B, H, S, Dh): what a decoder caches
            (None where the route attended without laying them out: ``Route.self_attend``).
        scores: (B, H, T, S) Q·Kᵀ / √Dh, -inf at masked keys, with the probabilities.
    """

    output: torch.Tensor
    probabilities: torch.Tensor | None
    key_value: tuple[torch.Tensor, torch.Tensor] | None = None
    scores: torch.Tensor | None = None


def attention_scores(q: torch.Tensor, k: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Q·Kᵀ / √d_head, -inf where a query may not attend: (B, H, T, S) from q (B, H, T, Dh), k (B, H, S, Dh)."""
    scores = q @ k.transpose(-2, -1)  # Q·Kᵀ: (B, H, T, S)
    scores = scores / math.sqrt(q.shape[-1])  # ÷ √d_head keeps the softmax out of saturation
    if key_mask is not None:
        # -inf, not -1e9: exact zeros after softmax, and no overflow in half precision.
        scores = scores.masked_fill(~key_mask, float("-inf"))
    return scores


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              key_mask: torch.Tensor | None = None, dropout: nn.Module | None = None,
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled dot-product attention, step by step.

    Args:
        q, k, v: (B, H, T, Dh) (k and v may have S positions).
        key_mask: bool, broadcastable to (B, H, T, S); True where a query may attend to a key.
            Every row must allow at least one key (the encoder guarantees it).
        dropout: applied to the probabilities (identity in eval mode).

    Returns:
        ``(output (B, H, T, Dh), probabilities (B, H, T, S))``; each probability row sums to 1
        over the allowed keys and is exactly 0 on the others.
    """
    output, _, probabilities = _attention_steps(q, k, v, key_mask, dropout)
    return output, probabilities


def attention_step(route: Route, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None,
           dropout: nn.Module, return_probabilities: bool
           ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Step 3 of every attention here: ``(heads, scores, probabilities)``. Step by step when the
    probabilities are asked for (nanoGPT's manual path), else the route's fused kernel, which
    never forms them (scores and probabilities None)."""
    if return_probabilities:
        return _attention_steps(q, k, v, key_mask, dropout)
    return route.attend(q, k, v, key_mask, dropout), None, None


def _attention_steps(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None,
                     dropout: nn.Module | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``attention``, keeping the scores too: (output, scores, probabilities)."""
    scores = attention_scores(q, k, key_mask)  # (B, H, T, S)
    probabilities = scores.softmax(dim=-1)  # over keys
    weights = dropout(probabilities) if dropout is not None else probabilities
    return weights @ v, scores, probabilities  # (B, H, T, Dh), (B, H, T, S), (B, H, T, S)


class MultiHeadSelfAttention(nn.Module):
    """Q, K, V projections -> per-head attention -> concat -> output projection.

    Q, K and V come from one fused (D -> 3D) projection: one larger matrix multiply instead of
    three, the same numbers (its weight is ``[W_q; W_k; W_v]`` stacked, as in PyTorch's
    ``nn.MultiheadAttention.in_proj_weight``). ``attn_dropout`` drops attention probabilities;
    ``out_dropout`` the output, before the residual add.
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads}).")
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.attn_dropout = Dropout(dropout)
        self.out_dropout = Dropout(dropout)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None,
                return_probabilities: bool = False, route: Route | None = None,
                past_key_value: tuple[torch.Tensor, torch.Tensor] | None = None,
                selected: torch.Tensor | None = None, residual: torch.Tensor | None = None) -> AttentionOutput:
        """x: (B, T, D), or the ``route``'s view of them; key_mask: bool (B, 1, 1, T).

        ``past_key_value`` (a decoder's cache, 2 x (B, H, P, Dh)) is prepended to this call's keys
        and values, so T new tokens attend to P + T keys; key_mask is then (B, 1, T, P + T).
        ``selected`` (M,): only these rows (of ``x`` flattened to (-1, D)) go through the output
        projection, which returns (M, D). ``residual`` (shaped like the output): the stream the
        output is added to (the Add of Add & Norm). Returns an output shaped like ``x`` (or
        (M, D)), with the keys and values. ``route``: how to run (default: a module on its own,
        ``default_route``).
        """
        route = route or default_route(x, self)
        H = self.n_heads
        # 1) project: one matrix multiply gives Q, K and V
        qkv = route.linear(x, self.qkv)  # (B, T, 3D)
        if return_probabilities or past_key_value is not None:
            # 2) split into heads
            q, k, v = route.split_heads(qkv, 3 * H).chunk(3, dim=1)  # 3 x (B, H, T, Dh)
            if past_key_value is not None:
                k = torch.cat([past_key_value[0], k], dim=2)  # (B, H, P + T, Dh)
                v = torch.cat([past_key_value[1], v], dim=2)  # (B, H, P + T, Dh)
            # 3) attend, per head
            heads, scores, probabilities = attention_step(route, q, k, v, key_mask, self.attn_dropout,
                                                         return_probabilities)
            # 4) concat the heads back to D
            concat = route.merge_heads(heads)  # (B, H, T, Dh) -> (B, T, H*Dh)
            key_value: tuple[torch.Tensor, torch.Tensor] | None = (k, v)
        else:  # 2)-4) as one step of the route's: its kernel may never lay the heads out
            concat, key_value = route.self_attend(qkv, H, key_mask, self.attn_dropout)
            scores = probabilities = None
        if selected is not None:
            concat = concat.reshape(-1, concat.shape[-1]).index_select(0, selected)  # (M, D)
        # 5) mix the heads with the output projection (+ the residual stream)
        output = route.residual_linear(concat, self.out, self.out_dropout, residual)
        return AttentionOutput(output, probabilities, key_value, scores)


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
        self.out_dropout = Dropout(dropout)

    def project_memory(self, memory: torch.Tensor, route: Route | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """memory: (B, S, D) -> keys, values: 2 x (B, H, S, Dh)."""
        route = route or default_route(memory, self)
        k, v = route.split_heads(route.linear(memory, self.kv), 2 * self.n_heads).chunk(2, dim=1)
        return k, v

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None,
                key_mask: torch.Tensor | None = None, return_probabilities: bool = False,
                key_value: tuple[torch.Tensor, torch.Tensor] | None = None,
                route: Route | None = None, residual: torch.Tensor | None = None) -> AttentionOutput:
        """x: (B, T, D) queries; memory: (B, S, D), or its ``key_value`` from ``project_memory``;
        key_mask: bool (B, 1, 1, S), True = real source token; ``residual`` (B, T, D): the stream
        the output is added to. Returns (B, T, D)."""
        route = route or default_route(x, self)
        if key_value is None:
            if memory is None:
                raise ValueError("cross-attention needs the encoder's memory or its key_value.")
            key_value = self.project_memory(memory, route)
        # 1) project the queries, 2) split them into heads
        q = route.split_heads(route.linear(x, self.q), self.n_heads)  # (B, H, T, Dh)
        # 3) attend, per head, over the source tokens
        heads, scores, probabilities = attention_step(route, q, *key_value, key_mask, self.attn_dropout,
                                                     return_probabilities)
        # 4) concat the heads back to D, 5) mix them with the output projection (+ the residual)
        output = route.residual_linear(route.merge_heads(heads), self.out, self.out_dropout, residual)
        return AttentionOutput(output, probabilities, key_value, scores)
