"""Learning the embeddings by backprop: masked-LM pretraining of an encoder (``Trainer``).

The model is the encoder with a masked-language-model head.

The head predicts only at the chosen positions (15% of tokens), so the (V x D) output
projection costs 15% of a dense one; the encoder's last layer, too, computes everything but
attention's keys and values at those positions only. Its output matrix is the token embedding itself (tied).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ctxvec.engine.linear import packed_row_multiple
from ctxvec.model.config import EncoderConfig
from ctxvec.model.encoder import Encoder, init_weights
from ctxvec.model.pooling import Pooling
from ctxvec.tokenizer import Tokenizer
from ctxvec.train.mlm_data import Masking, pack_sequences, read_documents, split_documents
from ctxvec.train.run import TrainConfig, TrainingRun, model_config, prepare_tokenizer
from ctxvec.weights.folders import write_encoder_folder

PRESETS = {  # the masked-LM encoders `ctxvec train --config` names
    "small": dict(d_model=256, n_heads=4, d_ff=1024, n_layers=4),
    "seed": {},  # the seed's defaults: 512 / 8 / 1024 / 12
}


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
        wanted = round_up_positions(chosen, real, packed_row_multiple(embedding, embedding))
        # the last layer computes the wanted outputs only: (M', D), the chosen M and a few more
        hidden = self.encoder(input_ids, attention_mask, positions=wanted).last_hidden_state
        logits = self.head(hidden, embedding)  # (M', V)
        predicted = chosen[wanted]  # (M',) True at the chosen rows, in the same row-major order
        targets = labels[wanted].masked_fill(~predicted, -100)  # the extra rows count for nothing
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


class Trainer(TrainingRun):
    """Masked-LM pretraining of an encoder; ``run()`` trains to ``cfg.steps``."""

    count_name = "masked_tokens"

    def __init__(self, corpus: list[str | Path], run: str | Path, cfg: TrainConfig, preset: str = "small",
                 tokenizer: str | None = None, resume: bool = False, progress: bool = True) -> None:
        super().__init__(run, cfg, resume, progress)
        documents = read_documents(corpus, cfg.doc_lines)
        train_docs, eval_docs = split_documents(documents, cfg.eval_fraction, cfg.seed)

        def train_tokenizer() -> Tokenizer:
            return Tokenizer.train(texts=[line for doc in train_docs for line in doc], vocab_size=cfg.vocab_size)

        self.tokenizer, note = prepare_tokenizer(self.run_dir, self.d, tokenizer, train_tokenizer, cfg.seq_len)
        self.notes.append(note)
        self.train_seqs = pack_sequences(self.tokenizer, train_docs, cfg.seq_len)
        self.eval_seqs = pack_sequences(self.tokenizer, eval_docs, cfg.seq_len)[: cfg.eval_sequences]
        per_step = cfg.batch_tokens // cfg.seq_len
        if per_step < 1 or per_step % (self.d.world * cfg.grad_accum):
            raise ValueError(f"batch_tokens // seq_len = {per_step} sequences per step must be a positive "
                             f"multiple of processes x grad_accum = {self.d.world * cfg.grad_accum}.")
        if len(self.train_seqs) < per_step or len(self.eval_seqs) == 0:
            raise ValueError(f"the corpus is too small: {len(self.train_seqs)} training and "
                             f"{len(self.eval_seqs)} held-out sequences of {cfg.seq_len} tokens.")
        self.per_step = per_step
        self.masking = Masking.for_tokenizer(self.tokenizer, cfg.mask_probability)
        self.config = model_config(preset, self.tokenizer, cfg.seq_len, PRESETS)
        self.build_model(lambda: MaskedLanguageModel(self.config), self.config.to_dict())

    def describe(self) -> dict:
        return {"train_sequences": len(self.train_seqs), "eval_sequences": len(self.eval_seqs)}

    # -- data --
    def epoch_of(self, step: int) -> int:
        return step // (len(self.train_seqs) // self.per_step)

    def batch_indices(self, step: int) -> np.ndarray:
        """This step's sequences, by global index: an epoch's permutation, sliced."""
        per_epoch = len(self.train_seqs) // self.per_step
        epoch, slot = divmod(step, per_epoch)
        order = np.random.default_rng((self.cfg.seed, epoch)).permutation(len(self.train_seqs))
        return order[slot * self.per_step:(slot + 1) * self.per_step]

    def micro_batches(self, step: int) -> list[tuple[torch.Tensor, ...]]:
        """This process's micro-batches: rank r takes every world-th slice (disjoint per rank)."""
        indices = self.batch_indices(step).reshape(self.cfg.grad_accum, self.d.world, -1)[:, self.d.rank]
        out = []
        for idx in indices:
            inputs, labels, chosen = self.masking(self.train_seqs[idx], idx, self.cfg.seed, step)
            out.append(tuple(torch.from_numpy(a).to(self.d.device) for a in (inputs, labels, chosen)))
        return out

    def count(self, batch) -> int:
        return int(batch[2].sum())

    def tokens(self, batch) -> int:
        return batch[0].numel()

    def loss_sum(self, model: nn.Module, batch) -> torch.Tensor:
        inputs, labels, chosen = batch
        return model(inputs, labels, chosen).loss_sum

    @torch.no_grad()
    def evaluate(self) -> dict:
        self.model.eval()
        shard = np.arange(len(self.eval_seqs))[self.d.rank::self.d.world]
        total, count, right = torch.zeros(()), torch.zeros(()), torch.zeros(())
        for start in range(0, len(shard), self.per_step):
            idx = shard[start:start + self.per_step]
            arrays = self.masking(self.eval_seqs[idx], idx, self.cfg.seed, 2**31)  # fixed masks
            inputs, labels, chosen = (torch.from_numpy(a).to(self.d.device) for a in arrays)
            with self.autocast():
                out = self.model(inputs, labels, chosen)
            total += out.loss_sum.float().cpu()
            count += out.n_predicted
            right += (out.logits.argmax(-1) == labels[chosen]).sum().cpu()
        n = self.d.sum(count).clamp(min=1)
        loss = (self.d.sum(total) / n).item()
        return {"step": self.step, "eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0)),
                "eval_accuracy": (self.d.sum(right) / n).item()}  # top-1 at the chosen positions

    def export(self) -> None:
        """The run folder's top: a model that ``ctxvec.load(run)`` reads (mean pooling)."""
        state = {k: v.float() for k, v in self.model.encoder.state_dict().items()}
        write_encoder_folder(self.run_dir, state, self.model.encoder.config, None,  # the run holds its tokenizer
                             Pooling("mean"), self.cfg.seq_len,
                             f"masked-LM encoder trained by ctxvec ({self.run_dir})")
