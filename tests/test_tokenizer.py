import subprocess
import sys
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch

from ctxvec.loading import seed_tokenizer
from ctxvec.tokenizer import SPECIAL_TOKENS, EmptyTextError, Tokenizer, TruncationError

CORPUS = [
    "In the beginning God created the heavens and the earth.",
    "The earth was formless and empty.",
    "God said, let there be light, and there was light.",
] * 20
SHARED_WEB = Path(__file__).resolve().parents[2] / "shared" / "data" / "web_en.txt"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(texts=CORPUS, vocab_size=120, min_frequency=1, max_len=16)


def test_trained_tokenizer_has_special_tokens_first(tok):
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert tok.pad_id == 0 and tok.n_special == 2


def test_batch_is_padded_to_the_longest_with_a_mask(tok):
    batch = tok.encode_batch(["God said light", "the earth", ""])
    assert batch.input_ids.dtype == torch.int64 and batch.attention_mask.dtype == torch.int64
    assert batch.input_ids.shape == batch.attention_mask.shape == (3, max(batch.n_tokens))
    for row in range(3):
        n = batch.n_tokens[row]
        assert batch.attention_mask[row].tolist() == [1] * n + [0] * (batch.input_ids.shape[1] - n)
        assert batch.input_ids[row, n:].eq(tok.pad_id).all()
        assert batch.tokens[row][0] == "[CLS]" and batch.tokens[row][-1] == "[SEP]"
        assert batch.special_tokens_mask[row][0] == 1 and batch.special_tokens_mask[row][-1] == 1
    assert batch.tokens[2] == ["[CLS]", "[SEP]"]  # an empty text is still a valid sequence
    assert batch.truncated == [False, False, False]


def test_padding_to_a_shape_adds_rows_of_padding(tok):
    encoded = tok.tokenize(["God said light", "the earth"])
    batch = tok.pad(encoded, length=8, rows=4)
    assert batch.input_ids.shape == batch.attention_mask.shape == (4, 8)
    assert batch.attention_mask[2:].eq(0).all() and batch.input_ids[2:].eq(tok.pad_id).all()
    assert torch.equal(batch.input_ids[:2, :5], tok.pad(encoded).input_ids[:, :5])
    assert len(batch.tokens) == len(batch.n_tokens) == 2  # per-text lists: the texts only
    with pytest.raises(ValueError, match="cannot pad 2 encodings to 1 rows"):
        tok.pad(encoded, rows=1)


def test_padding_to_max_length(tok):
    batch = tok.encode_batch(["the earth"], padding="max_length", max_len=12)
    assert batch.input_ids.shape == (1, 12)


def test_truncation_is_reported_per_text(tok):
    long_text = " ".join(["the earth was formless"] * 10)
    batch = tok.encode_batch(["light", long_text])
    assert batch.truncated == [False, True]
    assert batch.n_tokens[1] == 16 and batch.n_tokens_full[1] > 16
    assert batch.tokens[1][-1] == "[SEP]"  # special tokens survive truncation
    assert batch.n_tokens_full[0] == batch.n_tokens[0]


def test_strict_mode_raises_instead_of_truncating(tok):
    with pytest.raises(TruncationError, match="text 1 has .* tokens, more than max_len=16"):
        tok.encode_batch(["light", " ".join(["earth"] * 40)], strict=True)


@pytest.mark.parametrize("blank", ["", "   \t ", "\x00\x00", "\u200b\x01"])
def test_strict_mode_refuses_a_text_without_tokens(tok, blank):
    assert tok.tokenize(["light", blank])[1].tokens == ["[CLS]", "[SEP]"]  # not strict: accepted
    with pytest.raises(EmptyTextError, match="text 1 has no tokens"):
        tok.tokenize(["light", blank], strict=True)


@pytest.mark.parametrize("make", [
    lambda: (t for t in ["God said light", "the earth"]),
    lambda: np.array(["God said light", "the earth"]),
    lambda: ("God said light", "the earth"),
    lambda: {"God said light": 1, "the earth": 2}.keys(),
], ids=["generator", "numpy", "tuple", "dict keys"])
def test_any_iterable_of_strings_is_accepted(tok, make):
    assert tok.encode_batch(make()).tokens == tok.encode_batch(["God said light", "the earth"]).tokens


