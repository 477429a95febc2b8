import pytest
import torch

from ctxvec.engine.runtime import native_bf16, precision_dtype, release_memory, set_threads


@pytest.mark.parametrize("bad", [0, -2, 1.5, True])
def test_threads_must_be_positive_integers(bad):
    with pytest.raises(ValueError, match="threads"):
        set_threads(bad)


def test_set_threads():
    before = torch.get_num_threads()
    try:
        set_threads(1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_precisions():
    assert precision_dtype("fp32") == torch.float32 and precision_dtype("bf16") == torch.bfloat16
    with pytest.raises(ValueError, match="unknown precision 'fp8'; choose one of fp32, bf16"):
        precision_dtype("fp8")
    assert isinstance(native_bf16(), bool)


def test_release_memory_trims_unless_it_did_within_min_interval():
    from ctxvec.engine.runtime import _libc

    if _libc() is None:
        assert release_memory() is False  # not glibc: nothing to trim
        return
    assert release_memory() is True
    assert release_memory(min_interval=3600.0) is False  # trimmed a moment ago
    assert release_memory() is True


# ---- the linear route (oneDNN at inference on CPUs, F.linear elsewhere) ---------------------

from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import numpy as np  # noqa: E402

from ctxvec.engine.linear import (  # noqa: E402
    ONEDNN_ROW_MULTIPLE, linear, linear_add, onednn_dtype, onednn_rows, packed_row_multiple, repack_weights)

ACTS = {None: lambda t: t, "relu": F.relu, "gelu": F.gelu}
DTYPES = [torch.float32] + ([torch.bfloat16] if native_bf16() else [])


def _reference(x, layer, activation):
    """The same affine map and activation in float64."""
    return ACTS[activation](F.linear(x.double(), layer.weight.double(), layer.bias.double()))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", [None, "relu", "gelu"])
@pytest.mark.parametrize("rows", [ONEDNN_ROW_MULTIPLE * 3, ONEDNN_ROW_MULTIPLE * 3 - 5], ids=["bucketed", "other"])
def test_linear_equals_f_linear_at_inference(dtype, activation, rows):
    layer = nn.Linear(48, 80).to(dtype)
    x = torch.randn(rows, 48).to(dtype)
    with torch.inference_mode():
        got = linear(x, layer, activation)
    expected = _reference(x, layer, activation)
    assert got.dtype == dtype and got.shape == (rows, 80)
    tol = 1e-5 if dtype == torch.float32 else 3e-2 * expected.abs().max().item()
    assert (got.double() - expected).abs().max().item() < tol


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("repacked", [False, True], ids=["weight", "repacked"])
@pytest.mark.parametrize("rows", [ONEDNN_ROW_MULTIPLE * 3, ONEDNN_ROW_MULTIPLE * 3 - 5], ids=["bucketed", "other"])
def test_linear_add_equals_the_residual_plus_the_linear(dtype, repacked, rows):
    """fp32: within rounding of the float64 sum. bf16: where oneDNN runs (bucketed rows) the add
    is fused and the sum rounded once, so every value is within one rounding of it (2^-8
    relative, with room for the fp32 accumulation; the unfused add misses that for hundreds of
    these values); elsewhere the product and then the sum are rounded."""
    torch.manual_seed(0)
    layer = nn.Linear(48, 80).to(dtype)
    x, residual = torch.randn(rows, 48).to(dtype), (4 * torch.randn(rows, 80)).to(dtype)
    with torch.inference_mode():
        got = linear_add(x, layer, residual, repack_weights(layer) if repacked else None)
        fused = onednn_rows(x, layer.weight) > 1 and rows % ONEDNN_ROW_MULTIPLE == 0
    expected = residual.double() + _reference(x, layer, None)
    assert got.dtype == dtype and got.shape == (rows, 80)
    if dtype == torch.float32:
        assert (got.double() - expected).abs().max().item() < 1e-5
    elif fused:
        assert ((got.double() - expected).abs() <= 2**-8 * expected.abs() + 1e-4).all()
    else:
        assert (got.double() - expected).abs().max().item() < 3e-2 * expected.abs().max().item()


@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
def test_the_engine_fuses_each_sublayers_residual_add_only_at_inference(training, monkeypatch):
    """At CPU inference every sub-layer's last projection adds the residual in oneDNN's kernel (2
    per encoder layer); in training the plain add after the dropout. Same output either way."""
    from conftest import tiny_config
    from ctxvec import Encoder
    import ctxvec.engine.linear as linear_module
    import ctxvec.engine.route as route_module

    if not onednn_dtype(torch.float32):
        pytest.skip("no oneDNN linear in this PyTorch build")
    torch.manual_seed(0)
    encoder = Encoder(tiny_config(dropout=0.0)).train(training)
    ids = torch.randint(5, encoder.config.vocab_size, (3, 9))
    mask = torch.tensor([[1] * 9, [1] * 4 + [0] * 5, [1] * 7 + [0] * 2])
    fused = []  # oneDNN linears run with the residual as a post-op
    onednn_linear = linear_module.onednn_linear
    monkeypatch.setattr(linear_module, "onednn_linear",
                        lambda *a: fused.append(len(a) > 4 and a[4] is not None) or onednn_linear(*a))
    with torch.inference_mode(not training):
        out = encoder(ids, mask).last_hidden_state
    assert sum(fused) == (0 if training else 2 * encoder.config.n_layers)
    monkeypatch.setattr(route_module.FastRoute, "residual_linear", route_module.Route.residual_linear)
    with torch.inference_mode(not training):
        plain = encoder(ids, mask).last_hidden_state
    assert (out - plain).abs().max().item() < 1e-5


def test_onednn_route_only_at_inference_on_cpu():
    layer = nn.Linear(8, 8)
    x = torch.randn(ONEDNN_ROW_MULTIPLE, 8)
    assert onednn_rows(x, layer.weight) == 1  # gradients wanted: F.linear, whose backward exists
    with torch.no_grad():
        expected = ONEDNN_ROW_MULTIPLE if torch.backends.mkldnn.is_available() else 1
        assert onednn_rows(x, layer.weight) == expected
        assert onednn_rows(x.double(), layer.weight.double()) == 1


def test_packed_rows_are_bucketed_wherever_onednn_runs_the_matrix_multiplies():
    """At inference on the oneDNN route and in CPU bf16 autocast (training): oneDNN keeps a
    kernel per shape, so the encoder's packed row counts come in multiples."""
    layer = nn.Linear(8, 8)
    x = torch.randn(4, 8)
    assert packed_row_multiple(x, layer.weight) == 1  # fp32 training: MKL, no kernel per shape
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert packed_row_multiple(x, layer.weight) == ONEDNN_ROW_MULTIPLE
    with torch.autocast("cpu", dtype=torch.float16):
        assert packed_row_multiple(x, layer.weight) == 1
    with torch.no_grad():
        assert packed_row_multiple(x, layer.weight) == onednn_rows(x, layer.weight)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_encoder_training_packs_rows_in_buckets_and_gives_the_same_gradients(autocast, monkeypatch):
    """The spare rows of a bucketed packing change neither the output nor the gradients."""
    from conftest import tiny_config
    from ctxvec import Encoder
    import ctxvec.engine.linear as runtime_module

    torch.manual_seed(0)
    encoder = Encoder(tiny_config(dropout=0.0))
    ids = torch.randint(5, encoder.config.vocab_size, (3, 9))
    mask = torch.tensor([[1] * 9, [1] * 4 + [0] * 5, [1] * 7 + [0] * 2])
    results = []
    for multiple in (1, ONEDNN_ROW_MULTIPLE):
        encoder.zero_grad()
        rows = []
        hook = encoder.stack.layers[0].register_forward_hook(lambda m, a, o: rows.append(o.hidden_state.shape[0]))
        monkeypatch.setattr(runtime_module, "ONEDNN_ROW_MULTIPLE", multiple)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = encoder(ids, mask).last_hidden_state
        hook.remove()
        (out.float() * mask[..., None]).square().sum().backward()
        assert rows == [20 if multiple == 1 or not autocast else multiple]  # 20 real tokens
        results.append((out.detach().float(), [p.grad.clone() for p in encoder.parameters()]))
    (out1, grads1), (out2, grads2) = results
    tol = 1e-6 if not autocast else 1e-2
    assert (out1 - out2).abs().max() < tol
    assert all(torch.allclose(a, b, atol=tol, rtol=tol) for a, b in zip(grads1, grads2))


def test_linear_trains_through_f_linear():
    layer = nn.Linear(8, 4)
    x = torch.randn(ONEDNN_ROW_MULTIPLE, 8, requires_grad=True)
    linear(x, layer, "gelu").sum().backward()
    assert x.grad is not None and layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_repacked_weights_give_the_same_numbers_and_only_where_given(dtype):
    layer = nn.Linear(16, 24).to(dtype)
    x = torch.randn(ONEDNN_ROW_MULTIPLE, 16).to(dtype)
    with torch.inference_mode():
        plain = linear(x, layer, "gelu")
        repacked = repack_weights(layer)
        assert set(repacked) == ({layer} if onednn_rows(x, layer.weight) > 1 else set())
        assert torch.equal(linear(x, layer, "gelu", repacked), plain)  # the repacked copy, given explicitly
        with torch.no_grad():
            layer.weight.mul_(2.0)  # without the copies, the layer's own weight is read again
        assert torch.allclose(linear(x, layer).float(), F.linear(x, layer.weight, layer.bias).float(),
                              atol=1e-5 if dtype == torch.float32 else 1e-1)


def test_pipeline_embeddings_do_not_depend_on_repacking():
    """A call long enough to repack and one too short to give the same vectors, also after the
    weights changed in place by an optimizer that does not bump their version (fused AdamW)."""
    from conftest import tiny_config
    from ctxvec import Encoder, Pipeline
    from ctxvec.loading import seed_tokenizer

    tokenizer = seed_tokenizer(max_len=40)
    pipeline = Pipeline(tokenizer, Encoder(tiny_config(vocab_size=tokenizer.vocab_size)))
    texts = [f"text number {i} " * (1 + i % 5) for i in range(40)]
    long_call = pipeline.embed(texts, batch_tokens=32)  # many batches: repacked weights
    short_calls = [pipeline.embed([t], batch_tokens=32)[0] for t in texts[:3]]
    assert all(np.allclose(a, b, atol=1e-6) for a, b in zip(long_call, short_calls))
    params = list(pipeline.encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=0.1, fused=True)
    pipeline.encoder.train()
    pipeline.encoder(*_ids(pipeline, texts[:2])).last_hidden_state.sum().backward()
    optimizer.step()
    pipeline.encoder.eval()
    after = pipeline.embed(texts, batch_tokens=32)
    assert not np.allclose(after, long_call, atol=1e-3)
    assert np.allclose(after[:3], [pipeline.embed([t], batch_tokens=32)[0] for t in texts[:3]], atol=1e-6)


def _ids(pipeline, texts):
    batch = pipeline.tokenizer.encode_batch(texts)
    return batch.input_ids, batch.attention_mask
