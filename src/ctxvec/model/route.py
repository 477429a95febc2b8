"""How one forward pass runs: where the tokens sit and which kernels compute them.

The layers are written once, against the few operations of ``Route``: ``linear`` (a projection,
with its activation), ``split_heads`` / ``merge_heads`` (the reshapes around attention) and
``attend`` (softmax(Q·Kᵀ / √d) · V when the probabilities are not asked for; when they are,
the attention module computes them step by step itself). This base class is the plain way, and
the one to read: padded (B, T, D) tensors, ``nn.Linear``, PyTorch's fused attention kernel.

``ctxvec.engine`` registers a faster route (``register_route``): the real tokens packed as rows
so that padding costs nothing, oneDNN matrix multiplies, a batched attention for short
sequences. It gives the same numbers. A stack asks ``choose_route`` once per forward pass, and
the route says why it was chosen (``reason``), as PyTorch records why its fast path was skipped.

Letters: B batch, T tokens, D d_model, n heads asked for, Dh head width, M rows.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}  # gelu: the exact erf form, as BERT uses


def key_mask_from(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, T) bool real-token mask -> (B, 1, 1, T) "may attend" mask shared by all layers.

    None when nothing is padded (the fused kernel is fastest without a mask). A row with no
    real token at all may attend to every position, so it stays finite (elsewhere it gives NaN
    that spreads into the gradients); its outputs are meaningless and masked out downstream.
    """
    if attention_mask is None or bool(attention_mask.all()):
        return None
    empty_rows = ~attention_mask.any(dim=1, keepdim=True)  # (B, 1)
    return (attention_mask | empty_rows)[:, None, None, :]  # (B, 1, 1, T)


class Route:
    """The plain route: padded (B, T, D) tensors and PyTorch's own kernels.

    Args:
        real: (B, T) bool, True = real token (None: every token is real, or no stack: a
            decoder step, a module called on its own).
        reason: why this route runs (the engine's faster one did not apply, and why).
    """

    name = "padded"

    def __init__(self, real: torch.Tensor | None = None, reason: str = "the plain route") -> None:
        self.real = real
        self.key_mask = key_mask_from(real)  # (B, 1, 1, T) or None
        self.reason = reason

    def describe(self) -> str:
        return f"{self.name}: {self.reason}"

    # ---- where the tokens sit ---------------------------------------------------------------
    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """The layers' rows of a (B, T, D) batch: here the batch itself."""
        return x

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) again, 0 at padding."""
        return x if self.real is None else x.masked_fill(~self.real[..., None], 0.0)

    def rows_at(self, positions: torch.Tensor) -> torch.Tensor:
        """(B, T) bool positions -> (M,) their indices in the layers' rows flattened to (B * T, D)."""
        return positions.flatten().nonzero().squeeze(1)

    def split_heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """(B, T, n * Dh) -> (B, n, T, Dh): each head's slice of every token."""
        B, T, C = x.shape
        return x.view(B, T, n, C // n).transpose(1, 2)

    def merge_heads(self, heads: torch.Tensor) -> torch.Tensor:
        """(B, H, T, Dh) -> (B, T, H * Dh): the heads side by side again (concat)."""
        B, H, T, Dh = heads.shape
        return heads.transpose(1, 2).reshape(B, T, H * Dh)

    # ---- the kernels ------------------------------------------------------------------------
    def linear(self, x: torch.Tensor, layer: nn.Linear, activation: str | None = None) -> torch.Tensor:
        """``activation(layer(x))``."""
        y = layer(x)
        return ACTIVATIONS[activation](y) if activation is not None else y

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None,
               dropout: nn.Module) -> torch.Tensor:
        """softmax(Q·Kᵀ / √Dh) · V per head, without the probabilities: PyTorch's fused
        ``scaled_dot_product_attention`` (the same numbers as ``attention``; a test holds them
        equal). q: (B, H, T, Dh); k, v: (B, H, S, Dh); key_mask: bool broadcastable to
        (B, H, T, S). Returns (B, H, T, Dh)."""
        return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask,
                                              dropout_p=dropout.p if dropout.training else 0.0)


# Faster routes, by ``ctxvec.engine``: each takes (the stack's input, a weight of its layers,
# the real-token mask, whether the tokens may be packed) and returns a Route, or why it does not
# apply.
FastRouteChooser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool], "Route | str"]
_FAST_ROUTES: list[FastRouteChooser] = []


def register_route(choose: FastRouteChooser) -> None:
    """Offer a faster route to every stack (``ctxvec.engine`` does, on import)."""
    _FAST_ROUTES.append(choose)


def choose_route(x: torch.Tensor, weight: torch.Tensor, real: torch.Tensor, packable: bool = True) -> Route:
    """The route of one forward pass: the first registered one that applies, else the plain one.

    x: the stack's input (B, T, D); weight: a weight of its layers (its dtype, device and
    gradient say how they will run); real: (B, T) bool real-token mask; packable: whether the
    tokens may be packed as rows (an encoder's may; a decoder's, attending causally to a cache,
    may not).
    """
    reasons = []
    for choose in _FAST_ROUTES:
        route = choose(x, weight, real, packable)
        if isinstance(route, Route):
            return route
        reasons.append(route)
    return Route(real, "; ".join(reasons) or "no faster route is registered (import ctxvec.engine)")
