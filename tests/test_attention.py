import importlib
import math

import pytest
import torch
from torch.nn import functional as F

from ctxvec import MultiHeadSelfAttention, attention
from ctxvec.engine.attention import batched_attention
from ctxvec.engine.packing import TokenPacking
from ctxvec.engine.route import FastRoute, PackedRoute
from ctxvec.model.masks import causal_key_mask, key_mask_from

attention_module = importlib.import_module("ctxvec.engine.attention")


def _mask(lengths, T):
    return torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]  # (B, T) bool


def test_attention_function_is_softmax_of_scaled_scores():
    q, k, v = torch.randn(3, 2, 4, 5, 8).unbind(0)
    out, probs = attention(q, k, v)
    expected = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(8), dim=-1)
    assert torch.allclose(probs, expected, atol=1e-6)
    assert torch.allclose(out, expected @ v, atol=1e-6)


def test_probabilities_sum_to_one_over_real_keys_and_are_zero_on_padding():
    q, k, v = torch.randn(3, 2, 4, 6, 8).unbind(0)
    real = _mask([6, 3], 6)
    _, probs = attention(q, k, v, key_mask_from(real))
    assert torch.allclose(probs.sum(-1), torch.ones(2, 4, 6), atol=1e-6)
    assert torch.all(probs[1, :, :, 3:] == 0)


@pytest.mark.parametrize("lengths", [[7, 7], [7, 4], [7, 1], [7, 0]])
@pytest.mark.parametrize("training", [False, True])
def test_fused_and_eager_paths_agree(lengths, training):
    mha = MultiHeadSelfAttention(d_model=32, n_heads=4, dropout=0.0).train(training)
    x = torch.randn(2, 7, 32)
    key_mask = key_mask_from(_mask(lengths, 7))
    fused = mha(x, key_mask)
    eager = mha(x, key_mask, return_probabilities=True)
    assert fused.probabilities is None
    assert eager.probabilities.shape == (2, 4, 7, 7)
    assert torch.allclose(fused.output, eager.output, atol=1e-6)
    assert torch.isfinite(eager.output).all()


def test_matches_torch_multihead_attention_on_the_same_weights():
    mha = MultiHeadSelfAttention(d_model=32, n_heads=4, dropout=0.0).eval()
    ref = torch.nn.MultiheadAttention(32, 4, batch_first=True).eval()
    with torch.no_grad():
        ref.in_proj_weight.copy_(mha.qkv.weight)
        ref.in_proj_bias.copy_(mha.qkv.bias)
        ref.out_proj.weight.copy_(mha.out.weight)
        ref.out_proj.bias.copy_(mha.out.bias)
    x = torch.randn(3, 9, 32)
    real = _mask([9, 5, 2], 9)
    theirs, their_probs = ref(x, x, x, key_padding_mask=~real, average_attn_weights=False)
    ours = mha(x, key_mask_from(real), return_probabilities=True)
    assert torch.allclose(ours.output, theirs, atol=1e-6)
    assert torch.allclose(ours.probabilities, their_probs, atol=1e-6)


def test_heads_are_independent_slices_of_d_model():
    """Head h reads only columns h*Dh:(h+1)*Dh of Q, K and V: changing head 0's V leaves head 1."""
    mha = MultiHeadSelfAttention(d_model=8, n_heads=2, dropout=0.0).eval()
    x = torch.randn(1, 3, 8)
    before = mha(x, return_probabilities=True)
    with torch.no_grad():
        mha.qkv.weight[16:20] += 1.0  # V rows of head 0
    after = mha(x, return_probabilities=True)
    assert torch.equal(before.probabilities, after.probabilities)  # Q, K untouched
    assert not torch.allclose(before.output, after.output)


def _masks(B, T):
    real = _mask([T] + [max(1, T - 3 * i) for i in range(1, B)], T)
    return {"none": None, "padding": key_mask_from(real), "causal": causal_key_mask(real, T)}


