"""Reading PyTorch's ``nn.TransformerEncoder`` / ``nn.TransformerDecoder`` into ctxvec's stacks,
key by key and strictly: the same architecture, so the same numbers (within 1e-5).

PyTorch keeps a self-attention's Q, K and V in one ``in_proj_weight`` [W_q; W_k; W_v] (3D, D),
which is ctxvec's fused ``qkv``; for cross-attention rows 0:D become ``q`` and rows D:3D ``kv``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ctxvec.model.config import EncoderConfig

# ctxvec key (within a layer) <- PyTorch key (within its layer), shared by both kinds of layer
_FEED_FORWARD = {"feed_forward.up": "linear1", "feed_forward.down": "linear2"}


def stack_from_torch(cls: type, stack: nn.Module) -> nn.Module:
    """A ``cls`` (``EncoderStack`` or ``DecoderStack``) with exactly ``stack``'s weights, on its
    device and in its dtype. Variants ctxvec does not implement are refused by name."""
    decoder = cls.__name__.startswith("Decoder")
    kind, layer_kind = ((nn.TransformerDecoder, nn.TransformerDecoderLayer) if decoder
                        else (nn.TransformerEncoder, nn.TransformerEncoderLayer))
    if not isinstance(stack, kind):
        raise TypeError(f"expected an nn.{kind.__name__}, got {type(stack).__name__}.")
    layers = list(stack.layers)
    attentions = ("self_attn", "multihead_attn") if decoder else ("self_attn",)
    norms = ("norm1", "norm2", "norm3") if decoder else ("norm1", "norm2")
    for i, layer in enumerate(layers):
        _check_layer(i, layer, layer_kind, attentions, norms)
    activations = {_activation_name(layer) for layer in layers}
    if len(activations) != 1 or len({layer.norm_first for layer in layers}) != 1:
        raise ValueError("all layers must share one activation and one norm placement.")
    final = stack.norm
    if final is not None and not isinstance(final, nn.LayerNorm):
        raise ValueError(f"the stack's norm must be None or an nn.LayerNorm, got {type(final).__name__}.")
    first = layers[0]
    config = EncoderConfig(
        d_model=first.self_attn.embed_dim, n_heads=first.self_attn.num_heads,
        d_ff=first.linear1.out_features, n_layers=len(layers), dropout=first.dropout.p,
        activation=activations.pop(),  # type: ignore[arg-type]
        norm_first=first.norm_first, layer_norm_eps=first.norm1.eps, final_norm=final is not None)
    state: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(layers):
        state.update({f"layers.{i}.{k}": v for k, v in _layer_state(layer, decoder).items()})
    if final is not None:
        state["final_norm.weight"], state["final_norm.bias"] = final.weight.detach(), final.bias.detach()
    ours = cls(config)
    ours.load_state_dict(state, strict=True)
    weight = next(stack.parameters())
    return ours.to(device=weight.device, dtype=weight.dtype)


def _layer_state(layer: nn.Module, decoder: bool) -> dict[str, torch.Tensor]:
    """One PyTorch layer's weights under ctxvec's names."""
    theirs = {k: v.detach() for k, v in layer.state_dict().items()}
    self_attention = "self_attention" if decoder else "attention"
    ours = {
        f"{self_attention}.qkv.weight": theirs["self_attn.in_proj_weight"],  # (3D, D)
        f"{self_attention}.qkv.bias": theirs["self_attn.in_proj_bias"],
        f"{self_attention}.out.weight": theirs["self_attn.out_proj.weight"],
        f"{self_attention}.out.bias": theirs["self_attn.out_proj.bias"],
    }
    if decoder:
        D = layer.self_attn.embed_dim
        ours.update({
            "cross_attention.q.weight": theirs["multihead_attn.in_proj_weight"][:D],  # (D, D)
            "cross_attention.q.bias": theirs["multihead_attn.in_proj_bias"][:D],
            "cross_attention.kv.weight": theirs["multihead_attn.in_proj_weight"][D:],  # (2D, D)
            "cross_attention.kv.bias": theirs["multihead_attn.in_proj_bias"][D:],
            "cross_attention.out.weight": theirs["multihead_attn.out_proj.weight"],
            "cross_attention.out.bias": theirs["multihead_attn.out_proj.bias"],
        })
    for mine, name in _FEED_FORWARD.items():
        ours[f"{mine}.weight"], ours[f"{mine}.bias"] = theirs[f"{name}.weight"], theirs[f"{name}.bias"]
    for norm in ("norm1", "norm2", "norm3") if decoder else ("norm1", "norm2"):
        ours[f"{norm}.weight"], ours[f"{norm}.bias"] = theirs[f"{norm}.weight"], theirs[f"{norm}.bias"]
    return ours


def _activation_name(layer: nn.Module) -> str:
    act = layer.activation
    if act is F.relu or isinstance(act, nn.ReLU):
        return "relu"
    if act is F.gelu or (isinstance(act, nn.GELU) and act.approximate == "none"):
        return "gelu"
    raise ValueError(f"unsupported activation {act!r}: ctxvec layers use ReLU or exact GELU.")


def _check_layer(i: int, layer: nn.Module, kind: type, attentions: tuple[str, ...], norms: tuple[str, ...]) -> None:
    if not isinstance(layer, kind):
        raise ValueError(f"layers[{i}] is a {type(layer).__name__}, not an nn.{kind.__name__}.")
    for name in attentions:
        attn = getattr(layer, name)
        if not attn._qkv_same_embed_dim or attn.in_proj_weight is None:
            raise ValueError(f"layers[{i}].{name}: separate kdim/vdim are not supported.")
        if attn.in_proj_bias is None or attn.bias_k is not None or attn.add_zero_attn:
            raise ValueError(f"layers[{i}].{name}: bias=False, add_bias_kv and add_zero_attn are not supported.")
    for name in norms:
        norm = getattr(layer, name)
        if not isinstance(norm, nn.LayerNorm) or norm.weight is None or norm.bias is None:
            raise ValueError(f"layers[{i}].{name} must be an affine LayerNorm with bias.")
    _activation_name(layer)
