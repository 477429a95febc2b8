"""Steps 6-7 of the assembly line: Add & Norm, feed-forward, Add & Norm = one encoder layer.

Add & Norm is one rule for every layer here (the decoder's too), in the model's norm placement.
Add: each sub-layer adds its output, after its dropout, to the stream it is given
(``residual``), in its last projection (``Route.residual_linear``: the projection and the add
run as one kernel where the route supports it). Norm: ``pre_norm`` normalises a sub-layer's
input (pre-norm only), ``post_norm`` the sum (post-norm only, the seed's choice), each by the
route's ``norm`` (a faster route may run its own LayerNorm kernel).

Letters: B batch, T sequence length, D d_model, F d_ff, M selected positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ctxvec.model.attention import MultiHeadSelfAttention
from ctxvec.model.config import EncoderConfig
from ctxvec.model.dropout import Dropout
from ctxvec.model.route import Route, default_route


def pre_norm(x: torch.Tensor, norm: nn.LayerNorm, norm_first: bool, route: Route) -> torch.Tensor:
    """A sub-layer's input: ``LayerNorm(x)`` in pre-norm, ``x`` itself in post-norm."""
    return route.norm(x, norm) if norm_first else x


def post_norm(x: torch.Tensor, norm: nn.LayerNorm, norm_first: bool, route: Route) -> torch.Tensor:
    """The Norm of Add & Norm: ``LayerNorm`` of the residual sum in post-norm, the sum itself in pre-norm."""
    return x if norm_first else route.norm(x, norm, overwrite=True)  # the sum is not read again


class FeedForward(nn.Module):
    """Position-wise feed-forward: D -> F, activation, dropout, F -> D (512 -> 1024 -> 512),
    then the output's dropout (before the residual add, as every sub-layer's)."""

    def __init__(self, d_model: int, d_ff: int, dropout: float, activation: str) -> None:
        super().__init__()
        self.up = nn.Linear(d_model, d_ff)
        self.activation = activation  # "relu" or "gelu" (model.route.ACTIVATIONS)
        self.dropout = Dropout(dropout)
        self.down = nn.Linear(d_ff, d_model)
        self.out_dropout = Dropout(dropout)

    def forward(self, x: torch.Tensor, route: Route | None = None,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, T, D) or a route's view of them. ``residual`` (x's shape): the stream the output
        is added to (the Add of Add & Norm); None: the output alone."""
        route = route or default_route(x, self)
        hidden = route.linear(x, self.up, self.activation)  # activation(up(x)): (B, T, F)
        # residual + out_dropout(down(dropout(hidden))): (B, T, D)
        return route.residual_linear(self.dropout(hidden), self.down, self.out_dropout, residual)


@dataclass
class LayerOutput:
    hidden_state: torch.Tensor  # shaped like the layer's input (or (M, D) with ``selected``)
    attention: torch.Tensor | None  # (B, H, T, T) probabilities, only when asked for


class EncoderLayer(nn.Module):
    """Self-attention and feed-forward, each wrapped in a residual connection and a LayerNorm.

    Post-norm (the seed, ``norm_first=False``)::

        x = LayerNorm(x + Dropout(Attention(x)))      # Add & Norm #1
        x = LayerNorm(x + Dropout(FeedForward(x)))    # Add & Norm #2

    Pre-norm (``norm_first=True``) normalises the sub-layer's input instead::

        x = x + Dropout(Attention(LayerNorm(x)))
        x = x + Dropout(FeedForward(LayerNorm(x)))

    Each sub-layer applies its output's Dropout and adds x itself (``residual=``).
    """

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.norm_first = config.norm_first
        self.attention = MultiHeadSelfAttention(config.d_model, config.n_heads, config.dropout)
        self.norm1 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.feed_forward = FeedForward(config.d_model, config.d_ff, config.dropout, config.activation)
        self.norm2 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None, return_attention: bool = False,
                route: Route | None = None, selected: torch.Tensor | None = None) -> LayerOutput:
        """x: (B, T, D) (or a route's view of them); key_mask: bool (B, 1, 1, T). Returns x's shape.

        ``selected`` (M,): compute the output only at these rows of ``x`` (flattened to (-1, D))
        and return it as (M, D). Every token is still a key and value of the attention; only the
        out-projection, the residuals, the norms and the feed-forward are skipped elsewhere
        (what a masked-LM's last layer needs: its loss reads 15% of the tokens).
        ``route``: how to run (default: a module on its own, ``default_route``).
        """
        route = route or default_route(x, self)
        # the residual stream at the rows computed: all of x, or (M, D)
        residual = x if selected is None else x.reshape(-1, x.shape[-1]).index_select(0, selected)
        a = self.attention(pre_norm(x, self.norm1, self.norm_first, route), key_mask, return_attention, route,
                           selected=selected, residual=residual)  # residual + Dropout(Attention(.))
        x = post_norm(a.output, self.norm1, self.norm_first, route)  # Add & Norm #1
        ffn = self.feed_forward(pre_norm(x, self.norm2, self.norm_first, route), route, residual=x)
        x = post_norm(ffn, self.norm2, self.norm_first, route)  # Add & Norm #2
        return LayerOutput(x, a.probabilities)
