"""The translator: ``Encoder`` -> context vectors -> ``Decoder`` -> next-token logits.

The seed's big picture ends with "Encoder -> context vectors -> Decoder -> Translation": this is
that model (Vaswani et al., 2017), with one or two vocabularies and tied embeddings, and its
teacher-forced loss.

Letters: B batch, S source length, T target length, D d_model, V target vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ctxvec.model.config import Seq2SeqConfig
from ctxvec.model.decoder import Decoder
from ctxvec.model.encoder import Encoder
from ctxvec.model.masks import check_attention_mask


@dataclass
class Seq2SeqOutput:
    """What the translator returns.

    Attributes:
        logits: (B, T, V) next-token scores at every target position.
        encoder_last_hidden_state: (B, S, D) the source's context vectors (0 at padding).
        decoder_last_hidden_state: (B, T, D).
        self_attentions, cross_attentions: with ``output_attentions``, per decoder layer.
    """

    logits: torch.Tensor
    encoder_last_hidden_state: torch.Tensor
    decoder_last_hidden_state: torch.Tensor
    self_attentions: tuple[torch.Tensor, ...] | None = None
    cross_attentions: tuple[torch.Tensor, ...] | None = None


def sequence_loss(logits: torch.Tensor, labels: torch.Tensor, label_mask: torch.Tensor | None = None,
                  label_smoothing: float = 0.0, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy over the real labels, their mean (or ``reduction="sum"``).

    logits: (B, T, V); labels, label_mask: (B, T), label_mask 1/True = a label to predict.
    """
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree.")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}.")
    real = check_attention_mask(label_mask, tuple(labels.shape), labels.device)
    if reduction == "mean" and not bool(real.any()):  # (a sum of nothing is 0; a mean of it is not)
        raise ValueError("label_mask has no real token: there is nothing to predict.")
    labels = labels.masked_fill(~real, -100)  # -100: ignored by cross_entropy
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten().long(), ignore_index=-100,
                           label_smoothing=label_smoothing, reduction=reduction)


class Translator(nn.Module):
    """Encoder + decoder + output projection: source ids -> next target-token logits.

    Example:
        >>> from ctxvec import EncoderConfig
        >>> config = Seq2SeqConfig(EncoderConfig(vocab_size=100, d_model=32, n_heads=4, d_ff=64, n_layers=2))
        >>> model = Translator(config).eval()
        >>> src, tgt = torch.tensor([[5, 6, 7, 2]]), torch.tensor([[1, 8, 9]])
        >>> model(src, None, tgt).logits.shape
        torch.Size([1, 3, 100])
    """

    def __init__(self, config: Seq2SeqConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config.encoder)
        self.decoder = Decoder(config.decoder)
        self.output = nn.Linear(config.encoder.d_model, config.target_vocab_size, bias=False)
        # Weight matrices start Xavier-uniform, as in nn.Transformer and the Annotated
        # Transformer: BERT's N(0, 0.02) (``init_weights``) keeps a small translator's attention
        # near-uniform for hundreds of steps (d_model=32 copy task, 300 steps: 30% of sentences
        # right instead of 86%). Token tables keep their own initialisation.
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
        if config.share_embeddings:
            self.decoder.embeddings.tokens = self.encoder.embeddings.tokens
        if config.tie_embeddings:
            self.output.weight = self.decoder.embeddings.tokens.weight  # (V, D), one parameter

    def encode(self, src_ids: torch.Tensor, src_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, S) source ids -> (B, S, D) context vectors, the decoder's memory."""
        return self.encoder(src_ids, src_mask).last_hidden_state

    def forward(self, src_ids: torch.Tensor, src_mask: torch.Tensor | None, tgt_ids: torch.Tensor,
                tgt_mask: torch.Tensor | None = None, output_attentions: bool = False) -> Seq2SeqOutput:
        """src_ids, src_mask: (B, S); tgt_ids, tgt_mask: (B, T), the decoder's input (BOS first).

        ``logits[:, t]`` predicts target token t + 1 from tokens 0 .. t (teacher forcing).
        """
        if isinstance(src_ids, torch.Tensor) and isinstance(tgt_ids, torch.Tensor) \
                and src_ids.shape[:1] != tgt_ids.shape[:1]:
            raise ValueError(f"src_ids has batch {src_ids.shape[0]} but tgt_ids has {tgt_ids.shape[0]}.")
        memory = self.encode(src_ids, src_mask)
        out = self.decoder(tgt_ids, tgt_mask, memory, src_mask, output_attentions=output_attentions)
        return Seq2SeqOutput(self.output(out.last_hidden_state), memory, out.last_hidden_state,
                             out.self_attentions, out.cross_attentions)

    def loss(self, src_ids: torch.Tensor, src_mask: torch.Tensor | None, tgt_ids: torch.Tensor,
             tgt_mask: torch.Tensor | None = None, label_smoothing: float = 0.1) -> torch.Tensor:
        """Teacher-forced cross-entropy with label smoothing (0.1, as in Vaswani et al.), the mean
        over the predicted tokens (``teacher_forced_loss``)."""
        return teacher_forced_loss(self, src_ids, src_mask, tgt_ids, tgt_mask, label_smoothing)


def teacher_forced_loss(model: nn.Module, src_ids: torch.Tensor, src_mask: torch.Tensor | None,
                        tgt_ids: torch.Tensor, tgt_mask: torch.Tensor | None = None, label_smoothing: float = 0.1,
                        reduction: str = "mean") -> torch.Tensor:
    """tgt_ids: (B, T) = BOS, y_1 .. y_n, EOS, padding: the decoder reads tokens 0 .. T-2 and
    predicts tokens 1 .. T-1; padding (tgt_mask 0) is ignored. ``model`` is a ``Translator`` or a
    wrapper that calls one (``DistributedDataParallel``)."""
    if isinstance(tgt_ids, torch.Tensor) and (tgt_ids.dim() != 2 or tgt_ids.shape[1] < 2):
        raise ValueError("tgt_ids must be (batch, seq_len >= 2): BOS, tokens, EOS; "
                         f"got {tuple(tgt_ids.shape)}.")
    if tgt_mask is not None:
        tgt_mask = check_attention_mask(tgt_mask, tuple(tgt_ids.shape), tgt_ids.device)
    inputs, labels = tgt_ids[:, :-1], tgt_ids[:, 1:]  # (B, T-1) each
    out = model(src_ids, src_mask, inputs, tgt_mask[:, :-1] if tgt_mask is not None else None)
    label_mask = tgt_mask[:, 1:] if tgt_mask is not None else None
    return sequence_loss(out.logits, labels, label_mask, label_smoothing, reduction)
