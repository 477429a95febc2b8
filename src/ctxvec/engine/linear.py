"""The engine's matrix multiplies: PyTorch's oneDNN linear at CPU inference, on repacked weights.

PyTorch's plain fp32 ``F.linear`` calls MKL, which runs AVX2 code on AMD CPUs: on an AVX-512
AMD EPYC, oneDNN (``torch.ops.mkldnn._linear_pointwise``, the kernel torch.compile's CPU
backend emits) does the same fp32 GEMMs twice as fast, and bf16 ones ~15% faster, with the
activation fused in (benchmarks/bench_encode.py measures both routes). Both accumulate in fp32:
the same numbers within rounding (~1e-6). oneDNN compiles and keeps a kernel per matrix shape,
so the rows it sees come in buckets (``ONEDNN_ROW_MULTIPLE``); weights can be repacked into its
blocked layout once per call of a pipeline (``repack_weights``), ~10% faster again in bf16.
Training and GPUs use ``F.linear``.

GELU in bf16 is the exception to the fused activation: oneDNN's erf post-op costs about half
the projection's own time on an AMX Xeon, and ctxvec's table (``engine.native.gelu_``, one
gather per 16 values) a third of that, so the projection runs bare and the table follows.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import nn

import ctxvec.engine.native as native
from ctxvec.engine.runtime import native_bf16
from ctxvec.model.route import ACTIVATIONS

# The encoder pads its packed tokens to a multiple of this many rows where oneDNN runs its
# matrix multiplies: oneDNN compiles (and keeps) one kernel per matrix shape, so row counts that
# change with every batch would each cost a compilation and memory that is never given back.
# 32: at most 32 shapes per weight up to 1,024 rows; measured 1% faster than 64, 1% slower
# than 16 (which allows twice the shapes).
ONEDNN_ROW_MULTIPLE = 32
_ONEDNN_BATCH_HINT = 1024  # the row count oneDNN chooses a repacked weight's blocking for


@lru_cache(maxsize=1)
def _native_bf16_cpu() -> bool:
    return native_bf16("cpu")


@lru_cache(maxsize=1)
def _has_onednn_linear() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def onednn_dtype(dtype: torch.dtype) -> bool:
    """Whether the oneDNN linear runs this dtype here (fp32; bf16 where it is native)."""
    return _has_onednn_linear() and (
        dtype == torch.float32 or (dtype == torch.bfloat16 and _native_bf16_cpu()))


def onednn_rows(x: torch.Tensor, weight: torch.Tensor) -> int:
    """``ONEDNN_ROW_MULTIPLE`` if the oneDNN linear runs activations like ``x`` against ``weight``,
    else 1: inference (no gradient) on a CPU, fp32, or bf16 where it is native.
    """
    if (x.device.type != "cpu" or x.dtype != weight.dtype or not onednn_dtype(x.dtype)
            or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
        return 1
    return ONEDNN_ROW_MULTIPLE


def packed_row_multiple(x: torch.Tensor, weight: torch.Tensor) -> int:
    """The multiple the encoder rounds its packed token rows up to for activations like ``x``:
    ``ONEDNN_ROW_MULTIPLE`` wherever oneDNN runs the matrix multiplies (and keeps a kernel per
    shape): the inference route here, and bf16 autocast on a CPU (training); else 1.
    """
    autocast_bf16 = (x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
                     and torch.get_autocast_dtype("cpu") == torch.bfloat16)
    return ONEDNN_ROW_MULTIPLE if autocast_bf16 or onednn_rows(x, weight) > 1 else 1


def repack_weights(module: nn.Module) -> dict[nn.Module, torch.Tensor]:
    """Copies of the weights of ``module``'s ``nn.Linear`` layers repacked into oneDNN's blocked
    layout, for ``linear``: its GEMMs then run ~10% faster in bf16 (~6% in fp32), with the same
    numbers. Repacking MiniLM takes a few milliseconds.

    They are copies: they must be made again after the weights change. (A cache that checked
    for changes could not see all of them: PyTorch's fused AdamW, for one, updates weights in
    place without bumping their version counter.) Empty where the oneDNN route does not apply.
    """
    weights = {}
    for layer in module.modules():
        w = getattr(layer, "weight", None)
        if isinstance(layer, nn.Linear) and w.device.type == "cpu" and onednn_dtype(w.dtype):
            weights[layer] = torch.ops.mkldnn._reorder_linear_weight(w.detach(), _ONEDNN_BATCH_HINT)
    return weights


def linear(x: torch.Tensor, layer: nn.Linear, activation: str | None = None,
           weights: dict[nn.Module, torch.Tensor] | None = None) -> torch.Tensor:
    """``activation(layer(x))`` by the fastest exact kernel for this call.

    On a CPU at inference, for (R, C) inputs with R a multiple of ``ONEDNN_ROW_MULTIPLE`` and the
    layer's dtype: the oneDNN linear with the activation fused in, reading the layer's weight
    from ``weights`` (``repack_weights``) when it is there. Elsewhere: ``F.linear``. (A route
    that chose oneDNN for a forward pass calls this; the checks keep a call that cannot take it
    on ``F.linear``.) GELU in bf16: the linear, then ctxvec's GELU table where it builds (the
    projection rounded to bf16 first, as PyTorch's bf16 linear and F.gelu round it).
    """
    if bucketed(x) and onednn_rows(x, layer.weight) > 1:
        weight = weights.get(layer) if weights else None
        if activation == "gelu" and gelu_by_table(x.dtype):
            return native.gelu_(onednn_linear(x, layer, None, weight))
        return onednn_linear(x, layer, activation, weight)
    y = layer(x)
    return ACTIVATIONS[activation](y) if activation is not None else y


def linear_add(x: torch.Tensor, layer: nn.Linear, residual: torch.Tensor,
               weights: dict[nn.Module, torch.Tensor] | None = None) -> torch.Tensor:
    """``residual + layer(x)``, the add fused into the oneDNN linear (a binary post-op) where
    ``linear`` would take oneDNN: one pass over the output instead of two, and in bf16 one
    rounding instead of two (the sum is rounded once, not the product and then the sum).
    Elsewhere: ``residual + linear(x, layer)``. x (R, C), residual (R, layer.out_features).
    """
    if (bucketed(x) and onednn_rows(x, layer.weight) > 1 and residual.dtype == x.dtype
            and residual.shape == (x.shape[0], layer.out_features)):
        return onednn_linear(x, layer, None, weights.get(layer) if weights else None, residual)
    return residual + linear(x, layer, None, weights)


def gelu_by_table(dtype: torch.dtype) -> bool:
    """Whether the oneDNN route's GELU is ctxvec's table (bf16, where the kernels build)."""
    return dtype == torch.bfloat16 and native.available() is None


def bucketed(x: torch.Tensor) -> bool:
    """Whether ``x`` is (R, C) rows in one of oneDNN's buckets (R a multiple of the row multiple)."""
    return x.dim() == 2 and x.shape[0] % ONEDNN_ROW_MULTIPLE == 0


def onednn_linear(x: torch.Tensor, layer: nn.Linear, activation: str | None = None,
                  weight: torch.Tensor | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
    """``activation(layer(x))`` by oneDNN: x (R, C), the layer's weight or its repacked copy; with a
    ``residual`` (R, N) instead, ``residual + layer(x)`` (the add as a binary post-op)."""
    weight = layer.weight if weight is None else weight
    if residual is not None:
        return torch.ops.mkldnn._linear_pointwise.binary(x.contiguous(), residual.contiguous(), weight,
                                                         layer.bias, "add")
    return torch.ops.mkldnn._linear_pointwise(
        x.contiguous(), weight, layer.bias, activation or "none", [],
        "none" if activation == "gelu" else "")  # gelu algorithm "none": the erf form
