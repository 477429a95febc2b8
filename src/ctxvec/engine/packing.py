"""Packed real tokens: a padded (B, T) batch's real tokens as (R, C) rows, and back.

Everything in a layer but attention works token by token (projections, feed-forward,
LayerNorm, residuals), so it can skip padding altogether: the engine packs the N real tokens
once per forward pass, and attention alone unpacks them, per head, around softmax(Q·Kᵀ)·V.

Letters: B batch, T tokens, N real tokens, R packed rows (N rounded up), C channels,
G head slices, H heads, Dh head width.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


BUCKETS_PER_DOUBLING = 32  # above 32 multiples, row buckets grow with the rows: 1024-2048 in steps of 64


def bucket_rows(n: int, multiple: int) -> int:
    """``n`` rows rounded up to a bucket: a multiple of ``multiple`` up to ``BUCKETS_PER_DOUBLING``
    of them, then of a power of two times it, so that each doubling of the rows above holds that
    many buckets (there the spare rows stay under 1/16 of the rows). oneDNN keeps a kernel per
    matrix shape: a budget of 2,048 tokens then meets 48 row counts, not 64."""
    if multiple <= 1 or n <= 0:
        return n
    step = max(multiple, (1 << (n - 1).bit_length()) // BUCKETS_PER_DOUBLING)
    return -(-n // step) * step


@dataclass
class TokenPacking:
    """Where the real tokens of a padded (B, T) batch are, to pack them as (R, C) rows.

    Rows N..R-1 (R = ``bucket_rows(N, row_multiple)``) are spare copies of real tokens that
    nothing reads: they keep the matrix shapes to a few buckets (see ``engine.linear``).
    """

    index: torch.Tensor  # (N,) positions of the real tokens in the flattened (B * T) batch
    batch_size: int
    seq_len: int
    gather: torch.Tensor  # (R,) the position each packed row is read from: index, then spares
    sources: torch.Tensor  # (B * T,) the packed row each position is read from (padding: row 0)
    starts: torch.Tensor  # (B + 1,) sequence b's real tokens are rows starts[b] .. starts[b + 1] - 1
    # (kind, G) -> flat gather index of unpack_heads / pack_heads, made once per batch
    _head_index: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict, repr=False)

    @classmethod
    def from_mask(cls, real: torch.Tensor, row_multiple: int = 1) -> TokenPacking:
        """real: (B, T) bool, True = real token; the packed rows: ``bucket_rows(N, row_multiple)``."""
        flat = real.flatten()
        index = flat.nonzero().squeeze(1)  # (N,)
        n = len(index)
        r = bucket_rows(n, row_multiple)
        gather = index if r == n else index[torch.arange(r, device=index.device) % n]
        sources = torch.zeros_like(flat, dtype=torch.long).index_copy_(
            0, index, torch.arange(n, device=index.device))
        starts = torch.zeros(real.shape[0] + 1, dtype=torch.long, device=index.device)
        torch.cumsum(real.sum(1), 0, out=starts[1:])
        return cls(index, real.shape[0], real.shape[1], gather, sources, starts)

    @property
    def n_tokens(self) -> int:
        """N, the real tokens (the first N packed rows)."""
        return len(self.index)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, x.shape[-1]).index_select(0, self.gather)  # (B, T, C) -> (R, C)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.new_zeros(self.batch_size * self.seq_len, x.shape[-1])
        flat.index_copy_(0, self.index, x[: self.n_tokens])
        return flat.view(self.batch_size, self.seq_len, x.shape[-1])  # (R, C) -> (B, T, C), 0 at padding

    def unpack_heads(self, x: torch.Tensor, n_heads: int) -> torch.Tensor:
        """(R, G * Dh) packed rows of G head slices -> (G, B * T, Dh), heads first, by one gather.

        Each head's (B * T, Dh) slab comes out contiguous, so attention's batched matrix
        multiplies need no further copy. Padding positions hold a copy of a real token: finite,
        and never attended to (the key mask gives them probability exactly 0).
        """
        BT, Dh = self.batch_size * self.seq_len, x.shape[1] // n_heads
        if self.n_tokens == 0:
            return x.new_zeros(n_heads, BT, Dh)
        index = self._head_index.get(("unpack", n_heads))
        if index is None:  # slice g of position p is row sources[p] * G + g of x as (R * G, Dh)
            heads = torch.arange(n_heads, device=x.device)[:, None]  # (G, 1)
            index = self._head_index[("unpack", n_heads)] = (self.sources * n_heads + heads).flatten()
        slices = x.reshape(-1, Dh)  # (R, G * Dh) -> (R * G, Dh), a view
        return slices.index_select(0, index).view(n_heads, BT, Dh)  # (G, B * T, Dh)

    def pack_heads(self, heads: torch.Tensor) -> torch.Tensor:
        """(B, H, T, Dh) attention output -> (R, H * Dh) packed rows, the heads concatenated.

        One gather when the heads are head-major in memory, as ``engine.attention.batched_attention``
        leaves them
        (otherwise a copy to that layout first).
        """
        B, H, T, Dh = heads.shape
        index = self._head_index.get(("pack", H))
        if index is None:  # head h of packed row r is row h * B * T + gather[r] of (H * B * T, Dh)
            offsets = torch.arange(H, device=heads.device) * (B * T)  # (H,)
            index = self._head_index[("pack", H)] = (self.gather[:, None] + offsets).flatten()
        slabs = heads.transpose(0, 1).reshape(H * B * T, Dh)  # (B, H, T, Dh) -> (H * B * T, Dh)
        return slabs.index_select(0, index).view(-1, H * Dh)  # (R * H, Dh) -> (R, H * Dh)
