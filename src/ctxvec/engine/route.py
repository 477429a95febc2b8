"""The engine's routes: the same model, run fast.

``choose`` is asked once per forward pass (``ctxvec.engine`` registers it with
``model.route.register_route``; a pipeline asks ``route_for``, with its repacked weights) and
settles, with the reason, how the pass runs:

- the layout. ``PackedRoute`` whenever some tokens are padding or the oneDNN linear runs: the
  real tokens packed as rows (rounded up to ``ONEDNN_ROW_MULTIPLE`` where oneDNN keeps a kernel
  per shape), so that every per-token step skips padding; attention unpacks them per head.
  ``FastRoute`` keeps the padded layout (nothing to skip, a decoder's cached steps, a module
  called on its own).
- the matrix multiplies: the oneDNN linear at CPU inference (``engine.linear``), its activation
  (in bf16, GELU by ctxvec's table after it) and a sub-layer's residual add fused in, else
  ``F.linear`` (training, autocast, GPUs, other dtypes); with them, LayerNorm by ctxvec's kernel
  (``engine.native.layer_norm``, 16 rows at a time) where it is built with AVX-512, else PyTorch's.
- the attention kernel is one rule by each attention's size (``engine.attention``): the
  reason states the rule and what it gives the stack's self-attention. On packed rows at CPU
  inference, sequences up to ``native_max_tokens`` (per CPU kind, as measured) of heads 32 or
  64 wide, fp32 or bf16, attend by ctxvec's own kernel on the rows as they are
  (``engine.native``, ``PackedRoute.self_attend``), where it builds.
"""

from __future__ import annotations

import torch
from torch import nn

import ctxvec.engine.native as native
from ctxvec.engine.attention import FUSED_CPU_MIN_SCORES, fast_attention, native_max_tokens
import ctxvec.engine.linear as linear_kernels
from ctxvec.engine.linear import gelu_by_table, linear, linear_add, onednn_dtype
from ctxvec.engine.packing import TokenPacking
from ctxvec.model.attention import MultiHeadSelfAttention
from ctxvec.model.route import Route


class FastRoute(Route):
    """The padded layout with the engine's kernels: the oneDNN linear when ``onednn`` (for row
    counts in its buckets), the batched attention for short sequences on CPUs."""

    def __init__(self, real: torch.Tensor | None, reason: str, onednn: bool = False,
                 weights: dict[nn.Module, torch.Tensor] | None = None) -> None:
        super().__init__(real, reason)
        self.onednn = onednn
        self.weights = weights or {}

    def linear(self, x: torch.Tensor, layer: nn.Linear, activation: str | None = None) -> torch.Tensor:
        if self.onednn:  # (linear still takes F.linear for a shape outside the buckets)
            return linear(x, layer, activation, self.weights)
        return super().linear(x, layer, activation)

    def residual_linear(self, x: torch.Tensor, layer: nn.Linear, dropout: nn.Module,
                        residual: torch.Tensor | None) -> torch.Tensor:
        if self.onednn and residual is not None and not (dropout.training and dropout.p > 0):
            return linear_add(x, layer, residual, self.weights)  # the add fused into oneDNN's kernel
        return super().residual_linear(x, layer, dropout, residual)

    def norm(self, x: torch.Tensor, norm: nn.LayerNorm, overwrite: bool = False) -> torch.Tensor:
        if (self.onednn and native.norm_takes(x, norm)  # inference on a CPU (the oneDNN route's terms)
                and not (torch.is_grad_enabled() and (x.requires_grad or norm.weight.requires_grad))):
            # over x where it may be: its rows are in cache once read (~40% faster than a new tensor)
            out = x if overwrite and x.is_contiguous() else None
            return native.layer_norm_unchecked(x, norm.weight, norm.bias, norm.eps, out)  # norm_takes checked
        return super().norm(x, norm, overwrite)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None,
               dropout: nn.Module) -> torch.Tensor:
        return fast_attention(q, k, v, key_mask, dropout)


