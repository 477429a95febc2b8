"""How one forward pass runs: the few operations every layer of the model is written against.

A layer projects with ``linear`` (with its activation) and, at a sub-layer's end, with
``residual_linear`` (the projection and the Add of Add & Norm), normalises with ``norm`` (the
Norm), reshapes around attention with
``split_heads`` / ``merge_heads``, and asks ``attend`` for softmax(Q·Kᵀ / √d) · V when the
probabilities are not wanted (when they are, the attention module computes them step by step
itself); self-attention asks ``self_attend`` for the split, the attention and the concat at
once. A stack hands its layers their input through ``arrange`` and takes it back through
``restore`` (or as the real tokens' rows, ``real_rows``). This ``Route`` is the plain way, and
the one to read: padded (B, T, D) tensors, ``nn.Linear``, and PyTorch's fused attention kernel.

A faster route may lay the tokens out otherwise and compute with other kernels, giving the
same numbers; ``ctxvec.engine`` registers one (``register_route``). A stack asks
``choose_route`` once per forward pass, and the route says why it was chosen (``reason``), as
PyTorch records why its fast path was skipped.

Letters: B batch, T tokens, D d_model, n heads asked for, Dh head width, M selected positions.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from ctxvec.model.masks import key_mask_from

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}  # gelu: the exact erf form, as BERT uses


class Route:
    """The plain route: padded (B, T, D) tensors and PyTorch's own kernels.

    Args:
        real: (B, T) bool, True = real token (None: every token is real, or the caller keeps
            its own masks, as a decoder does).
        reason: why this route runs.
    """

    name = "padded"

    def __init__(self, real: torch.Tensor | None = None, reason: str = "the plain route") -> None:
        self.real = real
        self.key_mask = key_mask_from(real)  # (B, 1, 1, T) or None
        self.reason = reason

    def describe(self) -> str:
        return f"{self.name}: {self.reason}"

    # ---- where the tokens sit ---------------------------------------------------------------
    def arrange(self, x: torch.Tensor) -> torch.Tensor:
        """The layers' view of a (B, T, D) batch: here the batch itself."""
        return x

    def restore(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) from the layers' view, 0 at padding."""
        return x if self.real is None else x.masked_fill(~self.real[..., None], 0.0)

    def real_rows(self, x: torch.Tensor) -> torch.Tensor:
        """(N, D): the real tokens' rows of the layers' view, text after text."""
        return x.reshape(-1, x.shape[-1]) if self.real is None else x[self.real]

    def selected_rows(self, positions: torch.Tensor) -> torch.Tensor:
        """(B, T) bool positions -> (M,) their rows in the layers' view flattened to (-1, D)."""
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

    def residual_linear(self, x: torch.Tensor, layer: nn.Linear, dropout: nn.Module,
                        residual: torch.Tensor | None) -> torch.Tensor:
        """``residual + dropout(layer(x))``: a sub-layer's last projection and the Add of its
        Add & Norm (no residual: ``dropout(layer(x))``). A faster route fuses the add into the
        matrix multiply."""
        y = dropout(self.linear(x, layer))
        return y if residual is None else residual + y

    def norm(self, x: torch.Tensor, norm: nn.LayerNorm, overwrite: bool = False) -> torch.Tensor:
        """``norm(x)``: the Norm of Add & Norm, over the last dimension. ``overwrite``: the caller
        never reads ``x`` again, so a faster route may write the result over it."""
        return norm(x)

    def self_attend(self, qkv: torch.Tensor, n_heads: int, key_mask: torch.Tensor | None, dropout: nn.Module
                    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """Self-attention's steps 2-4 at once: split the fused projection ``qkv`` into heads,
        ``attend``, concat the heads. Returns the concat (shaped like ``qkv`` with D channels)
        and the keys and values, 2 x (B, n, T, Dh) (a faster route may attend without laying
        them out, and return None)."""
        q, k, v = self.split_heads(qkv, 3 * n_heads).chunk(3, dim=1)  # 3 x (B, n, T, Dh)
        heads = self.attend(q, k, v, key_mask, dropout)  # (B, n, T, Dh)
        return self.merge_heads(heads), (k, v)  # (B, T, n * Dh)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None,
               dropout: nn.Module) -> torch.Tensor:
        """softmax(Q·Kᵀ / √Dh) · V per head, without the probabilities: PyTorch's fused
        ``scaled_dot_product_attention`` (the same numbers as ``attention``; a test holds them
        equal). q: (B, H, T, Dh); k, v: (B, H, S, Dh); key_mask: bool broadcastable to
        (B, H, T, S). Returns (B, H, T, Dh)."""
        return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask,
                                              dropout_p=dropout.p if dropout.training else 0.0)


# A faster route (``ctxvec.engine`` registers one): takes (a stack's input or None, the layers,
# the real-token mask or None, whether the tokens must stay padded) and returns its Route.
RouteChooser = Callable[[torch.Tensor | None, nn.Module, torch.Tensor | None, bool], Route]
_CHOOSERS: list[RouteChooser] = []


def register_route(choose: RouteChooser) -> None:
    """Run the model by ``choose``'s routes from now on (``ctxvec.engine`` does, on import)."""
    _CHOOSERS.append(choose)


def choose_route(x: torch.Tensor | None, layers: nn.Module, real: torch.Tensor | None,
                 padded_only: bool = False) -> Route:
    """The route of one forward pass of ``layers`` on ``x``: the registered one, else the plain one.

    real: (B, T) bool real-token mask (None: the caller keeps its own masks); padded_only: the
    tokens must stay in their (B, T) places (a decoder attends causally to a cache; a module
    called on its own knows no batch layout).
    """
    if _CHOOSERS:
        return _CHOOSERS[-1](x, layers, real, padded_only)
    return Route(real, "no faster route is registered (ctxvec.engine registers one)")


def default_route(x: torch.Tensor, module: nn.Module) -> Route:
    """The route of a module called on its own, outside a stack: padded, its caller's masks."""
    return choose_route(x, module, None, padded_only=True)