@pytest.mark.parametrize("mask", ["none", "padding", "causal"])
@pytest.mark.parametrize("head_major", [False, True])
def test_batched_attention_equals_the_eager_function(mask, head_major):
    B, H, T, Dh = 3, 4, 9, 8
    q, k, v = torch.randn(3, B, H, T, Dh).unbind(0)
    if head_major:  # the layout TokenPacking.unpack_heads gives: (H, B, T, Dh) in memory
        q, k, v = (t.transpose(0, 1).contiguous().transpose(0, 1) for t in (q, k, v))
    key_mask = _masks(B, T)[mask]
    expected, _ = attention(q, k, v, key_mask)
    got = batched_attention(q, k, v, key_mask)
    assert got.shape == (B, H, T, Dh)
    assert torch.allclose(got, expected, atol=1e-6)


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="no native bf16")
@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_batched_attention_in_bf16_stays_close_to_the_fused_kernel(scale):
    """bf16 scores (rounded once), fp32 softmax: within 2.5x the fused kernel's error, < 3%."""
    q, k, v = (t * scale for t in torch.randn(3, 4, 6, 33, 32).unbind(0))
    key_mask = _masks(4, 33)["padding"]
    expected, _ = attention(q.double(), k.double(), v.double(), key_mask)
    ours = batched_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), key_mask)
    fused = F.scaled_dot_product_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), attn_mask=key_mask)
    assert ours.dtype == torch.bfloat16

    def error(t):
        return ((t.double() - expected).abs().max() / expected.abs().max()).item()

    assert error(ours) < 0.03 and error(ours) < 2.5 * error(fused)


@pytest.mark.parametrize("seq_len", [7, 40])
@pytest.mark.parametrize("packed", [False, True])
def test_every_attention_route_gives_the_same_output(seq_len, packed, monkeypatch):
    """Eager (probabilities asked for), batched (short sequences on CPUs), fused (long ones)."""
    mha = MultiHeadSelfAttention(d_model=32, n_heads=4, dropout=0.0).eval()
    real = _mask([seq_len, seq_len - 5, 3], seq_len)
    key_mask = key_mask_from(real)
    x = torch.randn(3, seq_len, 32)
    route = PackedRoute(real, "a test", row_multiple=16, onednn=False) if packed else FastRoute(real, "a test")
    inputs = route.arrange(x)

    def run(**kw):
        out = mha(inputs, key_mask, route=route, **kw).output
        return route.restore(out)

    eager = run(return_probabilities=True)
    monkeypatch.setitem(attention_module.FUSED_CPU_MIN_SCORES, torch.float32, 10**9)
    batched = run()
    monkeypatch.setitem(attention_module.FUSED_CPU_MIN_SCORES, torch.float32, 0)
    fused = run()
    for other in (batched, fused):
        assert torch.allclose(other[real], eager[real], atol=1e-6)


@pytest.mark.parametrize("row_multiple", [1, 8, 64])
def test_packing_rounds_the_rows_up_and_round_trips(row_multiple):
    real = _mask([5, 2, 7], 7)
    packing = TokenPacking.from_mask(real, row_multiple)
    x = torch.randn(3, 7, 6)
    packed = packing.pack(x)
    assert packed.shape[0] % row_multiple == 0 and packed.shape[0] - 14 < row_multiple
    assert torch.equal(packed[:14], x[real])  # the real tokens first, in row-major order
    back = packing.unpack(packed)
    assert torch.equal(back[real], x[real]) and torch.all(back[~real] == 0)
    heads = packing.unpack_heads(packed, n_heads=3)  # (3, B * T, 2), heads first
    assert torch.equal(heads.view(3, 3, 7, 2).permute(1, 2, 0, 3).reshape(3, 7, 6)[real], x[real])
    # and back: (B, H, T, Dh), head-major in memory or not, to the packed rows, heads concatenated
    for by_head in (heads.view(3, 3, 7, 2).transpose(0, 1), x.view(3, 7, 3, 2).transpose(1, 2)):
        assert torch.equal(packing.pack_heads(by_head), packed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_aligned_width_rounds_up_only_widths_the_fused_kernel_takes(monkeypatch, dtype):
    monkeypatch.setattr(attention_module, "FUSED_CPU_MIN_SCORES", {torch.float32: 96 * 96, torch.bfloat16: 48 * 48})
    monkeypatch.setattr(attention_module, "FUSED_CPU_WIDTH_MULTIPLE", 16)
    start = 96 if dtype == torch.float32 else 48
    for width in range(4, 260, 4):
        aligned = attention_module.aligned_width(width, dtype)
        if width < start:
            assert aligned == width
        else:
            assert aligned % 16 == 0 and width <= aligned < width + 16
    assert attention_module.aligned_width(100, torch.float16) == 112  # no batched route: always fused
    monkeypatch.setattr(attention_module, "FUSED_CPU_WIDTH_MULTIPLE", 1)
    assert all(attention_module.aligned_width(w, dtype) == w for w in range(4, 260, 4))