class PackedRoute(FastRoute):
    """The real tokens packed as (R, D) rows (``TokenPacking``): padding costs nothing but in
    attention, which unpacks the rows per head by one gather and packs them back by another;
    with ``native``, self-attention reads the rows as they are (``engine.native``)."""

    name = "packed"

    def __init__(self, real: torch.Tensor, reason: str, row_multiple: int, onednn: bool,
                 weights: dict[nn.Module, torch.Tensor] | None = None, native: bool = False) -> None:
        super().__init__(real, reason, onednn, weights)
        self.packing = TokenPacking.from_mask(real, row_multiple)
        self.native = native

    def self_attend(self, qkv: torch.Tensor, n_heads: int, key_mask: torch.Tensor | None, dropout: nn.Module
                    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        # The kernel attends each sequence over its own rows: only for this route's own key mask
        # (every real token), and never where a gradient or dropout is wanted (it has neither).
        if (self.native and key_mask is self.key_mask and not (dropout.training and dropout.p > 0)
                and not (torch.is_grad_enabled() and qkv.requires_grad) and qkv.device.type == "cpu"
                and qkv.dim() == 2 and qkv.stride(1) == 1 and native.takes(qkv.dtype, qkv.shape[1] // (3 * n_heads))):
            return native.packed_attention(qkv, self.packing.starts, n_heads), None  # (R, D)
        return super().self_attend(qkv, n_heads, key_mask, dropout)

    def arrange(self, x: torch.Tensor) -> torch.Tensor:
        return self.packing.pack(x)  # (B, T, D) -> (R, D)

    def restore(self, x: torch.Tensor) -> torch.Tensor:
        return self.packing.unpack(x)  # (R, D) -> (B, T, D), 0 at padding

    def real_rows(self, x: torch.Tensor) -> torch.Tensor:
        return x[: self.packing.n_tokens]  # (R, D) -> (N, D): the packed rows as they are, spares cut

    def selected_rows(self, positions: torch.Tensor) -> torch.Tensor:
        packed_row = self.real.flatten().cumsum(0) - 1  # (B * T,) row of each real token
        return packed_row[positions.flatten()]  # (M,)

    def split_heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        B, T = self.packing.batch_size, self.packing.seq_len
        heads = self.packing.unpack_heads(x, n)  # (R, n * Dh) -> (n, B * T, Dh), heads first
        return heads.view(n, B, T, -1).transpose(0, 1)  # (B, n, T, Dh), head-major in memory

    def merge_heads(self, heads: torch.Tensor) -> torch.Tensor:
        return self.packing.pack_heads(heads)  # (B, H, T, Dh) -> (R, H * Dh)


def choose(x: torch.Tensor | None, layers: nn.Module, real: torch.Tensor | None, padded_only: bool = False,
           weights: dict[nn.Module, torch.Tensor] | None = None) -> Route:
    """The engine's route for ``layers`` on input ``x`` (None: like their weights, needing no
    gradient), real tokens ``real`` (B, T) or None (the caller keeps its masks)."""
    weight = next(layers.parameters())
    probe = x if x is not None else weight.detach()
    why_not_onednn = _why_not_onednn(probe, weight, layers)
    use_onednn = why_not_onednn is None and not padded_only
    bucket = linear_kernels.ONEDNN_ROW_MULTIPLE
    linears = (f"oneDNN linear ({_where(probe)}) for row counts in multiples of {bucket}"
               + (", GELU by ctxvec's bf16 table (engine.native)" if gelu_by_table(probe.dtype) else "")
               + ("; LayerNorm by ctxvec's kernel (engine.native)" if native.norm_fast() else "")
               if use_onednn else f"F.linear ({why_not_onednn or 'a decoder or a module on its own'})")
    T = real.shape[1] if real is not None else (x.shape[1] if x is not None and x.dim() == 3 else 0)
    attention = _attention_rule(probe, T)
    if padded_only or real is None:
        return FastRoute(real, f"the tokens stay in place; {linears}; {attention}")
    n_real, n_all = int(real.sum()), real.numel()
    if use_onednn or n_real < n_all:
        autocast_bf16 = _autocast(probe) == torch.bfloat16 and probe.device.type == "cpu"
        multiple = linear_kernels.ONEDNN_ROW_MULTIPLE if use_onednn or autocast_bf16 else 1
        layout = (f"{n_real} of {n_all} tokens are real, only they go through the per-token steps"
                  if n_real < n_all else "every token is real, packed in rows oneDNN has a kernel for")
        rows = f"; rows in multiples of {multiple}" + (" (oneDNN runs bf16 autocast)" if autocast_bf16 else "")
        use_native, why_not_native = _native(probe, T, why_not_onednn, layers)
        on_tiles = " on AMX tiles" if native.on_tiles(probe.dtype) else ""
        attention = (f"self-attention: ctxvec's kernel{on_tiles} on the packed rows (up to "
                     f"{native_max_tokens(probe.dtype)} tokens, engine.native)" if use_native
                     else f"{attention} ({why_not_native})")
        return PackedRoute(real, f"{layout}{rows if multiple > 1 else ''}; {linears}; {attention}", multiple,
                           use_onednn, weights, use_native)
    return FastRoute(real, f"every token is real; {linears}; {attention}")


def route_for(encoder: nn.Module, attention_mask: torch.Tensor,
              weights: dict[nn.Module, torch.Tensor] | None = None) -> Route:
    """``choose`` for an ``Encoder``'s stack at inference, with its weights repacked for oneDNN
    (``engine.linear.repack_weights``)."""
    return choose(None, encoder.stack, attention_mask.bool(), False, weights)


def _autocast(probe: torch.Tensor) -> torch.dtype | None:
    kind = probe.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None


def _why_not_onednn(probe: torch.Tensor, weight: torch.Tensor, layers: nn.Module) -> str | None:
    """Why the oneDNN linear cannot run these layers' matrix multiplies (None: it can)."""
    if probe.device.type != "cpu":
        return f"on {probe.device.type}"
    if torch.is_grad_enabled() and (probe.requires_grad or any(p.requires_grad for p in layers.parameters())):
        return "gradients are wanted"
    if _autocast(probe) is not None:
        return f"autocast to {str(_autocast(probe)).removeprefix('torch.')}"
    if probe.dtype != weight.dtype or not onednn_dtype(probe.dtype):
        return f"no oneDNN linear for {str(probe.dtype).removeprefix('torch.')} here"
    return None


def _native(probe: torch.Tensor, T: int, why_not_onednn: str | None, layers: nn.Module) -> tuple[bool, str | None]:
    """Whether self-attention on the packed rows runs ctxvec's own kernel, else why not: at CPU
    inference (where oneDNN's linear may run), on sequences it is measured faster for on this
    CPU (``native_max_tokens``), for the head widths it is written for, where it builds."""
    if why_not_onednn is not None:
        return False, f"not ctxvec's kernel: {why_not_onednn}"
    limit = native_max_tokens(probe.dtype)
    if T > limit:
        return False, (f"not ctxvec's kernel: {T} tokens, it runs up to {limit}" if limit else
                       "not ctxvec's kernel: not measured on this CPU (benchmarks/bench_attention.py)")
    widths = {m.qkv.out_features // (3 * m.n_heads) for m in layers.modules() if isinstance(m, MultiHeadSelfAttention)}
    if not widths or not all(w in native.HEAD_WIDTHS for w in widths):
        return False, f"not ctxvec's kernel: head widths {sorted(widths)}, it takes {list(native.HEAD_WIDTHS)}"
    why_not = native.available()
    return (True, None) if why_not is None else (False, f"ctxvec's kernel is unavailable: {why_not}")


def _where(probe: torch.Tensor) -> str:
    return f"inference on a CPU, {str(probe.dtype).removeprefix('torch.')}"


def _attention_rule(probe: torch.Tensor, T: int) -> str:
    """The attention kernel's rule, and what it gives T tokens attending to themselves."""
    if probe.device.type != "cpu":
        return "attention: PyTorch's fused kernel"
    dtype = _autocast(probe) or probe.dtype
    limit = FUSED_CPU_MIN_SCORES.get(dtype, 0)
    here = ("" if not T else f" (here T·T = {T * T}: {'batched' if T * T < limit else 'fused'})")
    return (f"attention: batched while T·S < {limit} or with dropout, else PyTorch's fused kernel{here}; "
            "step by step where the probabilities are asked for")