def test_training_twice_gives_the_same_file_byte_for_byte(tmp_path):
    """In two processes (the library's trainer numbered pieces in per-process hash order)."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(" ".join(f"w{(i * j) % 97}x{j % 13}" for j in range(12)) for i in range(400)))
    for name in ("a", "b"):
        subprocess.run([sys.executable, "-m", "ctxvec", "train-tokenizer", str(corpus), "-o", str(tmp_path / name),
                        "--vocab-size", "300"], check=True, capture_output=True)
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("content", [b"", b"\n\n  \n", b"\x00\x01\n"], ids=["empty", "blank", "control"])
def test_training_on_text_without_words_is_refused(tmp_path, content):
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(content)
    with pytest.raises(ValueError, match="holds no words"):
        Tokenizer.train([corpus], vocab_size=100)


def test_training_on_a_file_that_is_not_utf8_names_the_file_and_line(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(b"good line\n" * 3 + b"caf\xe9\n")
    with pytest.raises(ValueError, match=r"corpus.txt, line 4: not valid UTF-8"):
        Tokenizer.train([corpus], vocab_size=100)


def test_save_and_load_round_trip(tok, tmp_path):
    tok.save(tmp_path)
    again = Tokenizer.load(tmp_path, max_len=16)
    texts = ["God created light", "unknownword zzz"]
    a, b = tok.encode_batch(texts), again.encode_batch(texts)
    assert torch.equal(a.input_ids, b.input_ids) and a.tokens == b.tokens


def test_decode_inverts_encode_up_to_normalisation(tok):
    batch = tok.encode_batch(["God said, let there be light"])
    assert tok.decode(batch.input_ids[0].tolist()) == "god said, let there be light"


@pytest.mark.parametrize("bad, error", [("a string", TypeError), (b"bytes", TypeError), (5, TypeError),
                                        ([1, 2], TypeError), (["ok", None], TypeError),
                                        (np.array("one"), TypeError), (["\ud800"], ValueError)])
def test_bad_texts_are_clear_errors(tok, bad, error):
    with pytest.raises(error):
        tok.encode_batch(bad)


def test_load_errors(tmp_path):
    with pytest.raises(ValueError, match="nope.json: no such file"):
        Tokenizer.load(tmp_path / "nope.json")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        Tokenizer.load(tmp_path)


def test_shipped_seed_tokenizer():
    tok = seed_tokenizer()
    assert tok.vocab_size == 8000
    batch = tok.encode_batch(["In the beginning, God created the heavens and the earth."])
    assert tok.id_to_token(1) == "[UNK]" and 1 not in batch.input_ids[0].tolist()
    assert batch.tokens[0][1:4] == ["in", "the", "beginning"]


@pytest.mark.skipif(not SHARED_WEB.is_file(), reason="the shared corpus is not beside this checkout")
@pytest.mark.slow
def test_shipped_seed_tokenizer_is_reproducible_from_its_corpus(tmp_path):
    """Retraining on the stated corpus, as assets/README.md says, gives the shipped file byte for byte."""
    Tokenizer.train([SHARED_WEB], vocab_size=8000, min_frequency=2).save(tmp_path / "tokenizer.json")
    shipped = resources.files("ctxvec") / "assets" / "seed_tokenizer.json"
    assert (tmp_path / "tokenizer.json").read_bytes() == shipped.read_bytes()


@pytest.mark.parametrize("kind", ["wordpiece", "bpe", "shipped"])
def test_tokens_are_the_librarys_own(kind):
    """``Encoded.tokens`` are read from the vocabulary by id (the batched call skips the
    library's offsets): the same strings as the library's own encoding, for unknown characters,
    special-token literals, continuation pieces and truncated texts alike."""
    tok = seed_tokenizer() if kind == "shipped" else Tokenizer.train(
        texts=CORPUS, vocab_size=120, min_frequency=1, max_len=16, kind=kind)
    texts = ["God said, let there be light.", "Ünïcödé ☃ 日本 [CLS] [SEP] x", "heavensearth formlessly",
             " ".join(CORPUS[:3])]
    encoded = tok.tokenize(texts, max_len=16)
    assert encoded[-1].truncated
    for text, e in zip(texts, encoded):
        own = tok.backend.encode(text, add_special_tokens=False)
        own.truncate(16 - tok.n_special)  # (a no-op for a short text)
        own = tok.backend.post_process(own)
        assert e.tokens == own.tokens and e.ids == own.ids
        assert e.special_tokens_mask == own.special_tokens_mask
