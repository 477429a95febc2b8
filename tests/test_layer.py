import pytest
import torch
from torch.nn import functional as F

from ctxvec import EncoderLayer, FeedForward
from conftest import tiny_config


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_feed_forward_expands_then_projects_back(activation):
    ff = FeedForward(d_model=16, d_ff=48, dropout=0.0, activation=activation)
    x = torch.randn(2, 5, 16)
    act = F.relu if activation == "relu" else F.gelu
    expected = ff.down(act(ff.up(x)))
    assert ff.up.weight.shape == (48, 16) and ff.down.weight.shape == (16, 48)
    assert torch.allclose(ff(x), expected, atol=1e-6)


@pytest.mark.parametrize("norm_first", [False, True])
def test_layer_is_add_and_norm_around_each_sublayer(norm_first):
    layer = EncoderLayer(tiny_config(norm_first=norm_first)).eval()
    x = torch.randn(2, 6, 32)
    attn = lambda h: layer.attention(h).output  # noqa: E731
    if norm_first:
        h = x + attn(layer.norm1(x))
        expected = h + layer.feed_forward(layer.norm2(h))
    else:
        h = layer.norm1(x + attn(x))  # LayerNorm(x + Attention(x))
        expected = layer.norm2(h + layer.feed_forward(h))
    out = layer(x)
    assert out.attention is None
    assert torch.allclose(out.hidden_state, expected, atol=1e-6)


def test_post_norm_output_is_normalised():
    layer = EncoderLayer(tiny_config()).eval()
    out = layer(torch.randn(2, 6, 32) * 5).hidden_state
    assert torch.allclose(out.mean(-1), torch.zeros(2, 6), atol=1e-5)
    assert torch.allclose(out.var(-1, unbiased=False), torch.ones(2, 6), atol=1e-3)


def test_dropout_is_active_only_in_training():
    layer = EncoderLayer(tiny_config(dropout=0.5))
    x = torch.randn(2, 6, 32)
    layer.eval()
    assert torch.equal(layer(x).hidden_state, layer(x).hidden_state)
    layer.train()
    assert not torch.equal(layer(x).hidden_state, layer(x).hidden_state)
