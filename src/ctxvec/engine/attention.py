"""The engine's attention kernels: a batched attention for the short sequences of text on CPUs.

PyTorch's fused CPU kernel for ``scaled_dot_product_attention`` is blocked for long sequences;
for the short ones text has, two batched matrix multiplies around one fp32 softmax can be
faster (``benchmarks/bench_attention.py``). Where they cross over depends on the CPU: on AMD
EPYCs with AVX-512 the batched one wins up to 256-512 tokens; on an AMX Xeon the fused kernel
wins from about 48 tokens in bf16 and 96 in fp32 (the rule below), most where the width is a
multiple of its 16-row blocks.
``fast_attention`` picks the kernel by one rule; ``aligned_width`` is the width a batch is
padded to so that the fused kernel runs whole blocks. Shorter sequences of packed rows skip
all of them for ctxvec's own kernel (``native_max_tokens``, ``engine.native``).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

import ctxvec.engine.native as native
from ctxvec.engine.runtime import cpu_has_amx
from ctxvec.model.dropout import Dropout

# From this many scores per head (T * S) on, PyTorch's fused CPU kernel is the faster one; below,
# ``batched_attention`` is (benchmarks/bench_attention.py, batches of ~1k tokens). Other dtypes:
# always the fused kernel.
# - AMD EPYC with AVX-512 (2 cores): batched 1.5-3x faster in fp32 at T = S = 16..128, even at
#   256, slower from 384 on; in bf16 1.4-3x faster up to 512, the longest measured.
# - Intel Xeon with AMX (2 cores, 1 thread per stream): at widths in multiples of 16 the fused
#   kernel is 1.3-2.3x faster from 64 on in bf16 (and mostly from 32), 1.1-1.4x in fp32; between
#   them it runs a tail block and can fall behind. End to end (MiniLM, 2 streams, widths aligned
#   where it runs), bf16 from 48 and fp32 from 96 tokens on against this EPYC rule: texts of
#   ~186 tokens bf16 1.75x, fp32 1.11x; ~96: 1.21x, 1.02x; ~46: 1.15x, 1.02x; ~31: level
#   (fp32 from 64 on lost 2% at ~46 tokens).
_AVX512_EPYC = {torch.float32: 256 * 256 + 1, torch.bfloat16: 512 * 512 + 1}
_AMX_XEON = {torch.float32: 96 * 96, torch.bfloat16: 48 * 48}
FUSED_CPU_MIN_SCORES = _AMX_XEON if cpu_has_amx() else _AVX512_EPYC
# Where the fused kernel runs, batches are padded to a width in multiples of this (1: as is).
FUSED_CPU_WIDTH_MULTIPLE = 16 if cpu_has_amx() else 1
# Up to this many tokens a sequence, self-attention on packed rows at CPU inference runs
# ctxvec's own kernel (``engine.native``, where it builds) instead of any of the above: it reads
# the rows as they are, so the unpacking, the mask and the packing back go. On an AMX Xeon
# (1 thread, ~1k-token batches, from the packed rows to the packed rows against the route's
# gathers and attention): fp32 2.2-8x faster up to ~119 tokens, 1.15x at ~167, level at ~188,
# slower from ~216; bf16 2.4-2.8x up to ~53 tokens, 1.3x at ~112, level at ~129, slower from
# ~144, where PyTorch's fused kernel uses AMX; end to end (MiniLM, 2 threads) bf16 +12% to
# +19% on texts of 31-46 tokens, fp32 +5%, both +2% at ~96. Other CPUs are not measured yet
# (bench_attention.py has the kernel's column; without AVX-512 it is slow, see its source):
# there, PyTorch's kernels run until a measurement sets their row.
NATIVE_MAX_TOKENS: dict[torch.dtype, int] = {torch.float32: 176, torch.bfloat16: 128} if cpu_has_amx() else {}
# In bf16 on AMX tiles (``native.tiles()``: the CPU has them and the system grants them), the
# kernel's two matrix multiplies run on the tile unit: 1.7x the vector kernel at ~31 tokens,
# 2.5x at 128, 4x at 256 (one thread, heads of 32), and faster than the route's gathers and
# PyTorch's fused kernel up to its longest sequence; end to end (MiniLM, 2 threads) +4% on
# texts of ~31 tokens, +18% at ~95, +19% at ~185 against the vector kernel's rule. So on tiles
# it takes every sequence it can (``native.max_tokens()``).


def native_max_tokens(dtype: torch.dtype) -> int:
    """The longest sequence ctxvec's kernel attends in ``dtype`` on this CPU (0: none), as measured."""
    limit = NATIVE_MAX_TOKENS.get(dtype, 0)
    return native.max_tokens() if limit and native.on_tiles(dtype) else limit


