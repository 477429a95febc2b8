"""Batches of few shapes: texts sorted by length under a token budget, padded to bucketed shapes.

Sorting by length keeps padding small; padding every batch to a width that is a multiple of
``LENGTH_MULTIPLE`` and to the budget's row count (or a power of two for a short batch) keeps
the matrix shapes to a few buckets, which oneDNN (it compiles and keeps a kernel per shape)
needs for memory to stay flat over a long job.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch

from ctxvec.engine.attention import aligned_width
from ctxvec.engine.runtime import cpu_has_amx

# Padded tokens per forward pass. On a 2-core CPU, batches of ~1k tokens keep the activations
# in cache (benchmarks/bench_encode.py measured 1024 ahead of 2048 and 8192 for MiniLM; at
# 2048 large fp32 temporaries start to cost page faults, and fp32 on an AMX Xeon runs level).
DEFAULT_BATCH_TOKENS = 1024
# bf16 on a CPU with AMX: 2048. Its matrix multiplies are short, so per-batch costs (each
# operator's start and its threads' fork and join, Python between them) weigh, and half as
# many batches pay them half as often: MiniLM on 1,500 lines, 2 threads, same process,
# alternating, 1.16x faster with 2 streams, 1.18x in one stream. With the row buckets coarser
# above 1,024 rows (``engine.packing.bucket_rows``: 48 up to 2,048, not 64) a 100,000-line
# ``ctxvec embed`` grew by 47 MB after its first quarter (1024: 37 MB), then levelled.
AMX_BF16_BATCH_TOKENS = 2048


def default_batch_tokens(dtype: torch.dtype, device: torch.device | str = "cpu") -> int:
    """The token budget a pipeline in ``dtype`` on ``device`` batches by unless told otherwise:
    ``AMX_BF16_BATCH_TOKENS`` for bf16 on a CPU with AMX, else ``DEFAULT_BATCH_TOKENS``."""
    on_cpu = torch.device(device).type == "cpu"
    return AMX_BF16_BATCH_TOKENS if on_cpu and dtype == torch.bfloat16 and cpu_has_amx() else DEFAULT_BATCH_TOKENS
# Batches are padded to a width that is a multiple of this, and to as many rows as the budget
# allows at that width (rows of padding only): attention's matrix multiplies then come in at
# most max_len / 4 shapes. oneDNN, which runs them in bf16, compiles and keeps a kernel per
# shape (~0.7 MB each): with shapes that changed from batch to batch, a long job's memory grew
# chunk after chunk. (Multiples of 4 cost ~1% of speed, of 8 ~2%: attention grows with width².)
LENGTH_MULTIPLE = 4


def rounded_width(longest: int) -> int:
    """``longest`` rounded up to a multiple of ``LENGTH_MULTIPLE``: the width of a training batch
    (training attends by the batched kernel, with dropout; its few evaluation passes keep the
    training shapes)."""
    return -(-longest // LENGTH_MULTIPLE) * LENGTH_MULTIPLE


def padded_width(longest: int, dtype: torch.dtype) -> int:
    """The width an inference batch in ``dtype`` whose longest text has ``longest`` tokens is
    padded to: a multiple of ``LENGTH_MULTIPLE``, and where the fused attention kernel takes it,
    of its blocks (``engine.attention.aligned_width``)."""
    return aligned_width(rounded_width(longest), dtype)


def length_sorted_batches(lengths: Sequence[int], batch_tokens: int,
                          width_of: Callable[[int], int] | None = None) -> Iterator[list[int]]:
    """Indices grouped into batches of similar length whose padded size stays under the budget.

    A batch holds texts sorted by length, so padding is at most the gap to its longest text;
    ``len(batch) * width_of(longest) <= batch_tokens`` (a single text longer than the budget
    is alone), ``width_of``: the width a batch is padded to (None: its longest length).
    """
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    batch: list[int] = []
    for i in order:
        longest = lengths[i] if width_of is None else width_of(lengths[i])  # lengths[i]: the longest so far
        if batch and (len(batch) + 1) * longest > batch_tokens:
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


def padded_shape(longest: int, n_texts: int, batch_tokens: int, max_len: int,
                 width_of: Callable[[int], int]) -> tuple[int, int]:
    """(rows, width) that a batch of ``n_texts`` texts, the longest ``longest`` tokens, is padded to.

    The width is ``width_of(longest)`` (at most ``max_len``). The rows are the
    texts rounded up to a power of two, but never past what ``batch_tokens`` allows at that
    width: a full batch keeps exactly the budget's row count, and a batch of a few texts stays
    a few rows whatever the budget (memory grows with the work, not with ``batch_tokens``).
    Either way the shapes come in few sizes, which is what oneDNN's kernel cache needs.
    """
    width = min(width_of(longest), max(max_len, longest))
    bucket = 1 << (n_texts - 1).bit_length()  # the next power of two
    return max(n_texts, min(bucket, batch_tokens // width)), width
