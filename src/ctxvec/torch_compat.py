"""Reading PyTorch's ``nn.TransformerEncoder`` into ctxvec's modules (key by key, strict)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ctxvec.config import EncoderConfig

# ctxvec key (within layer i)       <- PyTorch key (within layers.i)
_LAYER_KEYS = {
    "attention.qkv.weight": "self_attn.in_proj_weight",  # [W_q; W_k; W_v], (3D, D)
    "attention.qkv.bias": "self_attn.in_proj_bias",
    "attention.out.weight": "self_attn.out_proj.weight",
    "attention.out.bias": "self_attn.out_proj.bias",
    "feed_forward.up.weight": "linear1.weight",
    "feed_forward.up.bias": "linear1.bias",
    "feed_forward.down.weight": "linear2.weight",
    "feed_forward.down.bias": "linear2.bias",
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
}


def _activation_name(layer: nn.TransformerEncoderLayer) -> str:
    act = layer.activation
    if act is F.relu or isinstance(act, nn.ReLU):
        return "relu"
    if act is F.gelu or (isinstance(act, nn.GELU) and act.approximate == "none"):
        return "gelu"
    raise ValueError(f"unsupported activation {act!r}: ctxvec layers use ReLU or exact GELU.")


def _check_layer(i: int, layer: nn.Module) -> None:
    if not isinstance(layer, nn.TransformerEncoderLayer):
        raise ValueError(f"layers[{i}] is a {type(layer).__name__}, not an nn.TransformerEncoderLayer.")
    attn = layer.self_attn
    if not attn._qkv_same_embed_dim or attn.in_proj_weight is None:
        raise ValueError(f"layers[{i}]: separate kdim/vdim are not a self-attention encoder.")
    if attn.in_proj_bias is None or attn.bias_k is not None or attn.add_zero_attn:
        raise ValueError(f"layers[{i}]: bias=False, add_bias_kv and add_zero_attn are not supported.")
    for name in ("norm1", "norm2"):
        norm = getattr(layer, name)
        if not isinstance(norm, nn.LayerNorm) or norm.weight is None or norm.bias is None:
            raise ValueError(f"layers[{i}].{name} must be an affine LayerNorm with bias.")


def check_stack(layers: list[nn.Module], final: nn.Module | None, owner: str) -> None:
    """What ctxvec's stacks assume of a PyTorch stack: one activation and one norm placement for
    every layer, and a final norm that is None or a LayerNorm."""
    activations = {_activation_name(layer) for layer in layers}
    norm_first = {layer.norm_first for layer in layers}
    if len(activations) != 1 or len(norm_first) != 1:
        raise ValueError("all layers must share one activation and one norm placement.")
    if final is not None and not isinstance(final, nn.LayerNorm):
        raise ValueError(f"{owner}.norm must be None or an nn.LayerNorm, got {type(final).__name__}.")


def config_and_state_from_torch(encoder: nn.TransformerEncoder) -> tuple[EncoderConfig, dict[str, torch.Tensor]]:
    """The ``EncoderConfig`` and ``EncoderStack`` state dict that reproduce ``encoder``."""
    if not isinstance(encoder, nn.TransformerEncoder):
        raise TypeError(f"expected an nn.TransformerEncoder, got {type(encoder).__name__}.")
    layers = list(encoder.layers)
    for i, layer in enumerate(layers):
        _check_layer(i, layer)
    first = layers[0]
    check_stack(layers, encoder.norm, "encoder")
    final = encoder.norm
    config = EncoderConfig(
        d_model=first.self_attn.embed_dim,
        n_heads=first.self_attn.num_heads,
        d_ff=first.linear1.out_features,
        n_layers=len(layers),
        dropout=first.dropout.p,
        activation=_activation_name(first),  # type: ignore[arg-type]
        norm_first=first.norm_first,
        layer_norm_eps=first.norm1.eps,
        final_norm=final is not None,
    )
    state: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(layers):
        theirs = layer.state_dict()
        for ours, key in _LAYER_KEYS.items():
            state[f"layers.{i}.{ours}"] = theirs[key]
    if final is not None:
        state["final_norm.weight"] = final.weight.detach()
        state["final_norm.bias"] = final.bias.detach()
    return config, state
