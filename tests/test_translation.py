"""Translation: parallel TSV data, held-out groups, the joint BPE, training, translate."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ctxvec.weights.checkpoint import load_checkpoint, tied_aliases, unique_state, with_aliases
from ctxvec.cli import main
from ctxvec.model.config import Seq2SeqConfig
from ctxvec.model.translator import Translator
from ctxvec.texts import InputFileError
from ctxvec.tokenizer import Tokenizer
from ctxvec.translate.data import read_pairs, split_pairs
from ctxvec.translate.trainer import TranslationConfig, TranslationTrainer
from ctxvec.translate.pipeline import load_translator
from ctxvec.translate.scores import score_translations

from conftest import tiny_config

SHARED_PAIRS = Path(__file__).resolve().parents[2] / "shared" / "data" / "bible_es_en.tsv"
LEXICON = {"el": "the", "perro": "dog", "gato": "cat", "come": "eats", "ve": "sees", "pan": "bread",
           "agua": "water", "bebe": "drinks", "grande": "big", "rojo": "red", "y": "and", "un": "a"}


def toy_pairs(path: Path, n: int = 240, books: int = 6) -> Path:
    """A word-for-word toy language pair, in books of verses like the Bible file."""
    rng = random.Random(0)
    words = list(LEXICON)
    lines = ["ref\tes\ten"]
    for i in range(n):
        source = [rng.choice(words) for _ in range(rng.randint(2, 7))]
        lines.append(f"Book{i % books} 1:{i}\t{' '.join(source)}\t{' '.join(LEXICON[w] for w in source)}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def tiny_model_config(tmp_path: Path) -> str:
    path = tmp_path / "tiny.json"
    tiny_config(dropout=0.0, max_len=64).save(path)
    return str(path)


TINY = dict(batch_tokens=512, seq_len=32, vocab_size=120, lr=3e-3, warmup=5, eval_every=10, save_every=10,
            eval_sentences=16, valid_groups=["Book4"], test_groups=["Book5"])


# ---- data ---------------------------------------------------------------------------------

def plain_pairs(path: Path, n: int, ref: str | None = None) -> Path:
    """``n`` numbered pairs without refs, or all in the one book ``ref``."""
    if ref:
        text = "ref\tes\ten\n" + "".join(f"{ref} 1:{i + 1}\tuno {i}\tone {i}\n" for i in range(n))
    else:
        text = "es\ten\n" + "".join(f"uno {i}\tone {i}\n" for i in range(n))
    path.write_text(text, encoding="utf-8")
    return path


def test_columns_groups_and_split(tmp_path):
    pairs, skipped = read_pairs(toy_pairs(tmp_path / "p.tsv"))
    assert len(pairs) == 240 and skipped == 0 and pairs[0].group == "Book0" and pairs[0].line == 2
    assert pairs[0].target == " ".join(LEXICON[w] for w in pairs[0].source.split())
    train, valid, test = split_pairs(pairs, ["Book4"], ["Book5"])
    assert {p.group for p in valid} == {"Book4"} and {p.group for p in test} == {"Book5"}
    assert len(train) == 160 and not {p.group for p in train} & {"Book4", "Book5"}
    reverse, _ = read_pairs(tmp_path / "p.tsv", source_column="en", target_column="es")
    assert reverse[0].source == pairs[0].target


def test_line_block_labels_are_complete_and_typeable(tmp_path):
    pairs, _ = read_pairs(plain_pairs(tmp_path / "plain.tsv", 350))
    assert list(dict.fromkeys(p.group for p in pairs)) == ["lines 2-101", "lines 102-201", "lines 202-301",
                                                          "lines 302-401"]
    train, valid, test = split_pairs(pairs, ["lines 2-101"], ["lines 302-401"])
    assert [p.line for p in valid] == list(range(2, 102)) and [p.line for p in test] == list(range(302, 352))
    _, valid, _ = split_pairs(pairs, ["lines 250 - 259"], ["lines 2-101"])  # any range of lines names a group
    assert [p.line for p in valid] == list(range(250, 260)) and {p.group for p in valid} == {"lines 250-259"}


@pytest.mark.parametrize("n, ref", [(300, None), (300, "Genesis"), (3_400, None), (31_032, None)],
                         ids=["300 lines", "one book", "3400 lines", "31032 lines"])
def test_held_out_is_a_few_percent_in_blocks_of_lines(tmp_path, n, ref):
    pairs, _ = read_pairs(plain_pairs(tmp_path / "p.tsv", n, ref))
    train, valid, test = split_pairs(pairs)
    share = round(0.03 * n)
    assert all(share / 2 <= len(held) < 2 * share for held in (valid, test))
    assert len(train) + len(valid) + len(test) == n and not {p.line for p in train} & {p.line for p in valid + test}
    for held in (valid, test):
        for group in {p.group for p in held}:  # each a block of neighbouring lines that its label names
            lines = [p.line for p in held if p.group == group]
            first, last = map(int, re.fullmatch(r"lines (\d+)-(\d+)", group).groups())
            assert lines == list(range(first, min(last, n + 1) + 1)) and len(lines) <= 100
    assert (train, valid, test) == split_pairs(pairs) and (valid, test) != split_pairs(pairs, seed=1)[1:]
    again = split_pairs(pairs, sorted({p.group for p in valid}), sorted({p.group for p in test}))
    assert again == (train, valid, test)  # the labels, typed, give the same split


def test_whole_groups_are_held_out_when_they_are_small(tmp_path):
    """40 books of 25 verses: whole books, one to each split (a share is 30 verses)."""
    path = tmp_path / "books.tsv"
    path.write_text("ref\tes\ten\n" + "".join(f"Book{i // 25} 1:{i}\tuno {i}\tone {i}\n" for i in range(1000)))
    train, valid, test = split_pairs(read_pairs(path)[0])
    assert len(valid) == len(test) == 25 and len({p.group for p in valid + test}) == 2
    assert not {p.group for p in train} & {p.group for p in valid + test}


def test_one_split_named_the_other_dealt_from_the_rest(tmp_path):
    pairs, _ = read_pairs(toy_pairs(tmp_path / "p.tsv"))
    for valid_groups, test_groups in [(["Book4"], None), (None, ["Book4"])]:
        train, valid, test = split_pairs(pairs, valid_groups, test_groups)
        named, dealt = (valid, test) if valid_groups else (test, valid)
        assert {p.group for p in named} == {"Book4"} and len(named) == 40
        assert 4 <= len(dealt) < 14 and "Book4" not in {p.group for p in dealt}


@pytest.mark.parametrize("content, words", [
    ("", "is empty"),
    ("only\n", "at least two columns"),
    ("ref\tes\ten\nGenesis 1:1\tsolo dos\n", "line 2: 2 fields, the header has 3"),
    ("ref\tes\ten\n", "holds no pairs"),
    ("ref\tes\ten\nGenesis 1:1\t\tIn the beginning\n", r"holds no pairs \(1 rows have an empty es or en cell\)"),
    ("es\tes\nuno\tone\n", "the source and target columns are both 'es'"),
])
def test_bad_pair_files_are_clear_errors(tmp_path, content, words):
    path = tmp_path / "bad.tsv"
    path.write_text(content)
    with pytest.raises(InputFileError, match=words):
        read_pairs(path)


@pytest.mark.parametrize("source, target", [("en", "en"), ("es", "es"), (None, "es")])
def test_source_and_target_columns_must_differ(tmp_path, source, target):
    with pytest.raises(InputFileError, match=f"the source and target columns are both '{target}'"):
        read_pairs(toy_pairs(tmp_path / "p.tsv"), source_column=source, target_column=target)


def test_rows_with_an_empty_cell_are_skipped_and_counted(tmp_path):
    path = tmp_path / "p.tsv"
    path.write_text("ref\tes\ten\nG 1:1\tuno\tone\nG 1:2\t \ttwo\n\nG 1:3\ttres\t\nG 1:4\tcuatro\tfour\n")
    pairs, skipped = read_pairs(path)
    assert [(p.source, p.target, p.line) for p in pairs] == [("uno", "one", 2), ("cuatro", "four", 6)]
    assert skipped == 2


def test_bad_columns_and_groups(tmp_path):
    path = toy_pairs(tmp_path / "p.tsv")
    with pytest.raises(InputFileError, match="no column 'fr'; the header has ref, es, en"):
        read_pairs(path, source_column="fr")
    pairs, _ = read_pairs(path)
    with pytest.raises(ValueError, match="no group 'Exodus' in the data; its groups are Book0, Book1, Book2, "
                                         "Book3, Book4, Book5;"):
        split_pairs(pairs, ["Exodus"], ["Book5"])
    with pytest.raises(ValueError, match="both validation and test"):
        split_pairs(pairs, ["Book5"], ["Book5"])


@pytest.mark.parametrize("name, words", [("lines 2-", "'lines 2-'"), ("lines 5000-6000", "'lines 5000-6000'")])
def test_unknown_group_lists_the_first_groups(tmp_path, name, words):
    pairs, _ = read_pairs(plain_pairs(tmp_path / "plain.tsv", 1000))
    with pytest.raises(ValueError, match=f"no group {words} in the data; its groups are lines 2-101, lines "
                                         "102-201, lines 202-301, lines 302-401, lines 402-501, lines 502-601 "
                                         "and 4 more; a range of lines"):
        split_pairs(pairs, [name], ["lines 2-101"])


@pytest.mark.parametrize("n, valid_groups, test_groups", [
    (1, None, None), (2, None, None), (3, None, None),  # too few pairs to hold any out
    (400, ["lines 2-101"], ["lines 102-201", "lines 202-301"]),  # the named groups hold most of the file
])
def test_a_tiny_training_split_is_refused_with_the_fix(tmp_path, n, valid_groups, test_groups):
    pairs, _ = read_pairs(plain_pairs(tmp_path / "p.tsv", n))
    with pytest.raises(ValueError, match="too few to train on most.*give a file with more pairs, or name smaller"):
        split_pairs(pairs, valid_groups, test_groups)


@pytest.mark.skipif(not SHARED_PAIRS.exists(), reason="the shared Bible corpus is not here")
def test_bible_books_are_held_out_whole():
    from ctxvec.translate.data import BIBLE_TEST_BOOKS, BIBLE_VALID_BOOKS

    pairs, skipped = read_pairs(SHARED_PAIRS)
    train, valid, test = split_pairs(pairs, BIBLE_VALID_BOOKS, BIBLE_TEST_BOOKS)
    assert len(pairs) == 31_032 and skipped == 0 and (len(valid), len(test)) == (287, 351)
    assert {p.group for p in test} == set(BIBLE_TEST_BOOKS)
    assert not {p.group for p in train} & set(BIBLE_VALID_BOOKS + BIBLE_TEST_BOOKS)


def test_trainer_says_what_it_trains_on_and_holds_out(tmp_path):
    path = plain_pairs(tmp_path / "p.tsv", 300)
    path.write_text(path.read_text() + "\tempty source\nempty target\t\n")
    cfg = TranslationConfig(steps=1, **{**TINY, "valid_groups": None, "test_groups": None})
    trainer = TranslationTrainer(path, tmp_path / "run", cfg, preset=tiny_model_config(tmp_path), progress=False)
    d = trainer.describe()
    assert (d["train_pairs"], d["valid_pairs"], d["test_pairs"], d["skipped_empty_pairs"]) == (282, 9, 9, 2)
    [valid] = d["held_out"]["valid"]
    assert trainer.data_summary() == (
        f"training on 282 pairs; held out for validation: 9 pairs ({valid}); for the test: 9 pairs "
        f"({d['held_out']['test'][0]})\nskipped 2 rows with an empty source or target cell")


def test_joint_bpe_decodes_to_the_exact_text():
    texts = ["In the beginning, God created “the heavens”.", "EN el principio crió Dios los cielos y la tierra."]
    tok = Tokenizer.train(texts=texts * 30, vocab_size=300, lowercase=False, kind="bpe")
    for text in texts:
        assert tok.decode(tok.tokenize([text])[0].ids) == text
    with pytest.raises(ValueError, match="kind must be"):
        Tokenizer.train(texts=texts, kind="unigram")


def test_sacrebleu_scores_and_signature():
    perfect = score_translations(["the dog eats bread ."], ["the dog eats bread ."])
    assert perfect["bleu"] == pytest.approx(100) and perfect["chrf"] == pytest.approx(100)
    assert "nrefs:1" in perfect["bleu_signature"] and "tok:13a" in perfect["bleu_signature"]
    assert score_translations(["a b c d"], ["w x y z"])["bleu"] == 0


# ---- tied weights are saved once and loaded everywhere --------------------------------------

def test_tied_weights_round_trip():
    model = Translator(Seq2SeqConfig(tiny_config(), tie_embeddings=True, share_embeddings=True))
    aliases = tied_aliases(model)
    assert set(aliases.values()) == {"encoder.embeddings.tokens.weight"}
    state = unique_state(model)
    assert not set(aliases) & set(state)
    copy = Translator(Seq2SeqConfig(tiny_config(), tie_embeddings=True, share_embeddings=True))
    copy.load_state_dict(with_aliases(state, copy), strict=True)
    assert copy.output.weight is copy.encoder.embeddings.tokens.weight
    assert torch.equal(copy.output.weight, model.output.weight)


# ---- training -----------------------------------------------------------------------------

def test_training_learns_the_toy_language_and_the_run_translates(tmp_path):
    pairs = toy_pairs(tmp_path / "p.tsv")
    cfg = TranslationConfig(steps=100, **{**TINY, "lr": 1e-2, "eval_every": 50})
    trainer = TranslationTrainer(pairs, tmp_path / "run", cfg, preset=tiny_model_config(tmp_path), progress=False)
    first = trainer.evaluate()
    last = trainer.run()
    assert last["eval_loss"] < first["eval_loss"] - 1.0
    assert last["eval_bleu"] > first["eval_bleu"] + 20  # sacrebleu on held-out "books"
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["held_out"] == {"valid": ["Book4"], "test": ["Book5"]}
    translator = load_translator(tmp_path / "run")
    [out] = translator.translate(["el perro come pan"], beam_size=3)
    assert out.split()[:2] == ["the", "dog"]
    result = CliRunner().invoke(main, ["translate", "el gato bebe agua", "--model", str(tmp_path / "run"),
                                       "--beam", "2"])
    assert result.exit_code == 0 and "->" in result.output


def test_training_batches_come_in_one_shape_per_width(tmp_path):
    """Source and target share a width (a multiple of LENGTH_MULTIPLE) and the budget's row
    count at that width (or a power of two for a short batch), so a bf16 CPU run compiles few
    oneDNN kernels; the loss counts only the pairs' real target tokens."""
    from ctxvec.engine.batching import LENGTH_MULTIPLE

    pairs = toy_pairs(tmp_path / "p.tsv")
    cfg = TranslationConfig(steps=1, **TINY)
    trainer = TranslationTrainer(pairs, tmp_path / "run", cfg, preset=tiny_model_config(tmp_path), progress=False)
    shapes, targets = set(), 0
    for b in trainer.epoch_batches(0):
        src, src_mask, tgt, tgt_mask = trainer._pad([trainer.train_encoded[i] for i in b])
        assert src.shape == tgt.shape and src.shape[1] % LENGTH_MULTIPLE == 0
        rows, width = src.shape
        assert rows == trainer.micro_tokens // width or (rows >= len(b) and rows & (rows - 1) == 0)
        assert src_mask[len(b):].eq(0).all() and tgt_mask[len(b):].eq(0).all()
        assert trainer.count((src, src_mask, tgt, tgt_mask)) == sum(len(trainer.train_encoded[i][1].ids) - 1 for i in b)
        shapes.add(tuple(src.shape))
        targets += len(b)
    assert targets == len(trainer.train_encoded)
    assert len(shapes) < 2 * len({w for _, w in shapes})  # about one row count per width


