"""The decoder: context vectors -> translation.

An encoder-decoder Transformer (Vaswani et al., 2017) built from the encoder's own modules: the
same ``MultiHeadSelfAttention`` (made causal by its mask, and cached), a ``MultiHeadCrossAttention``
sharing its attention step, the same ``FeedForward``, LayerNorms, ``Embeddings`` and ``Encoder``.

    target ids -> embedding + positions
      -> [ masked self-attention -> Add & Norm -> cross-attention over the encoder's context
           vectors -> Add & Norm -> feed-forward -> Add & Norm ] x N
      -> output projection -> next-token logits

Decoding (``ctxvec.translate.decoding``: ``greedy_decode``, ``beam_search``) keeps a ``KVCache``
per layer, so each new token costs one step instead of a re-run of the whole prefix.
``Translator`` (``model.translator``) puts an ``Encoder``, this ``Decoder`` and the output
projection together.

Letters: B batch, T target length, S source length, D d_model, H heads, Dh head width,
V target vocabulary, K beams. Public masks are ``attention_mask`` (B, T), 1/True = real token.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from ctxvec.model.attention import MultiHeadCrossAttention, MultiHeadSelfAttention
from ctxvec.model.config import EncoderConfig
from ctxvec.model.embedding import Embeddings
from ctxvec.model.encoder import LayerStack, check_token_ids, init_weights
from ctxvec.model.masks import causal_key_mask, check_attention_mask, key_mask_from
from ctxvec.model.layer import FeedForward, post_norm, pre_norm
from ctxvec.model.route import Route, choose_route, default_route

log = logging.getLogger(__name__)


@dataclass
class KVCache:
    """One decoder layer's memory between decoding steps (mutated in place by the layer).

    Attributes:
        self_key_value: keys and values of every target token decoded so far, 2 x (B, H, P, Dh);
            each step appends one position.
        memory_key_value: the cross-attention's keys and values of the encoder's context vectors,
            2 x (B, H, S, Dh), computed at the first step and reused at every later one.
    """

    self_key_value: tuple[torch.Tensor, torch.Tensor] | None = None
    memory_key_value: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def length(self) -> int:
        """P, the number of target positions already cached."""
        return 0 if self.self_key_value is None else self.self_key_value[0].shape[2]

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows ``index`` (N,) of the self-attention cache: beam search's surviving beams.

        The memory's keys and values are not touched: beams of one sentence share them, and
        beam search only ever reorders beams within their sentence.
        """
        if self.self_key_value is not None:
            k, v = self.self_key_value
            self.self_key_value = (k.index_select(0, index), v.index_select(0, index))  # (N, H, P, Dh)


@dataclass
class DecoderLayerOutput:
    hidden_state: torch.Tensor  # (B, T, D)
    self_attention: torch.Tensor | None  # (B, H, T, P + T) probabilities, only when asked for
    cross_attention: torch.Tensor | None  # (B, H, T, S) probabilities, only when asked for


class DecoderLayer(nn.Module):
    """Masked self-attention, cross-attention and feed-forward, each with Add & Norm.

    Post-norm (the seed, ``norm_first=False``), as ``nn.TransformerDecoderLayer``::

        x = LayerNorm(x + Dropout(MaskedSelfAttention(x)))        # Add & Norm #1
        x = LayerNorm(x + Dropout(CrossAttention(x, memory)))     # Add & Norm #2
        x = LayerNorm(x + Dropout(FeedForward(x)))                # Add & Norm #3

    Pre-norm (``norm_first=True``) normalises each sub-layer's input instead. Each sub-layer
    applies its output's Dropout and adds x itself (``residual=``), as in ``EncoderLayer``.
    """

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        D, p = config.d_model, config.dropout
        self.norm_first = config.norm_first
        self.self_attention = MultiHeadSelfAttention(D, config.n_heads, p)
        self.norm1 = nn.LayerNorm(D, eps=config.layer_norm_eps)
        self.cross_attention = MultiHeadCrossAttention(D, config.n_heads, p)
        self.norm2 = nn.LayerNorm(D, eps=config.layer_norm_eps)
        self.feed_forward = FeedForward(D, config.d_ff, p, config.activation)
        self.norm3 = nn.LayerNorm(D, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, self_mask: torch.Tensor | None,
                memory_mask: torch.Tensor | None, cache: KVCache | None = None,
                return_attention: bool = False, route: Route | None = None) -> DecoderLayerOutput:
        """x: (B, T, D); memory: (B, S, D); self_mask: bool (B, 1, T, P + T), causal;
        memory_mask: bool (B, 1, 1, S). With a ``cache``, x holds only the new positions."""
        route = route or default_route(x, self)
        nf = self.norm_first
        past = cache.self_key_value if cache is not None else None
        memory_kv = cache.memory_key_value if cache is not None else None
        a = self.self_attention(pre_norm(x, self.norm1, nf, route), self_mask, return_attention, route, past,
                                residual=x)
        x = post_norm(a.output, self.norm1, nf, route)  # Add & Norm #1
        c = self.cross_attention(pre_norm(x, self.norm2, nf, route), memory, memory_mask, return_attention,
                                 memory_kv, route, residual=x)
        x = post_norm(c.output, self.norm2, nf, route)  # Add & Norm #2
        ffn = self.feed_forward(pre_norm(x, self.norm3, nf, route), route, residual=x)
        x = post_norm(ffn, self.norm3, nf, route)  # Add & Norm #3
        if cache is not None:
            if a.key_value is None:  # a route that attends without laying them out (Route.self_attend)
                raise RuntimeError(f"the route {route.name!r} kept no keys and values; a decoder's cache "
                                   "needs a padded route.")
            cache.self_key_value, cache.memory_key_value = a.key_value, c.key_value
        return DecoderLayerOutput(x, a.probabilities, c.probabilities)


