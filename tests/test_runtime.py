import pytest
import torch

from ctxvec.runtime import native_bf16, precision_dtype, release_memory, set_threads


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


def test_release_memory_is_safe_to_call():
    release_memory()
    release_memory()


# ---- the linear route (oneDNN at inference on CPUs, F.linear elsewhere) ---------------------

from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import numpy as np  # noqa: E402

from ctxvec.runtime import ONEDNN_ROW_MULTIPLE, linear, onednn_rows, repack_weights, using_repacked  # noqa: E402

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


def test_onednn_route_only_at_inference_on_cpu():
    layer = nn.Linear(8, 8)
    x = torch.randn(ONEDNN_ROW_MULTIPLE, 8)
    assert onednn_rows(x, layer.weight) == 1  # gradients wanted: F.linear, whose backward exists
    with torch.no_grad():
        expected = ONEDNN_ROW_MULTIPLE if torch.backends.mkldnn.is_available() else 1
        assert onednn_rows(x, layer.weight) == expected
        assert onednn_rows(x.double(), layer.weight.double()) == 1


def test_linear_trains_through_f_linear():
    layer = nn.Linear(8, 4)
    x = torch.randn(ONEDNN_ROW_MULTIPLE, 8, requires_grad=True)
    linear(x, layer, "gelu").sum().backward()
    assert x.grad is not None and layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_repacked_weights_give_the_same_numbers_and_only_inside_the_block(dtype):
    layer = nn.Linear(16, 24).to(dtype)
    x = torch.randn(ONEDNN_ROW_MULTIPLE, 16).to(dtype)
    with torch.inference_mode():
        plain = linear(x, layer, "gelu")
        repacked = repack_weights(layer)
        assert set(repacked) == ({layer} if onednn_rows(x, layer.weight) > 1 else set())
        with using_repacked(repacked):
            assert torch.equal(linear(x, layer, "gelu"), plain)
        with torch.no_grad():
            layer.weight.mul_(2.0)  # outside the block, the layer's own weight is read again
        assert torch.allclose(linear(x, layer).float(), F.linear(x, layer.weight, layer.bias).float(),
                              atol=1e-5 if dtype == torch.float32 else 1e-1)


def test_pipeline_embeddings_do_not_depend_on_repacking():
    """A call long enough to repack and one too short to give the same vectors, also after the
    weights changed in place by an optimizer that does not bump their version (fused AdamW)."""
    from conftest import tiny_config
    from ctxvec import Encoder, Pipeline
    from ctxvec.models import seed_tokenizer

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
