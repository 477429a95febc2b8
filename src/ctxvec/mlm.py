"""Learning the embeddings by backprop: the encoder with a masked-language-model head.

The head predicts only at the chosen positions (15% of tokens), so the (V x D) output
projection costs 15% of a dense one; the encoder's last layer, too, computes everything but
attention's keys and values at those positions only. Its output matrix is the token embedding itself (tied).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ctxvec.config import EncoderConfig
from ctxvec.encoder import Encoder, init_weights
from ctxvec.runtime import packed_row_multiple


@dataclass
class MaskedLMOutput:
    loss_sum: torch.Tensor  # summed cross-entropy over the chosen positions (a scalar)
    n_predicted: int  # how many positions were chosen
    logits: torch.Tensor  # (n_predicted, V)


class MaskedLMHead(nn.Module):
    """D -> D, GELU, LayerNorm, then scores over the vocabulary with the tied embedding."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.d_model, config.d_model)
        self.norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        """hidden: (M, D); embedding: the encoder's (V, D) token table. Returns (M, V) scores."""
        x = self.norm(F.gelu(self.dense(hidden)))  # (M, D)
        return F.linear(x, embedding, self.bias)  # (M, V)


class MaskedLanguageModel(nn.Module):
    """``Encoder`` + ``MaskedLMHead``; ``forward`` returns the summed loss at chosen positions."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.encoder = Encoder(config)
        self.head = MaskedLMHead(config)
        self.head.dense.apply(init_weights)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, chosen: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> MaskedLMOutput:
        """input_ids, labels, chosen (bool), attention_mask: (B, T)."""
        real = attention_mask.bool() if attention_mask is not None else torch.ones_like(chosen)
        embedding = self.encoder.embeddings.tokens.weight  # the activations' dtype and device
        positions = round_up_positions(chosen, real, packed_row_multiple(embedding, embedding))
        # the last layer computes these positions only: (M', D), the chosen M and a few more
        hidden = self.encoder(input_ids, attention_mask, positions=positions).last_hidden_state
        logits = self.head(hidden, embedding)  # (M', V)
        predicted = chosen[positions]  # (M',) True at the chosen rows, in the same row-major order
        targets = labels[positions].masked_fill(~predicted, -100)  # the extra rows count for nothing
        loss_sum = F.cross_entropy(logits.float(), targets, ignore_index=-100, reduction="sum")
        return MaskedLMOutput(loss_sum, int(predicted.sum()), logits[predicted])


def round_up_positions(chosen: torch.Tensor, real: torch.Tensor, multiple: int) -> torch.Tensor:
    """``chosen`` (B, T) bool plus the first few unchosen real tokens, so that the count is a
    multiple of ``multiple`` where there are enough of them.

    The chosen count changes from batch to batch; in bf16 on a CPU the matrix multiplies go to
    oneDNN, which compiles and keeps a kernel per shape, so training's memory grew step after
    step. A handful of extra rows (their loss is not counted) keeps the shapes to a few buckets.
    """
    extra = -int(chosen.sum()) % multiple
    if extra == 0:
        return chosen
    spare = (real & ~chosen).flatten().nonzero().squeeze(1)[:extra]  # in row-major order
    return chosen.flatten().index_fill(0, spare, True).view_as(chosen)
