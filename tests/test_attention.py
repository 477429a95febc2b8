import math

import pytest
import torch

from ctxvec import MultiHeadSelfAttention, attention
from ctxvec.encoder import key_mask_from


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