def aligned_width(width: int, dtype: torch.dtype) -> int:
    """``width`` rounded up to ``FUSED_CPU_WIDTH_MULTIPLE`` if the fused kernel takes a sequence
    of that width in ``dtype`` on this CPU, else ``width`` itself (widths ctxvec's own kernel
    takes are aligned too: the rule does not know the model's heads, and the packed rows it
    reads hold no padding whatever the width). (The rule is the CPU's; a GPU
    pipeline on such a host gets the same aligned widths, which its kernels do not mind.)"""
    if width * width < FUSED_CPU_MIN_SCORES.get(dtype, 0):
        return width
    return -(-width // FUSED_CPU_WIDTH_MULTIPLE) * FUSED_CPU_WIDTH_MULTIPLE


def batched_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      key_mask: torch.Tensor | None, dropout: Dropout | None = None) -> torch.Tensor:
    """softmax(Q·Kᵀ / √d + mask) · V as two batched matrix multiplies around one softmax.

    The same numbers as ``attention`` (within rounding) without the probabilities: the scaling
    and the mask (a bias of 0 or -inf) are one broadcast pass, and they and the softmax run in
    fp32 whatever the input's precision. In bf16 the scores come out of their matrix multiply
    rounded to bf16, as in eager bf16 attention; the fused kernel keeps them in fp32 and errs
    about 1.5x less (a test bounds it).
    For short sequences on a CPU this beats the fused kernel, whose blocking is made for long
    ones; inputs laid out head-major, as ``TokenPacking.unpack_heads`` leaves them, are not copied.

    q: (B, H, T, Dh); k, v: (B, H, S, Dh); key_mask: bool broadcastable to (B, H, T, S), every
    row allowing at least one key. Returns (B, H, T, Dh).
    """
    B, H, T, Dh = q.shape
    S = k.shape[2]
    # heads first: (B, H, T, Dh) -> (H, B, T, Dh) -> (H * B, T, Dh), a view when head-major
    q3, k3, v3 = (t.transpose(0, 1).reshape(H * B, t.shape[2], Dh) for t in (q, k, v))
    scores = torch.bmm(q3, k3.transpose(1, 2)).view(H, B, T, S)  # Q·Kᵀ: (H, B, T, S)
    scale = 1 / math.sqrt(Dh)
    if key_mask is None:
        scores = scores.to(torch.float32).mul_(scale)
    else:
        bias = torch.zeros(key_mask.shape, dtype=torch.float32, device=q.device)
        bias = bias.masked_fill_(~key_mask, float("-inf")).expand(B, H, T, S).transpose(0, 1)
        scores = torch.add(bias, scores, alpha=scale)  # ÷ √d + mask, in fp32: (H, B, T, S)
    weights = scores.softmax(dim=-1).to(v.dtype)
    if dropout is not None:
        weights = dropout(weights)
    heads = torch.bmm(weights.view(H * B, T, S), v3)  # (H * B, T, Dh)
    return heads.view(H, B, T, Dh).transpose(0, 1)  # (B, H, T, Dh), head-major in memory


def fast_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None,
           dropout: nn.Module) -> torch.Tensor:
    """softmax(Q·Kᵀ / √d) · V by the faster kernel for these inputs (the same numbers either way):

    - ``batched_attention`` on a CPU for short sequences (T * S below ``FUSED_CPU_MIN_SCORES``),
      and in CPU training with dropout (PyTorch's CPU kernel has no dropout and falls back to
      eager steps with its slower per-element mask);
    - PyTorch's fused ``scaled_dot_product_attention`` otherwise (GPUs, long sequences).

    q: (B, H, T, Dh); k, v: (B, H, S, Dh); key_mask: bool broadcastable to (B, H, T, S).
    Returns (B, H, T, Dh).
    """
    if q.device.type == "cpu":
        with_dropout = dropout.training and dropout.p > 0
        if with_dropout or q.shape[2] * k.shape[2] < FUSED_CPU_MIN_SCORES.get(q.dtype, 0):
            return batched_attention(q, k, v, key_mask, dropout if with_dropout else None)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=key_mask, dropout_p=dropout.p if dropout.training else 0.0)
