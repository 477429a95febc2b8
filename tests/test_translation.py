"""Translation: parallel TSV data, held-out groups, the joint BPE, training, translate."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ctxvec.checkpoint import load_checkpoint, tied_aliases, unique_state, with_aliases
from ctxvec.cli import main
from ctxvec.decoder import Seq2SeqConfig, Translator
from ctxvec.textfile import InputFileError
from ctxvec.tokenizer import Tokenizer
from ctxvec.translation import (
    TranslationConfig, TranslationTrainer, load_translator, read_pairs, score_translations, split_pairs)

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

def test_columns_groups_and_split(tmp_path):
    pairs = read_pairs(toy_pairs(tmp_path / "p.tsv"))
    assert len(pairs) == 240 and pairs[0].group == "Book0"
    assert pairs[0].target == " ".join(LEXICON[w] for w in pairs[0].source.split())
    train, valid, test = split_pairs(pairs, ["Book4"], ["Book5"])
    assert {p.group for p in valid} == {"Book4"} and {p.group for p in test} == {"Book5"}
    assert len(train) == 160 and not {p.group for p in train} & {"Book4", "Book5"}
    reverse = read_pairs(tmp_path / "p.tsv", source_column="en", target_column="es")
    assert reverse[0].source == pairs[0].target


def test_lines_without_refs_are_grouped_in_blocks(tmp_path):
    path = tmp_path / "plain.tsv"
    path.write_text("src\ttgt\n" + "".join(f"a{i}\tb{i}\n" for i in range(350)))
    pairs = read_pairs(path)
    assert len({p.group for p in pairs}) == 4  # blocks of 100 lines
    train, valid, test = split_pairs(pairs, fraction=0.25, seed=1)
    assert len(valid) and len(test) and len(train) + len(valid) + len(test) == 350


@pytest.mark.parametrize("content, words", [
    ("", "is empty"),
    ("only\n", "at least two columns"),
    ("ref\tes\ten\nGenesis 1:1\tsolo dos\n", "line 2: 2 fields, the header has 3"),
    ("ref\tes\ten\n", "holds no pairs"),
])
def test_bad_pair_files_are_clear_errors(tmp_path, content, words):
    path = tmp_path / "bad.tsv"
    path.write_text(content)
    with pytest.raises(InputFileError, match=words):
        read_pairs(path)


def test_bad_columns_and_groups(tmp_path):
    path = toy_pairs(tmp_path / "p.tsv")
    with pytest.raises(InputFileError, match="no column 'fr'; the header has ref, es, en"):
        read_pairs(path, source_column="fr")
    pairs = read_pairs(path)
    with pytest.raises(ValueError, match="not in the data: Exodus"):
        split_pairs(pairs, ["Exodus"], ["Book5"])
    with pytest.raises(ValueError, match="both validation and test"):
        split_pairs(pairs, ["Book5"], ["Book5"])


@pytest.mark.skipif(not SHARED_PAIRS.exists(), reason="the shared Bible corpus is not here")
def test_bible_books_are_held_out_whole():
    from ctxvec.translation import BIBLE_TEST_BOOKS, BIBLE_VALID_BOOKS

    pairs = read_pairs(SHARED_PAIRS)
    train, valid, test = split_pairs(pairs, BIBLE_VALID_BOOKS, BIBLE_TEST_BOOKS)
    assert len(pairs) == 31_032 and (len(valid), len(test)) == (287, 351)
    assert {p.group for p in test} == set(BIBLE_TEST_BOOKS)
    assert not {p.group for p in train} & set(BIBLE_VALID_BOOKS + BIBLE_TEST_BOOKS)


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
    count at that width, so a bf16 CPU run compiles few oneDNN kernels; the loss counts only
    the pairs' real target tokens."""
    from ctxvec.pipeline import LENGTH_MULTIPLE

    pairs = toy_pairs(tmp_path / "p.tsv")
    cfg = TranslationConfig(steps=1, **TINY)
    trainer = TranslationTrainer(pairs, tmp_path / "run", cfg, preset=tiny_model_config(tmp_path), progress=False)
    shapes, targets = set(), 0
    for b in trainer.epoch_batches(0):
        src, src_mask, tgt, tgt_mask = trainer._pad([trainer.train_encoded[i] for i in b])
        assert src.shape == tgt.shape and src.shape[1] % LENGTH_MULTIPLE == 0
        assert src.shape[0] == max(len(b), trainer.micro_tokens // src.shape[1])
        assert src_mask[len(b):].eq(0).all() and tgt_mask[len(b):].eq(0).all()
        assert trainer.count((src, src_mask, tgt, tgt_mask)) == sum(len(trainer.train_encoded[i][1].ids) - 1 for i in b)
        shapes.add(tuple(src.shape))
        targets += len(b)
    assert targets == len(trainer.train_encoded)
    assert len(shapes) == len({w for _, w in shapes})  # one row count per width


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
