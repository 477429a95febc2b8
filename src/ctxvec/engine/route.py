"""The engine's routes: the same model, run fast.

``choose`` is asked once per forward pass (``ctxvec.engine`` registers it with
``model.route.register_route``; a pipeline asks ``route_for`` with its repacked weights) and
returns the route with the reason it was chosen:

- ``PackedRoute``, whenever some tokens are padding or the oneDNN linear runs (CPU inference):
  the real tokens packed as rows, rounded up to ``ONEDNN_ROW_MULTIPLE`` where oneDNN keeps a
  kernel per shape, so that every per-token step skips padding; attention unpacks them per head.
- ``FastRoute``: the padded layout (nothing to skip, or a decoder's cached steps) with the
  engine's attention kernel.
"""

from __future__ import annotations

import torch
from torch import nn

from ctxvec.engine.attention import FUSED_CPU_MIN_SCORES, attend
from ctxvec.engine.linear import bucketed, onednn_linear, onednn_rows, packed_row_multiple
from ctxvec.engine.packing import TokenPacking
from ctxvec.model.route import Route


class FastRoute(Route):
    """The padded layout with the engine's kernels: oneDNN for bucketed (M, C) rows, the
    batched attention for short sequences on CPUs."""

    def __init__(self, real: torch.Tensor, reason: str, onednn: bool = False,
                 weights: dict[nn.Module, torch.Tensor] | None = None) -> None:
        super().__init__(real, reason)
        self.onednn = onednn
        self.weights = weights or {}

    def linear(self, x: torch.Tensor, layer: nn.Linear, activation: str | None = None) -> torch.Tensor:
        if self.onednn and bucketed(x):
            return onednn_linear(x, layer, activation, self.weights.get(layer))
        return super().linear(x, layer, activation)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None,
               dropout: nn.Module) -> torch.Tensor:
        return attend(q, k, v, key_mask, dropout)


class PackedRoute(FastRoute):
    """The real tokens packed as (M, D) rows (``TokenPacking``): padding costs nothing but in
    attention, which unpacks the rows per head by one gather and packs them back by another."""

    name = "packed"

    def __init__(self, real: torch.Tensor, reason: str, row_multiple: int, onednn: bool,
                 weights: dict[nn.Module, torch.Tensor] | None = None) -> None:
        super().__init__(real, reason, onednn, weights)
        self.packing = TokenPacking.from_mask(real, row_multiple)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        return self.packing.pack(x)  # (B, T, D) -> (M, D)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        return self.packing.unpack(x)  # (M, D) -> (B, T, D), 0 at padding

    def rows_at(self, positions: torch.Tensor) -> torch.Tensor:
        packed_row = self.real.flatten().cumsum(0) - 1  # (B * T,) row of each real token in (N, D)
        return packed_row[positions.flatten()]  # (M,)

    def split_heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        B, T = self.packing.batch_size, self.packing.seq_len
        heads = self.packing.unpack_heads(x, n)  # (M, n * Dh) -> (n, B * T, Dh), heads first
        return heads.view(n, B, T, -1).transpose(0, 1)  # (B, n, T, Dh), head-major in memory

    def merge_heads(self, heads: torch.Tensor) -> torch.Tensor:
        return self.packing.pack_heads(heads)  # (B, H, T, Dh) -> (M, H * Dh)


def choose(x: torch.Tensor | None, weight: torch.Tensor, real: torch.Tensor, packable: bool = True,
           weights: dict[nn.Module, torch.Tensor] | None = None) -> Route:
    """The engine's route for a stack whose layers hold ``weight``, on input ``x`` (None: like
    the weight, needing no gradient) with real tokens ``real`` (B, T)."""
    probe = x if x is not None else weight.detach()
    onednn = packable and onednn_rows(probe, weight) > 1
    n_real, n_all = int(real.sum()), real.numel()
    T = real.shape[1]
    kernel = _attention_kernel(probe, T * T)
    if packable and (onednn or n_real < n_all):
        multiple = packed_row_multiple(probe, weight)
        why = [f"{n_real} of {n_all} tokens are real, only they go through the per-token steps"
               if n_real < n_all else "every token is real"]
        why.append(f"oneDNN linear ({_where(probe)}), rows in multiples of {multiple}" if onednn
                   else f"F.linear ({_why_not_onednn(probe, weight)})"
                   + (f", rows in multiples of {multiple} (bf16 autocast)" if multiple > 1 else ""))
        return PackedRoute(real, "; ".join(why + [kernel]), multiple, onednn, weights)
    why = "a decoder's tokens stay padded" if not packable else "every token is real and gradients are wanted"
    return FastRoute(real, f"{why}; F.linear; {kernel}")


def route_for(encoder: nn.Module, attention_mask: torch.Tensor,
              weights: dict[nn.Module, torch.Tensor] | None = None) -> Route:
    """``choose`` for an ``Encoder`` at inference, with weights repacked for it (``repack_weights``)."""
    return choose(None, encoder.stack.layers[0].attention.qkv.weight, attention_mask.bool(), True, weights)


def _attention_kernel(probe: torch.Tensor, scores_per_head: int) -> str:
    if probe.device.type != "cpu":
        return "attention: PyTorch's fused kernel"
    limit = FUSED_CPU_MIN_SCORES.get(probe.dtype, 0)
    return (f"attention: batched (T·S = {scores_per_head} < {limit}), or with dropout in training"
            if scores_per_head < limit else
            f"attention: PyTorch's fused kernel (T·S = {scores_per_head}), batched with dropout in training")


def _where(probe: torch.Tensor) -> str:
    return f"inference on a CPU, {str(probe.dtype).removeprefix('torch.')}"


def _why_not_onednn(probe: torch.Tensor, weight: torch.Tensor) -> str:
    if probe.device.type != "cpu":
        return f"on {probe.device.type}"
    if torch.is_grad_enabled() and (probe.requires_grad or weight.requires_grad):
        return "gradients are wanted"
    return f"no oneDNN linear for {str(probe.dtype).removeprefix('torch.')} here"