def test_exact_resume(tmp_path):
    pairs = toy_pairs(tmp_path / "p.tsv")
    config = tiny_model_config(tmp_path)
    common = dict(preset=config, progress=False)
    TranslationTrainer(pairs, tmp_path / "straight", TranslationConfig(steps=8, **TINY), **common).run()
    TranslationTrainer(pairs, tmp_path / "resumed", TranslationConfig(steps=3, **TINY), **common).run()
    TranslationTrainer(pairs, tmp_path / "resumed", TranslationConfig(steps=8, **TINY), resume=True, **common).run()

    def losses(run: Path) -> list[float]:
        return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]

    assert losses(tmp_path / "straight") == losses(tmp_path / "resumed")  # bit for bit
    a, b = load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / "resumed")
    assert all(torch.equal(a[1]["model"][k], b[1]["model"][k]) for k in a[1]["model"])


def test_translate_cli_file_mode_and_errors(tmp_path):
    pairs = toy_pairs(tmp_path / "p.tsv")
    TranslationTrainer(pairs, tmp_path / "run", TranslationConfig(steps=2, **TINY),
                       preset=tiny_model_config(tmp_path), progress=False).run()
    src = tmp_path / "in.txt"
    src.write_text("el perro\nun gato rojo\n")
    out = tmp_path / "out.txt"
    result = CliRunner().invoke(main, ["translate", "--file", str(src), "-o", str(out), "--model", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert len(out.read_text().splitlines()) == 2
    for args, words in [(["translate", "x", "--model", str(tmp_path)], "not a translation model"),
                        (["translate", "--model", str(tmp_path / "run")], "give TEXTS or --file"),
                        (["train-translation", str(tmp_path / "missing.tsv"), "--out", str(tmp_path / "r")],
                         "no such file")]:
        proc = subprocess.run([sys.executable, "-m", "ctxvec", *args], capture_output=True, text=True)
        assert proc.returncode != 0 and words in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_two_gloo_processes_equal_one(tmp_path):
    pairs = toy_pairs(tmp_path / "p.tsv")
    config = tiny_model_config(tmp_path)
    common = [str(pairs), "--config", config, "--steps", "4", "--batch-tokens", "512", "--seq-len", "32",
              "--warmup", "2", "--eval-every", "4", "--vocab-size", "120", "--eval-sentences", "4",
              "--valid-groups", "Book4", "--test-groups", "Book5", "--threads", "1"]
    one = subprocess.run([sys.executable, "-m", "ctxvec", "train-translation", *common, "--grad-accum", "2",
                          "--out", str(tmp_path / "one")], capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "ctxvec", "train-translation", *common, "--nproc", "2",
                          "--out", str(tmp_path / "two")], capture_output=True, text=True)
    assert two.returncode == 0, two.stderr

    def losses(run: Path) -> np.ndarray:
        return np.array([r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                         if "loss" in r])

    assert np.abs(losses(tmp_path / "one") - losses(tmp_path / "two")).max() < 1e-6
