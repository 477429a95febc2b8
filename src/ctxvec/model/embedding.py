"""Steps 2-4 of the assembly line: one-hot -> embedding -> + positions.

Letters in shape comments: B batch, T sequence length, V vocabulary, D d_model.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ctxvec.model.config import EncoderConfig
from ctxvec.model.dropout import Dropout
from ctxvec.model.route import Route


def one_hot(input_ids: torch.Tensor, vocab_size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The seed's step 2: each token id as a vector with a single 1.

    ``one_hot(ids, V) @ E`` equals the embedding lookup ``E[ids]``, which is why no real model
    builds these (B, T, V) tensors: the lookup is the same product without the zeros.

    Example:
        >>> one_hot(torch.tensor([[2, 0]]), 4)
        tensor([[[0., 0., 1., 0.],
                 [1., 0., 0., 0.]]])
    """
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}.")
    if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= vocab_size):
        raise ValueError(f"token ids must lie in [0, {vocab_size}), got values in "
                         f"[{int(input_ids.min())}, {int(input_ids.max())}].")
    return nn.functional.one_hot(input_ids.long(), vocab_size).to(dtype)  # (B, T, V)


def init_normal_(weight: torch.Tensor, std: float) -> None:
    """Draw ``weight`` from N(0, std²), in place. A skeleton on the "meta" device (shapes only,
    as loading checks a file against its config) has no values to draw: PyTorch would route
    the draw through its reference implementations and import its compiler (~1 s)."""
    if not weight.is_meta:
        nn.init.normal_(weight, std=std)


class TokenEmbedding(nn.Module):
    """Step 3: a learned (V, D) table; row ``i`` is token ``i``'s vector, learned by backprop."""

    def __init__(self, vocab_size: int, d_model: int, scale: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, d_model))
        # Vaswani et al. 3.4: multiply by sqrt(d_model) so the embedding (initialised with
        # std d_model**-0.5) and the unit-amplitude sinusoids are on the same scale.
        self.scale = math.sqrt(d_model) if scale else 1.0
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Scaled embeddings start at std d**-0.5 so that the product has unit scale.
        init_normal_(self.weight, std=self.weight.shape[1] ** -0.5 if self.scale != 1.0 else 0.02)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = nn.functional.embedding(input_ids, self.weight)  # (B, T, D), the same as one_hot @ weight
        return x * self.scale if self.scale != 1.0 else x


def sinusoid_table(n_positions: int, d_model: int) -> torch.Tensor:
    """PE[pos, 2i] = sin(pos / 10000^(2i/d)), PE[pos, 2i+1] = cos(pos / 10000^(2i/d)).

    Returns a (n_positions, d_model) float32 table; computed in float64 for accuracy.
    """
    position = torch.arange(n_positions, dtype=torch.float64)[:, None]  # (P, 1)
    two_i = torch.arange(0, d_model, 2, dtype=torch.float64)  # (ceil(D/2),)
    angle = position / torch.pow(10000.0, two_i / d_model)  # (P, ceil(D/2))
    table = torch.zeros(n_positions, d_model, dtype=torch.float64)
    table[:, 0::2] = torch.sin(angle)
    table[:, 1::2] = torch.cos(angle[:, : d_model // 2])
    return table.float()


class SinusoidalPositionalEncoding(nn.Module):
    """Step 4 (seed): a fixed sin/cos table, a buffer (not a parameter), one row per position."""

    def __init__(self, max_len: int, d_model: int) -> None:
        super().__init__()
        # Not saved with the weights: it is a formula, rebuilt on construction.
        self.register_buffer("table", sinusoid_table(max_len, d_model), persistent=False)

    def forward(self, seq_len: int, start: int = 0) -> torch.Tensor:
        """Rows ``start .. start + seq_len - 1``: a decoder's cached step starts past 0."""
        return self.table[start:start + seq_len]  # (T, D)


class LearnedPositionalEncoding(nn.Module):
    """Step 4 (BERT family): a learned (max_len, D) table of position vectors."""

    def __init__(self, max_len: int, d_model: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(max_len, d_model))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_normal_(self.weight, std=0.02)

    def forward(self, seq_len: int, start: int = 0) -> torch.Tensor:
        return self.weight[start:start + seq_len]  # (T, D)


class Embeddings(nn.Module):
    """Token embedding + position encoding (+ segment embedding and LayerNorm for BERT), dropout."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.tokens = TokenEmbedding(config.vocab_size, config.d_model, config.scale_embeddings)
        if config.position == "sinusoidal":
            self.positions: nn.Module = SinusoidalPositionalEncoding(config.max_len, config.d_model)
        else:
            self.positions = LearnedPositionalEncoding(config.max_len, config.d_model)
        # BERT's segment embedding: a learned table like the tokens', one row per segment
        self.token_types = (TokenEmbedding(config.type_vocab_size, config.d_model, scale=False)
                            if config.type_vocab_size else None)
        self.norm = (nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
                     if config.embedding_norm else None)
        self.dropout = Dropout(config.dropout)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                start: int = 0, route: Route | None = None) -> torch.Tensor:
        """input_ids: (B, T) at positions ``start .. start + T - 1`` (0 but for cached decoding).
        ``route``: the forward pass's, whose ``norm`` runs the LayerNorm (default: the module's own)."""
        x = self.tokens(input_ids) + self.positions(input_ids.shape[1], start)  # (B, T, D) + (T, D)
        if self.token_types is not None:
            if token_type_ids is None:
                x = x + self.token_types.weight[0]  # one segment: every token has type 0
            else:
                x = x + self.token_types(token_type_ids)
        if self.norm is not None:
            x = self.norm(x) if route is None else route.norm(x, self.norm, overwrite=True)  # x: a new sum
        return self.dropout(x)
