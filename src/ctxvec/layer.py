"""Steps 6-7 of the assembly line: Add & Norm, feed-forward, Add & Norm = one encoder layer.

Letters: B batch, T sequence length, D d_model, F d_ff.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ctxvec.attention import MultiHeadSelfAttention, TokenPacking
from ctxvec.config import EncoderConfig
from ctxvec.dropout import Dropout
from ctxvec.runtime import ACTIVATIONS, linear

class FeedForward(nn.Module):
    """Position-wise feed-forward: D -> F, activation, dropout, F -> D (512 -> 1024 -> 512)."""

    def __init__(self, d_model: int, d_ff: int, dropout: float, activation: str) -> None:
        super().__init__()
        self.up = nn.Linear(d_model, d_ff)
        self.activation_name = activation
        self.activation = ACTIVATIONS[activation]
        self.dropout = Dropout(dropout)
        self.down = nn.Linear(d_ff, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = linear(x, self.up, self.activation_name)  # activation(up(x)): (B, T, F)
        return linear(self.dropout(hidden), self.down)  # (B, T, D)


@dataclass
class LayerOutput:
    hidden_state: torch.Tensor  # shaped like the layer's input
    attention: torch.Tensor | None  # (B, H, T, T) probabilities, only when asked for


class EncoderLayer(nn.Module):
    """Self-attention and feed-forward, each wrapped in a residual connection and a LayerNorm.

    Post-norm (the seed, ``norm_first=False``)::

        x = LayerNorm(x + Dropout(Attention(x)))      # Add & Norm #1
        x = LayerNorm(x + Dropout(FeedForward(x)))    # Add & Norm #2

    Pre-norm (``norm_first=True``) normalises the sub-layer's input instead::

        x = x + Dropout(Attention(LayerNorm(x)))
        x = x + Dropout(FeedForward(LayerNorm(x)))
    """

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.norm_first = config.norm_first
        self.attention = MultiHeadSelfAttention(config.d_model, config.n_heads, config.dropout)
        self.dropout1 = Dropout(config.dropout)
        self.norm1 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.feed_forward = FeedForward(config.d_model, config.d_ff, config.dropout, config.activation)
        self.dropout2 = Dropout(config.dropout)
        self.norm2 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None,
                return_attention: bool = False, packing: TokenPacking | None = None,
                rows: torch.Tensor | None = None) -> LayerOutput:
        """x: (B, T, D), or (N, D) real tokens with their ``packing``. Returns the same shape.

        ``rows`` (M,): compute the output only at these rows of ``x`` (flattened to (B * T, D) or
        (N, D)) and return it as (M, D). Every token is still a key and value of the attention;
        only the out-projection, the residuals, the norms and the feed-forward are skipped
        elsewhere (what a masked-LM's last layer needs: its loss reads 15% of the tokens).
        """
        # the residual stream at the rows computed: all of x, or (M, D)
        residual = x if rows is None else x.reshape(-1, x.shape[-1]).index_select(0, rows)
        if self.norm_first:
            a = self.attention(self.norm1(x), key_mask, return_attention, packing, rows=rows)
            x = residual + self.dropout1(a.output)
            x = x + self.dropout2(self.feed_forward(self.norm2(x)))
        else:
            a = self.attention(x, key_mask, return_attention, packing, rows=rows)
            x = self.norm1(residual + self.dropout1(a.output))
            x = self.norm2(x + self.dropout2(self.feed_forward(x)))
        return LayerOutput(x, a.probabilities)
