"""Masks: the one public convention, ``attention_mask`` (B, T), 1/True = real token, checked and
converted once into the boolean "may attend" masks the attention layers take (True = may attend).

Letters: B batch, T tokens (queries), P cached positions, S keys.
"""

from __future__ import annotations

import torch


def is_integer_tensor(t: torch.Tensor) -> bool:
    return not t.dtype.is_floating_point and not t.dtype.is_complex and t.dtype != torch.bool


def check_attention_mask(attention_mask: torch.Tensor | None, shape: tuple[int, int],
                         device: torch.device) -> torch.Tensor:
    """Validate the public (B, T) mask and return it as bool (True = real token)."""
    if attention_mask is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a torch.Tensor, got {type(attention_mask).__name__}.")
    if attention_mask.dtype != torch.bool and not is_integer_tensor(attention_mask):
        raise TypeError(
            f"attention_mask must be bool or integer with 1/True for real tokens and 0/False for "
            f"padding; got dtype {attention_mask.dtype}. (A float mask is refused rather than "
            "guessed: additive masks use the opposite convention.)")
    if tuple(attention_mask.shape) != tuple(shape):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)} but the input has "
                         f"(batch, seq_len) = {tuple(shape)}; they must match (batch-first).")
    if attention_mask.device != device:
        raise ValueError(f"attention_mask is on {attention_mask.device} but the input is on {device}.")
    if attention_mask.dtype != torch.bool:
        if attention_mask.numel() and ((attention_mask != 0) & (attention_mask != 1)).any():
            bad = attention_mask[(attention_mask != 0) & (attention_mask != 1)][0].item()
            raise ValueError(f"attention_mask must contain only 0 and 1, found {bad}.")
        attention_mask = attention_mask.bool()
    return attention_mask


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


def causal_key_mask(real: torch.Tensor, n_new: int) -> torch.Tensor | None:
    """(B, P + T) bool real-token mask -> (B, 1, T, P + T) "may attend" mask for T new tokens.

    New token i sits at position P + i and may attend to keys 0 .. P + i that are real. A query
    left with no key at all (a row of padding) may attend to every key, so it stays finite;
    its output is meaningless. None when every key may be attended (one new token, no padding).
    """
    total = real.shape[1]
    if n_new == 1 and bool(real.all()):
        return None
    causal = torch.ones(n_new, total, dtype=torch.bool, device=real.device).tril(total - n_new)  # (T, P+T)
    mask = causal[None, None] & real[:, None, None, :]  # (B, 1, T, P + T)
    return mask | ~mask.any(dim=-1, keepdim=True)
