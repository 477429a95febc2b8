import numpy as np
import pytest
import torch

from ctxvec.models import load


@pytest.fixture(scope="module")
def seed():
    return load("seed")


def test_seed_model_is_the_seed_architecture(seed):
    c = seed.encoder.config
    assert (c.d_model, c.n_heads, c.d_ff, c.n_layers, c.norm_first, c.position, c.activation) == (
        512, 8, 1024, 12, False, "sinusoidal", "relu")
    assert c.vocab_size == seed.tokenizer.vocab_size == 8000


def test_seed_weights_are_deterministic_and_leave_global_rng_alone(seed):
    state = torch.random.get_rng_state()
    again = load("seed")
    assert torch.equal(torch.random.get_rng_state(), state)
    a = seed.encoder.state_dict()
    b = again.encoder.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_encode_returns_one_vector_per_token_in_input_order(seed):
    texts = ["my name is aj", "a", "the heavens and the earth were finished"]
    results = seed.encode(texts, batch_tokens=20)
    assert [r.text for r in results] == texts
    for r in results:
        assert r.vectors.shape == (len(r.tokens), 512) and r.vectors.dtype == np.float32
        assert r.special[0] and r.special[-1] and not any(r.special[1:-1])
        assert not r.truncated
    alone = seed.encode([texts[2]])[0]
    np.testing.assert_allclose(alone.vectors, results[2].vectors, atol=1e-5)


def test_long_text_is_truncated_and_says_so(seed):
    result = seed.encode(["word " * 600])[0]
    assert result.truncated and len(result.tokens) == 512 and result.n_tokens_full == 602
    with pytest.raises(ValueError, match="more than max_len=512"):
        seed.encode(["word " * 600], strict=True)


@pytest.mark.parametrize("batch_tokens", [0, -3, 1.5, True])
def test_bad_batch_tokens(seed, batch_tokens):
    with pytest.raises(ValueError, match="batch_tokens"):
        seed.encode(["x"], batch_tokens=batch_tokens)


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(ValueError, match="known models: minilm, seed"):
        load("gpt-17")


def test_batches_come_in_few_shapes_and_padding_changes_no_vector():
    """Widths are multiples of LENGTH_MULTIPLE and each width has one row count (the budget's),
    so oneDNN compiles few attention kernels; the vectors equal those of texts embedded alone."""
    from conftest import tiny_config
    from ctxvec import Encoder, Pipeline
    from ctxvec.models import seed_tokenizer
    from ctxvec.pipeline import LENGTH_MULTIPLE

    tokenizer = seed_tokenizer(max_len=40)
    pipeline = Pipeline(tokenizer, Encoder(tiny_config(vocab_size=tokenizer.vocab_size)))
    rng = np.random.default_rng(0)
    words = ["light", "the", "earth", "and", "waters", "day", "night", "god", "saw", "good"]
    texts = [" ".join(rng.choice(words, size=rng.integers(1, 30))) for _ in range(300)]
    shapes = []
    hook = pipeline.encoder.register_forward_hook(lambda m, args, out: shapes.append(tuple(args[0].shape)))
    try:
        together = pipeline.embed(texts, batch_tokens=128)
    finally:
        hook.remove()
    assert all(width % LENGTH_MULTIPLE == 0 for _, width in shapes)
    assert len(set(shapes)) == len({width for _, width in shapes}) < len(shapes) / 3
    alone = np.stack([pipeline.embed([t])[0] for t in texts[:20]])
    assert np.abs(together[:20] - alone).max() < 1e-5
