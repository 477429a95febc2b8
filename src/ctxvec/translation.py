"""Translation end to end: parallel text, a joint tokenizer, training, and ``translate``.

Data: a TSV file with a header row; the source and target columns are named (default: the
last two columns, so ``ref  es  en`` translates es -> en). Pairs are grouped for the held-out
split: by the book of a Bible-style ``ref`` column ("1 Samuel 3:4" -> "1 Samuel"), else by
blocks of consecutive lines, so that held-out lines come in stretches rather than one by one
(``split_pairs`` has the rule, and its fallback for files with too few groups).

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
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ctxvec.checkpoint import atomic_save_tensors, atomic_write_text, unique_state, with_aliases
from ctxvec.decoder import Seq2SeqConfig, Translator
from ctxvec.decoding import beam_search, greedy_decode
from ctxvec.pipeline import LENGTH_MULTIPLE, length_sorted_batches, padded_shape
from ctxvec.pretrained import WEIGHTS_FILE, load_model, read_json
from ctxvec.textfile import InputFileError, check_readable, iter_texts
from ctxvec.tokenizer import CLS, SEP, Encoded, Tokenizer
from ctxvec.train import TrainConfig, TrainingRun, model_config, prepare_tokenizer

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
_LINES = re.compile(r"lines\s+(\d+)\s*-\s*(\d+)")  # a range of lines named as a group: "lines 2-101"
HELD_OUT_FRACTION = 0.03  # of the pairs, held out for validation and again for the test
BLOCK_LINES = 100  # the longest block of consecutive lines held out as one group


@dataclass
class Pair:
    source: str
    target: str
    group: str  # held-out unit: a book, or a block of lines ("lines 2-101")
    line: int  # the pair's line in the file (the header is line 1)


def read_pairs(path: str | Path, source_column: str | None = None, target_column: str | None = None,
               block_lines: int = BLOCK_LINES) -> tuple[list[Pair], int]:
    """(pairs, skipped) of a TSV file with a header row (columns chosen by name).

    A pair's group is the book of a Bible-style ``ref`` column ("1 Samuel 3:4" -> "1 Samuel"),
    else its block of ``block_lines`` lines of the file ("lines 2-101", "lines 102-201", ...).
    Blank lines are ignored; ``skipped`` counts the rows whose source or target cell is empty.
    """
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
    if s == t:
        raise InputFileError(f"{path}: the source and target columns are both {source_column!r}; name two "
                             f"different columns of {', '.join(columns)} (--source-column, --target-column).")
    ref = columns.index("ref") if "ref" in columns else None
    pairs, skipped = [], 0
    for number, line in enumerate(lines, start=2):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != len(columns):
            raise InputFileError(f"{path}, line {number}: {len(fields)} fields, the header has {len(columns)}.")
        source, target = fields[s].strip(), fields[t].strip()
        if not (source and target):
            skipped += 1
            continue
        if ref is not None and (m := _REF.match(fields[ref])):
            group = m["book"]
        else:
            start = (number - 2) // block_lines * block_lines + 2
            group = f"lines {start}-{start + block_lines - 1}"
        pairs.append(Pair(source, target, group, number))
    if not pairs:
        empty = f" ({skipped} rows have an empty {source_column} or {target_column} cell)" if skipped else ""
        raise InputFileError(f"{path} holds no pairs{empty}.")
    return pairs, skipped


def split_pairs(pairs: list[Pair], valid_groups: Sequence[str] | None = None,
                test_groups: Sequence[str] | None = None, fraction: float = HELD_OUT_FRACTION, seed: int = 0,
                ) -> tuple[list[Pair], list[Pair], list[Pair]]:
    """(train, valid, test), held out by whole groups; each list in file order.

    A named group is a group of the data (a book, "lines 2-101") or any range of lines
    ("lines 250-259"). A split not named gets a share of about ``fraction`` of the pairs (at
    least one): the groups, shuffled by ``seed``, each join the first split they bring closer
    to its share. If that leaves a split under half a share (one book, or a file too small for
    its 100-line blocks), blocks of consecutive lines are dealt the same way instead, at most
    ``BLOCK_LINES`` long and sized so that whole blocks make a share. A split dealt ends with
    half a share to two. Held-out pairs carry as their group the name that selects them, so
    typing a split's names reproduces it.

    Raises ``ValueError`` for an unknown name, a pair named for both splits, or a training split
    smaller than the held-out ones (a file too small to hold out from).
    """
    splits = [None if names is None else _named(pairs, names) for names in (valid_groups, test_groups)]
    missing = [k for k, chosen in enumerate(splits) if chosen is None]
    if missing:
        share = max(1, round(fraction * len(pairs)))
        taken = {i for chosen in splits if chosen for i in chosen}
        groups: dict[str, list[int]] = {}
        for i, p in enumerate(pairs):
            groups.setdefault(p.group, []).append(i)
        size = math.ceil(share / math.ceil(share / BLOCK_LINES))  # blocks of <= BLOCK_LINES, one share in all
        dealt = (_deal(groups, share, len(missing), seed, taken)
                 or _deal(_line_blocks(pairs, size), share, len(missing), seed, taken) or [{}] * len(missing))
        for k, chosen in zip(missing, dealt):
            splits[k] = chosen
    valid, test = splits
    if both := valid.keys() & test.keys():
        raise ValueError(f"{len(both)} pairs would be both validation and test; name groups that do not overlap.")
    held = valid.keys() | test.keys()
    train = [p for i, p in enumerate(pairs) if i not in held]
    if not train or len(train) < len(held) or not (valid and test):
        raise ValueError(f"{len(pairs)} pairs are too few to train on most and hold out validation and test ones "
                         f"({len(train)} training, {len(valid)} validation, {len(test)} test): give a file with "
                         "more pairs, or name smaller held-out groups (--valid-groups, --test-groups).")
    return (train, [replace(pairs[i], group=name) for i, name in sorted(valid.items())],
            [replace(pairs[i], group=name) for i, name in sorted(test.items())])


def _named(pairs: list[Pair], names: Sequence[str]) -> dict[int, str]:
    """{pair index: name} of the pairs in the named groups or ranges of lines ("lines 2-101")."""
    chosen: dict[int, str] = {}
    for name in names:
        picked = [i for i, p in enumerate(pairs) if p.group == name]
        if not picked and (m := _LINES.fullmatch(name.strip())):
            name = f"lines {m[1]}-{m[2]}"
            picked = [i for i, p in enumerate(pairs) if int(m[1]) <= p.line <= int(m[2])]
        if not picked:
            groups = list(dict.fromkeys(p.group for p in pairs))
            raise ValueError(f"no group {name!r} in the data; its groups are {_first_few(groups)}; a range of "
                             "lines such as 'lines 2-101' also names one.")
        chosen.update(dict.fromkeys(picked, name))
    return chosen


def _line_blocks(pairs: list[Pair], size: int) -> dict[str, list[int]]:
    """Consecutive pairs in blocks of ``size`` (the last one takes the rest), named "lines 2-10"."""
    starts = list(range(0, len(pairs) - size + 1, size)) or [0]
    ends = starts[1:] + [len(pairs)]
    return {f"lines {pairs[a].line}-{pairs[b - 1].line}": list(range(a, b)) for a, b in zip(starts, ends)}


def _deal(units: dict[str, list[int]], share: int, splits: int, seed: int, taken: set[int],
          ) -> list[dict[int, str]] | None:
    """``splits`` x {pair index: unit name} of about ``share`` pairs each; None if one is under half.

    The units (less the pairs already ``taken``) are shuffled by ``seed``, and each joins the
    first split it brings closer to ``share``, so no split ends with two shares or more.
    """
    order = list(units)
    random.Random(seed).shuffle(order)
    dealt: list[dict[int, str]] = [{} for _ in range(splits)]
    for name in order:
        members = [i for i in units[name] if i not in taken]
        for chosen in dealt:
            if abs(len(chosen) + len(members) - share) < abs(len(chosen) - share):
                chosen.update(dict.fromkeys(members, name))
                break
    return dealt if all(2 * len(chosen) >= share for chosen in dealt) else None


def _first_few(names: Sequence[str], n: int = 6) -> str:
    """The names joined ("a, b, c"), or the first ``n`` of them and "and 12 more"."""
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def _natural(name: str) -> list:
    """A sort key that puts "lines 2-101" before "lines 102-201"."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


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


# ---- the model as a folder, and translating with it ------------------------------------------

def export_translator(folder: Path, model: Translator, tokenizer: Tokenizer, max_len: int, description: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    atomic_save_tensors(folder / WEIGHTS_FILE, {k: v.float() for k, v in unique_state(model).items()})
    tokenizer.save(folder / "tokenizer.json")
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
    n_layers = config.encoder.n_layers + (config.n_decoder_layers or config.encoder.n_layers)
    model = load_model(lambda: Translator(config), folder / WEIGHTS_FILE, n_layers, with_aliases)
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
