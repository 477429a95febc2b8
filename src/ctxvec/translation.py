"""Translation end to end: parallel text, a joint tokenizer, training, and ``translate``.

Data: a TSV file with a header row; the source and target columns are named (default: the
last two columns, so ``ref  es  en`` translates es -> en). Pairs are grouped for the held-out
split: by the book of a Bible-style ``ref`` column ("1 Samuel 3:4" -> "1 Samuel"), else by
blocks of consecutive lines, so that neighbouring lines never sit on both sides of a split.

Tokens: one BPE vocabulary for both languages (``Tokenizer.train(kind="bpe")``, cased, exact
spacing on decode); a sentence is ``[CLS] ... [SEP]``, which on the target side serve as BOS
and EOS.

Training reuses ``TrainingRun`` (steps, AdamW schedule, accumulation, NaN guard, checkpoints,
exact resume, torchrun/DDP) with teacher-forced cross-entropy and label smoothing; its
held-out evaluation reports loss, perplexity and sacrebleu BLEU/chrF of greedy translations.
The run folder is a translation model: ``translator.json``, ``model.safetensors``,
``tokenizer.json``, read by ``load_translator``.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ctxvec.checkpoint import atomic_save_tensors, atomic_write, atomic_write_text, unique_state, with_aliases
from ctxvec.decoder import Seq2SeqConfig, Translator
from ctxvec.decoding import beam_search, greedy_decode
from ctxvec.pipeline import LENGTH_MULTIPLE, length_sorted_batches, padded_shape
from ctxvec.pretrained import WEIGHTS_FILE, load_state_strict, read_json, read_safetensors
from ctxvec.textfile import InputFileError, check_readable, iter_texts
from ctxvec.tokenizer import CLS, SEP, Encoded, Tokenizer
from ctxvec.train import TrainConfig, TrainingRun, model_config

TRANSLATOR_CONFIG = "translator.json"
PRESETS = {
    # a small Transformer for a CPU: 3 + 3 layers x 256, 4 heads, FFN 1024, pre-norm
    "small": dict(d_model=256, n_heads=4, d_ff=1024, n_layers=3, norm_first=True),
    "seed": {},  # the seed's encoder dims (512 / 8 / 1024 / 12), with a decoder as deep
}
# Whole books held out of the Bible corpus (../shared/data/bible_es_en.tsv): short books from
# both testaments and several genres: 287 validation and 351 test verses of 31,032.
BIBLE_VALID_BOOKS = ("Ruth", "Joel", "Philippians", "Jude")
BIBLE_TEST_BOOKS = ("Jonah", "Nahum", "Titus", "James", "I John")
_REF = re.compile(r"^(?P<book>.+?)\s+\d+:\d+$")


@dataclass
class Pair:
    source: str
    target: str
    group: str  # held-out unit: a book, or a block of lines


def read_pairs(path: str | Path, source_column: str | None = None, target_column: str | None = None,
               block_lines: int = 100) -> list[Pair]:
    """Source/target pairs of a TSV file with a header row (columns chosen by name)."""
    path = Path(path)
    check_readable(path)
    lines = iter_texts(path, "text")
    header = next(lines, None)
    if header is None:
        raise InputFileError(f"{path} is empty; a header row naming the columns is expected.")
    columns = header.split("\t")
    if len(columns) < 2:
        raise InputFileError(f"{path}, line 1: a tab-separated header with at least two columns is expected.")
    source_column = source_column or columns[-2]
    target_column = target_column or columns[-1]
    for name in (source_column, target_column):
        if name not in columns:
            raise InputFileError(f"{path}: no column {name!r}; the header has {', '.join(columns)}.")
    s, t = columns.index(source_column), columns.index(target_column)
    ref = columns.index("ref") if "ref" in columns else None
    pairs = []
    for number, line in enumerate(lines, start=2):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != len(columns):
            raise InputFileError(f"{path}, line {number}: {len(fields)} fields, the header has {len(columns)}.")
        if ref is not None and (m := _REF.match(fields[ref])):
            group = m["book"]
        else:
            group = f"lines {(number - 2) // block_lines * block_lines + 2}-"
        pairs.append(Pair(fields[s].strip(), fields[t].strip(), group))
    if not pairs:
        raise InputFileError(f"{path} holds no pairs.")
    return pairs


def split_pairs(pairs: list[Pair], valid_groups: Sequence[str] | None = None,
                test_groups: Sequence[str] | None = None, fraction: float = 0.03, seed: int = 0,
                ) -> tuple[list[Pair], list[Pair], list[Pair]]:
    """(train, valid, test) by whole groups: the named ones, or a random ``fraction`` each."""
    groups = list(dict.fromkeys(p.group for p in pairs))
    if valid_groups is None or test_groups is None:
        order = groups.copy()
        random.Random(seed).shuffle(order)
        n = max(1, round(fraction * len(groups)))
        if len(groups) < 2 * n + 1:
            raise ValueError(f"{len(groups)} groups of lines are too few to hold out validation and test ones.")
        valid_groups = order[:n] if valid_groups is None else valid_groups
        test_groups = order[n:2 * n] if test_groups is None else test_groups
    unknown = [g for g in [*valid_groups, *test_groups] if g not in groups]
    if unknown:
        raise ValueError(f"held-out group(s) not in the data: {', '.join(unknown)}.")
    if set(valid_groups) & set(test_groups):
        raise ValueError("a group cannot be both validation and test.")
    valid, test = set(valid_groups), set(test_groups)
    return ([p for p in pairs if p.group not in valid | test], [p for p in pairs if p.group in valid],
            [p for p in pairs if p.group in test])


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
        pairs = read_pairs(pairs_file, cfg.source_column, cfg.target_column)
        valid_groups, test_groups = cfg.valid_groups, cfg.test_groups
        if valid_groups is None and test_groups is None and {p.group for p in pairs} >= set(
                BIBLE_VALID_BOOKS + BIBLE_TEST_BOOKS):
            valid_groups, test_groups = list(BIBLE_VALID_BOOKS), list(BIBLE_TEST_BOOKS)
        self.train_pairs, self.valid_pairs, self.test_pairs = split_pairs(
            pairs, valid_groups, test_groups, seed=cfg.seed)
        self.held_out = {"valid": sorted({p.group for p in self.valid_pairs}),
                         "test": sorted({p.group for p in self.test_pairs})}
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

    # -- data --
    def _prepare_tokenizer(self, path: str | None) -> Tokenizer:
        target = self.run_dir / "tokenizer.json"
        if self.d.main and not target.is_file():
            if path:
                tokenizer = Tokenizer.load(path)
            else:
                texts = [t for p in self.train_pairs for t in (p.source, p.target)]
                tokenizer = Tokenizer.train(texts=texts, vocab_size=self.cfg.vocab_size, lowercase=False, kind="bpe")
            tokenizer.save(target)
        self.d.barrier()
        return Tokenizer.load(target, max_len=self.cfg.seq_len)

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
                                                   LENGTH_MULTIPLE):
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
        ``LENGTH_MULTIPLE``, and R is as many rows as the token budget allows at that width
        (rows of padding after the pairs; the loss ignores them): batch shapes then depend on
        W alone. In bf16 on a CPU, oneDNN keeps a compiled kernel per matrix shape, and a
        training process whose shapes changed with every batch grew by gigabytes.
        """
        longest = max(max(len(s.ids), len(t.ids)) for s, t in rows)
        n, width = padded_shape(longest, len(rows), self.micro_tokens, self.cfg.seq_len)
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
        logits = model(src, src_mask, tgt[:, :-1], tgt_mask[:, :-1]).logits  # (B, T-1, V)
        labels = tgt[:, 1:].masked_fill(tgt_mask[:, 1:] == 0, -100)  # (B, T-1), -100: ignored
        smoothing = self.cfg.label_smoothing if label_smoothing is None else label_smoothing
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100,
                               reduction="sum", label_smoothing=smoothing)

    # -- evaluation --
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out cross-entropy (no smoothing), perplexity, and BLEU/chrF of greedy translations."""
        self.model.eval()
        shard = list(range(self.d.rank, len(self.valid_encoded), self.d.world))
        total, count = torch.zeros(()), torch.zeros(())
        lengths = [max(len(self.valid_encoded[i][0].ids), len(self.valid_encoded[i][1].ids)) for i in shard]
        for batch in length_sorted_batches(lengths, self.micro_tokens, LENGTH_MULTIPLE):
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
                "valid_pairs": len(self.valid_pairs), "test_pairs": len(self.test_pairs), "held_out": self.held_out}

    def export(self) -> None:
        export_translator(self.run_dir, self.model, self.tokenizer, self.cfg.seq_len,
                          f"translator trained by ctxvec ({self.run_dir}); held out: {self.held_out}")


# ---- the model as a folder, and translating with it ------------------------------------------

def export_translator(folder: Path, model: Translator, tokenizer: Tokenizer, max_len: int, description: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    atomic_save_tensors(folder / WEIGHTS_FILE, {k: v.float() for k, v in unique_state(model).items()})
    atomic_write(folder / "tokenizer.json", lambda tmp: tokenizer.save(tmp))
    meta = {"seq2seq": model.config.to_dict(), "max_len": max_len, "bos": CLS, "eos": SEP,
            "description": description}
    atomic_write_text(folder / TRANSLATOR_CONFIG, json.dumps(meta, indent=2) + "\n")


@dataclass
class TranslatorPipeline:
    """A trained translator with its tokenizer: ``translate(texts)`` -> texts."""

    model: Translator
    tokenizer: Tokenizer
    max_len: int
    description: str = ""
    options: dict = field(default_factory=dict)

    def translate(self, texts: Sequence[str], *, beam_size: int = 4, alpha: float = 0.6,
                  max_length: int | None = None, batch_tokens: int = 2048) -> list[str]:
        return translate_texts(self.model, self.tokenizer, texts, max_len=self.max_len, beam_size=beam_size,
                               alpha=alpha, max_length=max_length, batch_tokens=batch_tokens)


def load_translator(folder: str | Path) -> TranslatorPipeline:
    """A folder written by ``ctxvec train-translation`` (or ``export_translator``)."""
    folder = Path(folder)
    if not (folder / TRANSLATOR_CONFIG).is_file():
        raise ValueError(f"{folder} is not a translation model (no {TRANSLATOR_CONFIG}); train one with "
                         "`ctxvec train-translation`.")
    meta = read_json(folder / TRANSLATOR_CONFIG)
    try:
        config = Seq2SeqConfig.from_dict(meta["seq2seq"])
        max_len = int(meta["max_len"])
    except (KeyError, TypeError) as err:
        raise ValueError(f"{folder / TRANSLATOR_CONFIG} lacks {err}.") from None
    tokenizer = Tokenizer.load(folder / "tokenizer.json", max_len=max_len)
    if tokenizer.vocab_size != config.encoder.vocab_size:
        raise ValueError(f"{folder}: the tokenizer has {tokenizer.vocab_size} tokens but the model's "
                         f"embedding has {config.encoder.vocab_size} rows.")
    model = Translator(config)
    load_state_strict(model, with_aliases(read_safetensors(folder / WEIGHTS_FILE), model), str(folder / WEIGHTS_FILE))
    return TranslatorPipeline(model.eval(), tokenizer, max_len, meta.get("description", ""))


@torch.no_grad()
def translate_texts(model: Translator, tokenizer: Tokenizer, texts: Sequence[str], *, max_len: int,
                    beam_size: int = 1, alpha: float = 0.6, max_length: int | None = None,
                    batch_tokens: int = 2048) -> list[str]:
    """Translate ``texts`` in length-sorted batches (greedy when ``beam_size`` is 1)."""
    was_training = model.training
    model.eval()
    encoded = tokenizer.tokenize(list(texts))
    bos, eos = tokenizer.token_to_id(CLS), tokenizer.token_to_id(SEP)
    limit = max_length or max_len
    out: list[str] = [""] * len(encoded)
    lengths = [len(e.ids) for e in encoded]
    for indices in length_sorted_batches(lengths, max(batch_tokens // max(beam_size, 1), max(lengths, default=1))):
        batch = tokenizer.pad([encoded[i] for i in indices])
        kwargs = dict(bos_id=bos, eos_id=eos, pad_id=tokenizer.pad_id, max_length=limit)
        if beam_size == 1:
            result = greedy_decode(model, batch.input_ids, batch.attention_mask, **kwargs)
        else:
            result = beam_search(model, batch.input_ids, batch.attention_mask, beam_size=beam_size,
                                 alpha=alpha, **kwargs)
        for i, ids in zip(indices, result.tokens):
            out[i] = tokenizer.decode(ids)
    model.train(was_training)
    return out


def score_translations(hypotheses: Sequence[str], references: Sequence[str]) -> dict:
    """Corpus BLEU and chrF (sacrebleu, detokenized text, default settings) and their signatures."""
    from sacrebleu.metrics import BLEU, CHRF

    bleu, chrf = BLEU(), CHRF()
    b = bleu.corpus_score(list(hypotheses), [list(references)])
    c = chrf.corpus_score(list(hypotheses), [list(references)])
    return {"bleu": b.score, "chrf": c.score, "bleu_signature": str(bleu.get_signature()),
            "chrf_signature": str(chrf.get_signature())}


__all__ = ["Pair", "TranslationConfig", "TranslationTrainer", "TranslatorPipeline", "load_translator",
           "read_pairs", "score_translations", "split_pairs", "translate_texts"]
