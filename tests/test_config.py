import pytest

from ctxvec import EncoderConfig


def test_defaults_are_the_seed_design():
    c = EncoderConfig()
    assert (c.d_model, c.n_heads, c.d_head, c.d_ff, c.n_layers) == (512, 8, 64, 1024, 12)
    assert (c.dropout, c.activation, c.norm_first, c.position) == (0.1, "relu", False, "sinusoidal")
    assert (c.layer_norm_eps, c.max_len) == (1e-5, 512)
    assert c.has_final_norm is False  # post-norm: the last layer already ends with a LayerNorm
    assert EncoderConfig(norm_first=True).has_final_norm is True


@pytest.mark.parametrize("changes, words", [
    ({"d_model": 500}, "divisible by n_heads"),
    ({"n_heads": 0}, "n_heads must be a positive integer"),
    ({"n_layers": -1}, "n_layers must be a positive integer"),
    ({"vocab_size": 0}, "vocab_size must be a positive integer"),
    ({"d_model": 512.0}, "d_model must be a positive integer"),
    ({"dropout": 1.0}, "dropout must be a number in [0, 1)"),
    ({"dropout": float("nan")}, "dropout must be a number in [0, 1)"),
    ({"dropout": True}, "dropout must be a number in [0, 1)"),
    ({"activation": "swish"}, "activation must be one of"),
    ({"activation": ["relu"]}, "activation must be one of"),
    ({"position": "rotary"}, "position must be one of"),
    ({"pad_id": 9000}, "pad_id"),
    ({"pad_id": True}, "pad_id"),
    ({"layer_norm_eps": 0}, "layer_norm_eps must be a small positive number"),
    ({"layer_norm_eps": float("inf")}, "layer_norm_eps must be a small positive number"),
    ({"layer_norm_eps": float("nan")}, "layer_norm_eps must be a small positive number"),
    ({"layer_norm_eps": "1e-5"}, "layer_norm_eps must be a small positive number"),
    ({"norm_first": "yes"}, "norm_first must be true or false"),
    ({"norm_first": 1}, "norm_first must be true or false"),
    ({"scale_embeddings": None}, "scale_embeddings must be true or false"),
    ({"embedding_norm": "false"}, "embedding_norm must be true or false"),
    ({"final_norm": "no"}, "final_norm must be true, false or null"),
    ({"type_vocab_size": -1}, "type_vocab_size must be a non-negative integer"),
    ({"type_vocab_size": 2.0}, "type_vocab_size must be a non-negative integer"),
    ({"n_layers": True}, "n_layers must be a positive integer"),
    ({"max_len": 10**9}, "max_len must be at most 65,536 positions"),
])
def test_invalid_configs_raise_a_clear_sentence(changes, words):
    with pytest.raises(ValueError, match="Invalid EncoderConfig") as err:
        EncoderConfig(**changes)
    assert words in str(err.value)


def test_round_trip_through_json(tmp_path):
    c = EncoderConfig(vocab_size=100, d_model=64, n_heads=2, position="learned", norm_first=True)
    c.save(tmp_path / "config.json")
    assert EncoderConfig.load(tmp_path / "config.json") == c


def test_unknown_fields_are_refused():
    with pytest.raises(ValueError, match="unknown field.*nhead"):
        EncoderConfig.from_dict({"nhead": 8})