@dataclass
class DecoderOutput:
    """What the decoder stack returns.

    Attributes:
        last_hidden_state: (B, T, D); values at padding positions are meaningless.
        self_attentions, cross_attentions: with ``output_attentions``, each layer's
            probabilities, (B, H, T, P + T) and (B, H, T, S).
        route: how this forward pass ran and why.
    """

    last_hidden_state: torch.Tensor
    self_attentions: tuple[torch.Tensor, ...] | None = None
    cross_attentions: tuple[torch.Tensor, ...] | None = None
    route: str = ""  # how this forward pass ran and why (``model.route``)


class DecoderStack(LayerStack):
    """N decoder layers (``config.n_layers``) in turn, plus a final LayerNorm for pre-norm.

    Takes already-embedded target tokens (B, T, D), the encoder's context vectors (B, S, D) and
    the public masks of both, 1/True = real token.
    """

    layer_class = DecoderLayer

    def new_cache(self) -> list[KVCache]:
        """An empty cache, one ``KVCache`` per layer, for step-by-step decoding."""
        return [KVCache() for _ in self.layers]

    def forward(self, hidden_states: torch.Tensor, memory: torch.Tensor,
                attention_mask: torch.Tensor | None = None,
                memory_attention_mask: torch.Tensor | None = None,
                cache: list[KVCache] | None = None, output_attentions: bool = False) -> DecoderOutput:
        """hidden_states: (B, T, D); memory: (B, S, D); attention_mask: (B, P + T) over the cached
        and the new positions; memory_attention_mask: (B, S). With ``cache`` (from
        ``new_cache``), hidden_states holds only the T new positions and the cache grows by T."""
        D = self.config.d_model
        for name, t in (("hidden_states", hidden_states), ("memory", memory)):
            if not isinstance(t, torch.Tensor) or t.dim() != 3 or t.shape[-1] != D:
                raise ValueError(f"{name} must be a (batch, seq_len, d_model={D}) tensor, got "
                                 f"{tuple(getattr(t, 'shape', ())) or type(t).__name__}.")
        if memory.shape[0] != hidden_states.shape[0]:
            raise ValueError(f"memory has batch {memory.shape[0]} but hidden_states has "
                             f"{hidden_states.shape[0]}.")
        if cache is not None and len(cache) != len(self.layers):
            raise ValueError(f"cache has {len(cache)} entries, one per layer is {len(self.layers)}.")
        B, T = hidden_states.shape[:2]
        past = cache[0].length if cache is not None else 0
        real = check_attention_mask(attention_mask, (B, past + T), hidden_states.device)
        self_mask = causal_key_mask(real, T)
        memory_real = check_attention_mask(memory_attention_mask, tuple(memory.shape[:2]), memory.device)
        memory_mask = key_mask_from(memory_real)
        # the tokens stay in place: they attend causally to a cache, with masks of their own
        route = choose_route(hidden_states, self, None, padded_only=True)
        log.debug("decoder route: %s", route.describe())
        x = hidden_states
        self_attentions, cross_attentions = [], []
        for i, layer in enumerate(self.layers):
            out = layer(x, memory, self_mask, memory_mask, cache[i] if cache is not None else None,
                        output_attentions, route)
            x = out.hidden_state
            self_attentions.append(out.self_attention)
            cross_attentions.append(out.cross_attention)
        if self.final_norm is not None:
            x = self.final_norm(x)
        if not output_attentions:
            return DecoderOutput(x, route=route.describe())
        return DecoderOutput(x, tuple(self_attentions), tuple(cross_attentions), route.describe())


class Decoder(nn.Module):
    """Target embeddings + positions + the decoder stack (the mirror of ``Encoder``)."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.stack = DecoderStack(config)
        self.embeddings.apply(init_weights)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, memory: torch.Tensor,
                memory_attention_mask: torch.Tensor | None = None, cache: list[KVCache] | None = None,
                output_attentions: bool = False) -> DecoderOutput:
        """input_ids: (B, T) target tokens (only the new ones with a ``cache``)."""
        start = cache[0].length if cache else 0
        check_token_ids(input_ids, self.config, "tgt_ids", start)
        x = self.embeddings(input_ids, start=start)  # (B, T, D) at positions start .. start + T - 1
        return self.stack(x, memory, attention_mask, memory_attention_mask, cache, output_attentions)


