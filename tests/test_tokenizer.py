from pathlib import Path

import pytest
import torch

from ctxvec.models import seed_tokenizer
from ctxvec.tokenizer import SPECIAL_TOKENS, Tokenizer, TruncationError

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


def test_save_and_load_round_trip(tok, tmp_path):
    tok.save(tmp_path)
    again = Tokenizer.load(tmp_path, max_len=16)
    texts = ["God created light", "unknownword zzz"]
    a, b = tok.encode_batch(texts), again.encode_batch(texts)
    assert torch.equal(a.input_ids, b.input_ids) and a.tokens == b.tokens


def test_decode_inverts_encode_up_to_normalisation(tok):
    batch = tok.encode_batch(["God said, let there be light"])
    assert tok.decode(batch.input_ids[0].tolist()) == "god said, let there be light"


@pytest.mark.parametrize("bad, error", [("a string", TypeError), ([1, 2], TypeError),
                                        (["ok", None], TypeError), (["\ud800"], ValueError)])
def test_bad_texts_are_clear_errors(tok, bad, error):
    with pytest.raises(error):
        tok.encode_batch(bad)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
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
    """Retraining on the stated corpus gives the same pieces for every frequent word."""
    fresh = Tokenizer.train([SHARED_WEB], vocab_size=8000, min_frequency=2)
    shipped = seed_tokenizer()
    words = SHARED_WEB.read_text(encoding="utf-8").split()[:5000]
    assert fresh.encode_batch(words).tokens == shipped.encode_batch(words).tokens
