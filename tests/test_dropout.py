"""ctxvec's Dropout: nn.Dropout's behaviour with a cheaper CPU mask."""

import math

import pytest
import torch
from torch import nn

from ctxvec.model.attention import MultiHeadSelfAttention
from ctxvec.model.dropout import Dropout, drop_probability, dropout, keep_mask

N = 1 << 20


@pytest.mark.parametrize("p", [0.1, 0.25, 0.5, 0.9])
def test_drop_rate_is_p(p):
    assert abs(drop_probability(p) - p) <= 2.0**-17
    dropped = (~keep_mask((N,), p)).double().mean().item()
    sigma = math.sqrt(p * (1 - p) / N)
    assert abs(dropped - drop_probability(p)) < 5 * sigma


def test_the_four_lanes_of_a_draw_are_independent():
    p = 0.5
    drop = ~keep_mask((N // 4, 4), p)  # row = the four 16-bit lanes of one 64-bit draw
    expected = drop_probability(p) ** 2
    sigma = math.sqrt(expected * (1 - expected) / (N // 4))
    for a, b in [(0, 1), (1, 2), (2, 3), (0, 3)]:
        both = (drop[:, a] & drop[:, b]).double().mean().item()
        assert abs(both - expected) < 5 * sigma, (a, b)
    # and consecutive draws: lane 3 of one row with lane 0 of the next
    both = (drop[:-1, 3] & drop[1:, 0]).double().mean().item()
    assert abs(both - expected) < 5 * sigma


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_kept_values_are_scaled_so_the_expectation_is_unchanged(p):
    x = torch.randn(N)
    y = dropout(x, p)
    kept = y != 0
    scale = 1 / (1 - drop_probability(p))
    assert torch.equal(y[kept], x[kept] * scale)
    ones = dropout(torch.ones(N), p)
    sigma = math.sqrt(p / (1 - p) / N)
    assert abs(ones.double().mean().item() - 1.0) < 5 * sigma


def test_gradient_is_the_same_mask_and_scale():
    x = torch.randn(1000, requires_grad=True)
    y = dropout(x, 0.3)
    y.backward(torch.ones_like(y))
    scale = 1 / (1 - drop_probability(0.3))
    expected = torch.where(y != 0, torch.tensor(scale), torch.tensor(0.0))
    assert torch.equal(x.grad, expected)


def test_the_torch_seed_decides_the_mask():
    x = torch.randn(4096)
    torch.manual_seed(7)
    a, b = dropout(x, 0.1), dropout(x, 0.1)
    torch.manual_seed(7)
    assert torch.equal(dropout(x, 0.1), a)
    assert not torch.equal(a, b)  # the generator moved on


def test_identity_in_eval_mode_or_p0_and_zero_at_p1():
    x = torch.randn(3, 5)
    layer = Dropout(0.5).eval()
    assert layer(x) is x
    assert dropout(x, 0.0) is x
    assert torch.equal(dropout(x, 1.0), torch.zeros_like(x))
    assert torch.equal(nn.Dropout(1.0)(x), torch.zeros_like(x))  # what nn.Dropout does too


def test_keeps_dtype_and_shape():
    x = torch.randn(2, 3, 8, dtype=torch.bfloat16)
    y = dropout(x, 0.2)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape


def test_is_an_nn_dropout_with_its_p():
    layer = Dropout(0.1)
    assert isinstance(layer, nn.Dropout) and layer.p == 0.1 and not layer.inplace
    assert "p=0.1" in repr(layer)


def test_attention_dropout_in_training_is_unbiased():
    """E[dropout(P)] = P, so the training output averages to the eval output."""
    mha = MultiHeadSelfAttention(d_model=16, n_heads=2, dropout=0.3)
    x = torch.randn(1, 5, 16)
    with torch.no_grad():
        expected = mha.eval()(x).output
        mha.train()
        runs = torch.stack([mha(x).output for _ in range(4000)])
    assert not torch.equal(runs[0], runs[1])
    spread = runs.std(0) / math.sqrt(len(runs))
    assert ((runs.mean(0) - expected).abs() < 5 * spread + 1e-6).all()
