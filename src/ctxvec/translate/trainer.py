"""Training a translator: ``TranslationTrainer`` on the shared run machinery (``train.run``).

Tokens: one BPE vocabulary for both languages (``Tokenizer.train(kind="bpe")``, cased, exact
spacing on decode); a sentence is ``[CLS] ... [SEP]``, which on the target side serve as BOS
and EOS. Training is teacher-forced cross-entropy with label smoothing; its held-out
evaluation reports loss, perplexity and sacrebleu BLEU/chrF of greedy translations. The run
folder is a translation model (``translate.translator.load_translator`` reads it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ctxvec.engine.batching import length_sorted_batches, padded_shape, rounded_width
from ctxvec.model.config import Seq2SeqConfig
from ctxvec.model.translator import Translator, teacher_forced_loss
from ctxvec.tokenizer import Encoded, Tokenizer
from ctxvec.train.run import TrainConfig, TrainingRun, model_config, prepare_tokenizer
from ctxvec.translate.data import BIBLE_TEST_BOOKS, BIBLE_VALID_BOOKS, Pair, _first_few, _natural, read_pairs, split_pairs
from ctxvec.translate.pipeline import export_translator, translate_texts
from ctxvec.translate.scores import score_translations

PRESETS = {
    # a small Transformer for a CPU: 3 + 3 layers x 256, 4 heads, FFN 1024, pre-norm
    "small": dict(d_model=256, n_heads=4, d_ff=1024, n_layers=3, norm_first=True),
    "seed": {},  # the seed's encoder dims (512 / 8 / 1024 / 12), with a decoder as deep
}

@dataclass
class TranslationConfig(TrainConfig):
    """Training options for translation (``seq_len``: the longest sentence kept, in tokens)."""

    steps: int = 6000
    batch_tokens: int = 6144
    eval_every: int = 500
    save_every: int = 500
    lr: float = 7e-4
    warmup: int = 400
    weight_decay: float = 0.0
    label_smoothing: float = 0.1
    eval_sentences: int = 200  # held-out sentences translated (greedy) for BLEU/chrF at each eval
    vocab_size: int = 10000
    valid_groups: list[str] | None = None
    test_groups: list[str] | None = None
    source_column: str | None = None
    target_column: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}.")


def seq2seq_config(preset: str, tokenizer: Tokenizer, max_len: int) -> Seq2SeqConfig:
    """One vocabulary for both languages: encoder, decoder and output share one token table."""
    encoder = model_config(preset, tokenizer, max_len, PRESETS)
    return Seq2SeqConfig(encoder, tie_embeddings=True, share_embeddings=True)


class TranslationTrainer(TrainingRun):
    """Train a ``Translator`` on a parallel TSV; ``run()`` trains to ``cfg.steps``.

    Batches: each epoch shuffles the training pairs with (seed, epoch), sorts them by length
    within pools of 64 batches and cuts micro-batches under ``batch_tokens / (processes x
    grad_accum)`` padded tokens, then shuffles the micro-batches. A step takes the next
    processes x grad_accum of them (rank r every world-th), so the batches of a step depend
    on the global batch only, not on how it is spread over processes.
    """

    count_name = "target_tokens"

    def __init__(self, pairs_file: str | Path, run: str | Path, cfg: TranslationConfig, preset: str = "small",
                 tokenizer: str | None = None, resume: bool = False, progress: bool = True) -> None:
        super().__init__(run, cfg, resume, progress)
        pairs, self.skipped_pairs = read_pairs(pairs_file, cfg.source_column, cfg.target_column)
        valid_groups, test_groups = cfg.valid_groups, cfg.test_groups
        if valid_groups is None and test_groups is None and {p.group for p in pairs} >= set(
                BIBLE_VALID_BOOKS + BIBLE_TEST_BOOKS):
            valid_groups, test_groups = list(BIBLE_VALID_BOOKS), list(BIBLE_TEST_BOOKS)
        self.train_pairs, self.valid_pairs, self.test_pairs = split_pairs(
            pairs, valid_groups, test_groups, seed=cfg.seed)
        self.held_out = {"valid": sorted({p.group for p in self.valid_pairs}, key=_natural),
                         "test": sorted({p.group for p in self.test_pairs}, key=_natural)}
        self.tokenizer = self._prepare_tokenizer(tokenizer)
        self.train_encoded = self._encode(self.train_pairs, drop_long=True)
        self.valid_encoded = self._encode(self.valid_pairs, drop_long=False)
        self.micro_tokens = cfg.batch_tokens // (self.d.world * cfg.grad_accum)
        if self.micro_tokens < cfg.seq_len:
            raise ValueError(f"batch_tokens / (processes x grad_accum) = {self.micro_tokens} is below "
                             f"seq_len = {cfg.seq_len}: a long sentence would not fit a micro-batch.")
        self._epochs: list[list[list[int]]] = []  # micro-batches of each epoch, made on demand
        self.config = seq2seq_config(preset, self.tokenizer, cfg.seq_len)
        self.build_model(lambda: Translator(self.config), self.config.to_dict())
        self.notes.append(self.data_summary())

    # -- data --
    def _prepare_tokenizer(self, path: str | None) -> Tokenizer:
        def train() -> Tokenizer:  # one joint BPE vocabulary for both languages
            texts = [t for p in self.train_pairs for t in (p.source, p.target)]
            return Tokenizer.train(texts=texts, vocab_size=self.cfg.vocab_size, lowercase=False, kind="bpe")

        tokenizer, note = prepare_tokenizer(self.run_dir, self.d, path, train, self.cfg.seq_len)
        self.notes.append(note)
        return tokenizer

    def _encode(self, pairs: list[Pair], drop_long: bool) -> list[tuple[Encoded, Encoded]]:
        src = self.tokenizer.tokenize([p.source for p in pairs])
        tgt = self.tokenizer.tokenize([p.target for p in pairs])
        keep = [(s, t) for s, t in zip(src, tgt) if not (drop_long and (s.truncated or t.truncated))]
        if not keep:
            raise ValueError("no sentence pair fits seq_len; raise --seq-len.")
        return keep

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        while len(self._epochs) <= epoch:
            e = len(self._epochs)
            rng = np.random.default_rng((self.cfg.seed, e))
            order = rng.permutation(len(self.train_encoded)).tolist()
            lengths = [max(len(s.ids), len(t.ids)) for s, t in self.train_encoded]
            batches: list[list[int]] = []
            pool = 64 * max(1, self.micro_tokens // 32)
            for start in range(0, len(order), pool):
                chunk = order[start:start + pool]
                for batch in length_sorted_batches([lengths[i] for i in chunk], self.micro_tokens,
                                                   rounded_width):
                    batches.append([chunk[i] for i in batch])
            rng.shuffle(batches)
            self._epochs.append(batches)
        return self._epochs[epoch]

    def _locate(self, step: int) -> tuple[int, int]:
        """(epoch, first micro-batch) of ``step``."""
        per_step = self.d.world * self.cfg.grad_accum
        epoch = 0
        while True:
            n = len(self.epoch_batches(epoch)) // per_step
            if n == 0:
                raise ValueError("the training data is smaller than one step; lower --batch-tokens.")
            if step < n:
                return epoch, step * per_step
            step -= n
            epoch += 1

    def epoch_of(self, step: int) -> int:
        return self._locate(step)[0]

    def _pad(self, rows: list[tuple[Encoded, Encoded]]) -> tuple[torch.Tensor, ...]:
        """(src_ids, src_mask, tgt_ids, tgt_mask), all (R, W), right-padded, on the device.

        Source and target share one width W, the longest of both rounded up to
        ``LENGTH_MULTIPLE`` (``rounded_width``), and R is as many rows as the token budget allows
        at that width (rows of padding after the pairs; the loss ignores them): shapes depend on
        W alone. In bf16 on a CPU, oneDNN keeps a compiled kernel per matrix shape, and a
        training process whose shapes changed with every batch grew by gigabytes.
        """
        longest = max(max(len(s.ids), len(t.ids)) for s, t in rows)
        n, width = padded_shape(longest, len(rows), self.micro_tokens, self.cfg.seq_len, rounded_width)
        src = self.tokenizer.pad([s for s, _ in rows], length=width, rows=n)
        tgt = self.tokenizer.pad([t for _, t in rows], length=width, rows=n)
        return tuple(t.to(self.d.device) for t in (src.input_ids, src.attention_mask,
                                                    tgt.input_ids, tgt.attention_mask))

    def micro_batches(self, step: int) -> list[tuple[torch.Tensor, ...]]:
        epoch, first = self._locate(step)
        batches = self.epoch_batches(epoch)[first:first + self.d.world * self.cfg.grad_accum]
        mine = batches[self.d.rank::self.d.world]  # disjoint per rank
        return [self._pad([self.train_encoded[i] for i in b]) for b in mine]

    def count(self, batch) -> int:
        return int(batch[3][:, 1:].sum())  # every target token after BOS is predicted

    def tokens(self, batch) -> int:
        return int(batch[1].sum() + batch[3].sum())

    def loss_sum(self, model: nn.Module, batch, label_smoothing: float | None = None) -> torch.Tensor:
        src, src_mask, tgt, tgt_mask = batch
        smoothing = self.cfg.label_smoothing if label_smoothing is None else label_smoothing
        return teacher_forced_loss(model, src, src_mask, tgt, tgt_mask.bool(), smoothing, reduction="sum")

    # -- evaluation --
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out cross-entropy (no smoothing), perplexity, and BLEU/chrF of greedy translations."""
        self.model.eval()
        shard = list(range(self.d.rank, len(self.valid_encoded), self.d.world))
        total, count = torch.zeros(()), torch.zeros(())
        lengths = [max(len(self.valid_encoded[i][0].ids), len(self.valid_encoded[i][1].ids)) for i in shard]
        for batch in length_sorted_batches(lengths, self.micro_tokens, rounded_width):
            padded = self._pad([self.valid_encoded[shard[i]] for i in batch])
            with self.autocast():
                total += self.loss_sum(self.model, padded, label_smoothing=0.0).float().cpu()
            count += self.count(padded)
        loss = (self.d.sum(total) / self.d.sum(count).clamp(min=1)).item()
        record = {"step": self.step, "eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}
        if self.d.main and self.cfg.eval_sentences:
            sample = self.valid_pairs[: self.cfg.eval_sentences]
            hypotheses = translate_texts(self.model, self.tokenizer, [p.source for p in sample],
                                         max_len=self.cfg.seq_len, batch_tokens=self.micro_tokens)
            scores = score_translations(hypotheses, [p.target for p in sample])
            record.update({"eval_bleu": scores["bleu"], "eval_chrf": scores["chrf"]})
        return record

    def describe(self) -> dict:
        return {"train_pairs": len(self.train_encoded), "dropped_long_pairs": len(self.train_pairs) - len(self.train_encoded),
                "valid_pairs": len(self.valid_pairs), "test_pairs": len(self.test_pairs), "held_out": self.held_out,
                "skipped_empty_pairs": self.skipped_pairs}

    def data_summary(self) -> str:
        """What is trained on and what is held out, in a line or two for people."""
        d = self.describe()
        text = (f"training on {d['train_pairs']} pairs; held out for validation: {d['valid_pairs']} pairs "
                f"({_first_few(d['held_out']['valid'])}); for the test: {d['test_pairs']} pairs "
                f"({_first_few(d['held_out']['test'])})")
        notes = []
        if d["skipped_empty_pairs"]:
            notes.append(f"skipped {d['skipped_empty_pairs']} rows with an empty source or target cell")
        if d["dropped_long_pairs"]:
            notes.append(f"left out {d['dropped_long_pairs']} training pairs longer than {self.cfg.seq_len} tokens")
        return "\n".join([text, "; ".join(notes)] if notes else [text])

    def export(self) -> None:
        export_translator(self.run_dir, self.model, self.tokenizer, self.cfg.seq_len,
                          f"translator trained by ctxvec ({self.run_dir}); held out: {self.held_out}")
