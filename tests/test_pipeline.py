import numpy as np
import pytest
import torch

from conftest import threads_of_a_new_thread
from ctxvec.loading import load


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


def _tiny_pipeline():
    from conftest import tiny_config
    from ctxvec import Encoder, Pipeline
    from ctxvec.loading import seed_tokenizer

    tokenizer = seed_tokenizer(max_len=40)
    return Pipeline(tokenizer, Encoder(tiny_config(vocab_size=tokenizer.vocab_size)))


def _texts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    words = ["light", "the", "earth", "and", "waters", "day", "night", "god", "saw", "good"]
    return [" ".join(rng.choice(words, size=rng.integers(1, 30))) for _ in range(n)]


def _batch_shapes(pipeline, texts, **options) -> tuple[np.ndarray, list[tuple[int, int]]]:
    shapes = []
    hook = pipeline.encoder.register_forward_hook(lambda m, args, out: shapes.append(tuple(args[0].shape)))
    try:
        return pipeline.embed(texts, **options), shapes
    finally:
        hook.remove()


def test_batches_come_in_few_shapes_and_padding_changes_no_vector():
    """Widths are multiples of LENGTH_MULTIPLE and rows the budget's or a power of two, so
    oneDNN compiles few attention kernels; the vectors equal those of texts embedded alone."""
    from ctxvec.engine.batching import LENGTH_MULTIPLE

    pipeline, texts = _tiny_pipeline(), _texts(300)
    together, shapes = _batch_shapes(pipeline, texts, batch_tokens=128)
    assert all(width % LENGTH_MULTIPLE == 0 for _, width in shapes)
    assert all(rows == 128 // width or rows & (rows - 1) == 0 for rows, width in shapes)
    assert len(set(shapes)) < len(shapes) / 3
    alone = np.stack([pipeline.embed([t])[0] for t in texts[:20]])
    assert np.abs(together[:20] - alone).max() < 1e-5


@pytest.mark.parametrize("multiple", [1, 16])
def test_widths_the_fused_attention_takes_are_aligned_to_its_blocks_and_change_no_vector(monkeypatch, multiple):
    """Where the fused attention kernel runs (here, as on an AMX Xeon, from a width of 16 in
    fp32) a batch's width is a multiple of its blocks; below it, of LENGTH_MULTIPLE. The same
    vectors either way, and as texts embedded alone."""
    import ctxvec.engine.attention as attention_module
    from ctxvec.engine.batching import LENGTH_MULTIPLE

    monkeypatch.setitem(attention_module.FUSED_CPU_MIN_SCORES, torch.float32, 16 * 16)
    monkeypatch.setattr(attention_module, "FUSED_CPU_WIDTH_MULTIPLE", multiple)
    pipeline, texts = _tiny_pipeline(), _texts(200)
    together, shapes = _batch_shapes(pipeline, texts, batch_tokens=256)
    widths = {width for _, width in shapes}
    assert any(w >= 16 for w in widths) and any(w < 16 for w in widths)
    assert all(w % (multiple if w >= 16 else LENGTH_MULTIPLE) == 0 for w in widths)
    if multiple == 1:  # without alignment some of those widths are not multiples of 16
        assert any(w >= 16 and w % 16 for w in widths)
    alone = np.stack([pipeline.embed([t])[0] for t in texts[:20]])
    assert np.abs(together[:20] - alone).max() < 1e-5


@pytest.mark.parametrize("batch_tokens", [10**6, 10**8])
def test_a_batch_has_as_many_rows_as_texts_whatever_the_budget(batch_tokens):
    """Before: a budget of 10^6 padded 20 texts to 25,000 rows (80 s, 12 GB), 10^8 to a 153 GB
    allocation. Now rows are the texts rounded up to a power of two."""
    pipeline, texts = _tiny_pipeline(), _texts(20)
    vectors, shapes = _batch_shapes(pipeline, texts, batch_tokens=batch_tokens)
    assert [rows for rows, _ in shapes] == [32]
    assert np.abs(vectors - pipeline.embed(texts)).max() < 1e-6


@pytest.mark.parametrize("make", [lambda t: (x for x in t), lambda t: np.array(t), tuple],
                         ids=["generator", "numpy", "tuple"])
def test_any_iterable_of_strings_is_embedded(seed, make):
    """Before: "wrap a single text in a list" for a numpy array of strings or a generator."""
    texts = ["my name is aj", "in the beginning"]
    assert np.array_equal(seed.embed(make(texts)), seed.embed(texts))
    assert [r.text for r in seed.encode(make(texts))] == texts


# How far a text's sentence vector may move with what else is in its batch (the README states
# it): batch size, budget and padding change the order of the floating-point sums, and in bf16 on
# AMX CPUs a batch's width may choose the other attention kernel.
BATCH_BOUND = {"fp32": 1e-6, "bf16": 3e-3}  # bf16 on AMX: 2.3e-3 measured (README)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_texts_vector_depends_on_its_batch_within_the_stated_bound(precision):
    pipeline = load("minilm", precision=precision)
    texts = _texts(120, seed=1) + ["", "a", "word " * 300]
    alone = np.stack([pipeline.embed([t])[0] for t in texts])
    variants = [pipeline.embed(texts, batch_tokens=b) for b in (64, 1024, 100_000)]
    variants.append(np.concatenate([pipeline.embed(texts[i:i + 7]) for i in range(0, len(texts), 7)]))
    worst = max(float(np.abs(v - alone).max()) for v in variants)
    print(f"\n{precision}: a text's vector moves at most {worst:.2e} with its batch")
    assert worst <= BATCH_BOUND[precision]


@pytest.mark.parametrize("streams", [1, 2, None])
def test_streams_change_no_vector_and_keep_the_callers_threads(streams, intra_op_threads):
    """Batches side by side (engine.streams) run the same batches: the same fp32 vectors."""
    pipeline, texts = _tiny_pipeline(), _texts(200, seed=2)
    intra_op_threads(2)
    pipeline.streams = 1  # the reference: one batch at a time
    reference = pipeline.embed(texts, batch_tokens=128)
    reference_tokens = pipeline.encode(texts[:50], batch_tokens=64)
    pipeline.streams = streams
    shapes = []
    vectors = pipeline.sentence_vectors(pipeline.tokenizer.tokenize(texts), 128, shapes.append).vectors
    tokens = pipeline.encode(texts[:50], batch_tokens=64)
    assert torch.get_num_threads() == 2 and threads_of_a_new_thread() == 2
    assert np.array_equal(vectors, reference)
    assert [t.tokens for t in tokens] == [t.tokens for t in reference_tokens]
    assert all(np.array_equal(a.vectors, b.vectors) for a, b in zip(tokens, reference_tokens))
    assert sum(s.texts for s in shapes) == len(texts) and len(shapes) > 4


@pytest.mark.parametrize("streams", [1, 2])
@pytest.mark.parametrize("stop_early", [False, True], ids=["whole call", "caller stops early"])
def test_a_calls_repacked_weights_are_freed_before_the_heap_is_trimmed(monkeypatch, streams, stop_early):
    """The weights repacked for one call are gone when the call hands freed memory back, also when
    its caller stops reading early; else they stay resident after every call."""
    import weakref

    import ctxvec.pipeline as pipeline_module

    copies, alive_at_trim = [], []
    repack_weights = pipeline_module.repack_weights

    def repack(encoder):
        weights = repack_weights(encoder)
        copies.extend(weakref.ref(w) for w in weights.values())
        return weights

    monkeypatch.setattr(pipeline_module, "repack_weights", repack)
    monkeypatch.setattr(pipeline_module, "release_memory", lambda min_interval: alive_at_trim.append(
        (sum(ref() is not None for ref in copies), min_interval)))
    pipeline, texts = _tiny_pipeline(), _texts(200, seed=3)
    pipeline.streams = streams
    batches = pipeline.sentence_vector_batches(pipeline.tokenizer.tokenize(texts), 64)
    if stop_early:
        next(batches)
        batches.close()
    else:
        assert sum(len(indices) for indices, _ in batches) == len(texts)
    assert copies and alive_at_trim == [(0, 0.0)]  # trimmed at once, whenever the last trim was


@pytest.mark.parametrize("texts, interval", [(1, "TRIM_INTERVAL"), (200, 0.0)], ids=["one text", "a long call"])
def test_short_calls_trim_the_heap_at_most_once_an_interval(monkeypatch, texts, interval):
    """A trim costs ~1.5 ms: a call of one or two batches (no weight copies freed) asks for one
    only if the last was TRIM_INTERVAL ago; a call that freed its copies trims whatever the time."""
    import ctxvec.pipeline as pipeline_module

    asked = []
    monkeypatch.setattr(pipeline_module, "release_memory", asked.append)
    pipeline = _tiny_pipeline()
    pipeline.embed(_texts(texts, seed=4), batch_tokens=64)
    want = pipeline_module.TRIM_INTERVAL if interval == "TRIM_INTERVAL" else interval
    assert asked == [want] and pipeline_module.TRIM_INTERVAL > 0


@pytest.mark.parametrize("amx", [True, False])
def test_the_default_budget_is_the_precisions_on_this_cpu(monkeypatch, amx):
    """bf16 on a CPU with AMX batches 2048 tokens (measured faster there), everything else 1024;
    a call's own budget still wins, and the default is the one a call without one uses."""
    import ctxvec.engine.batching as batching

    monkeypatch.setattr(batching, "cpu_has_amx", lambda: amx)
    assert batching.default_batch_tokens(torch.float32) == batching.DEFAULT_BATCH_TOKENS == 1024
    assert batching.default_batch_tokens(torch.bfloat16, "cuda") == 1024
    assert batching.default_batch_tokens(torch.bfloat16) == (2048 if amx else 1024)
    pipeline, texts = _tiny_pipeline(), _texts(200)
    assert pipeline.batch_tokens == 1024
    pipeline.encoder.to(torch.bfloat16)
    assert pipeline.batch_tokens == (2048 if amx else 1024)
    pipeline.encoder.float()
    monkeypatch.setattr(batching, "DEFAULT_BATCH_TOKENS", 128)  # a small default, to see it used
    _, default_shapes = _batch_shapes(pipeline, texts)
    _, shapes_128 = _batch_shapes(pipeline, texts, batch_tokens=128)
    # (streams may finish the batches in another order)
    assert sorted(default_shapes) == sorted(shapes_128) and all(rows * width <= 128 for rows, width in shapes_128)


def test_packed_rows_come_in_buckets_that_coarsen_with_the_rows():
    """Up to 1,024 rows every multiple of 32; above, steps of 64: at most 48 row counts up to 2,048
    (oneDNN keeps a kernel per shape), spare rows under 1/16 of the rows there."""
    from ctxvec.engine.packing import bucket_rows

    buckets = [bucket_rows(n, 32) for n in range(1, 2049)]
    assert all(b >= n and b % 32 == 0 for n, b in enumerate(buckets, start=1))
    assert len(set(buckets[:1024])) == 32 and len(set(buckets)) == 48
    assert all((b - n) / n < 1 / 16 for n, b in enumerate(buckets, start=1) if n > 1024)
    assert [bucket_rows(n, 1) for n in (1, 7, 1500)] == [1, 7, 1500] and bucket_rows(0, 32) == 0
