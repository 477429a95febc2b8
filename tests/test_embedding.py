import math

import pytest
import torch

from ctxvec import Embeddings, TokenEmbedding, one_hot, sinusoid_table
from conftest import tiny_config


def test_one_hot_marks_exactly_one_position():
    ids = torch.tensor([[2, 0, 5]])
    oh = one_hot(ids, 7)
    assert oh.shape == (1, 3, 7)
    assert torch.equal(oh.sum(-1), torch.ones(1, 3))
    assert torch.equal(oh.argmax(-1), ids)


@pytest.mark.parametrize("scale", [False, True])
def test_one_hot_times_table_is_the_embedding_lookup(scale):
    """The seed's step 2 -> 3: one_hot @ E is exactly the lookup E[ids]."""
    emb = TokenEmbedding(vocab_size=50, d_model=16, scale=scale)
    torch.nn.init.normal_(emb.weight)
    ids = torch.randint(0, 50, (3, 9))
    via_matmul = one_hot(ids, 50) @ emb.weight * emb.scale
    assert torch.allclose(emb(ids), via_matmul, atol=1e-6, rtol=0)


@pytest.mark.parametrize("bad, error", [(torch.tensor([[1.0]]), TypeError), (torch.tensor([[7]]), ValueError),
                                        (torch.tensor([[-1]]), ValueError)])
def test_one_hot_rejects_bad_ids(bad, error):
    with pytest.raises(error):
        one_hot(bad, 7)


@pytest.mark.parametrize("d_model", [4, 7, 64])
def test_sinusoid_table_matches_the_formula(d_model):
    table = sinusoid_table(30, d_model)
    for pos in (0, 1, 17, 29):
        for dim in range(d_model):
            i = dim // 2
            angle = pos / 10000 ** (2 * i / d_model)
            expected = math.sin(angle) if dim % 2 == 0 else math.cos(angle)
            assert table[pos, dim].item() == pytest.approx(expected, abs=1e-6)


def test_sinusoidal_positions_are_a_buffer_not_a_parameter():
    emb = Embeddings(tiny_config())
    assert not any("positions" in name for name, _ in emb.named_parameters())
    assert "positions.table" not in emb.state_dict()  # rebuilt from the formula, not saved
    assert torch.equal(emb.positions.table, sinusoid_table(40, 32))


@pytest.mark.parametrize("position", ["sinusoidal", "learned"])
def test_embedding_is_token_vector_plus_position(position):
    config = tiny_config(position=position, scale_embeddings=position == "sinusoidal")
    emb = Embeddings(config).eval()
    torch.nn.init.normal_(emb.tokens.weight)
    if position == "learned":
        torch.nn.init.normal_(emb.positions.weight)
        assert "positions.weight" in dict(emb.named_parameters())
    ids = torch.randint(0, 64, (2, 11))
    expected = emb.tokens.weight[ids] * emb.tokens.scale + emb.positions(11)
    assert torch.allclose(emb(ids), expected, atol=1e-6)


def test_bert_variants_add_segments_and_norm():
    config = tiny_config(position="learned", scale_embeddings=False, type_vocab_size=2, embedding_norm=True)
    emb = Embeddings(config).eval()
    ids = torch.randint(0, 64, (2, 5))
    out = emb(ids)
    assert torch.allclose(out.mean(-1), torch.zeros(2, 5), atol=1e-5)  # LayerNorm applied
    assert torch.allclose(out, emb(ids, torch.zeros_like(ids)), atol=1e-6)
