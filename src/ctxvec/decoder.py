"""The decoder: context vectors -> translation.

An encoder-decoder Transformer (Vaswani et al., 2017) built from the encoder's own modules: the
same ``MultiHeadSelfAttention`` (made causal by its mask, and cached), a ``MultiHeadCrossAttention``
sharing its attention step, the same ``FeedForward``, LayerNorms, ``Embeddings`` and ``Encoder``.

    target ids -> embedding + positions
      -> [ masked self-attention -> Add & Norm -> cross-attention over the encoder's context
           vectors -> Add & Norm -> feed-forward -> Add & Norm ] x N
      -> output projection -> next-token logits

Decoding (``ctxvec.decoding``: ``greedy_decode``, ``beam_search``) keeps a ``KVCache`` per
layer, so each new token costs one step instead of a re-run of the whole prefix.

Letters: B batch, T target length, S source length, D d_model, H heads, Dh head width,
V target vocabulary, K beams. Public masks are ``attention_mask`` (B, T), 1/True = real token.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ctxvec.attention import MultiHeadCrossAttention, MultiHeadSelfAttention
from ctxvec.config import EncoderConfig, refuse_unknown_fields
from ctxvec.dropout import Dropout
from ctxvec.embedding import Embeddings
from ctxvec.encoder import Encoder, _is_integer, check_attention_mask, init_weights, key_mask_from
from ctxvec.layer import FeedForward


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

    Pre-norm (``norm_first=True``) normalises each sub-layer's input instead.
    """

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        D, p = config.d_model, config.dropout
        self.norm_first = config.norm_first
        self.self_attention = MultiHeadSelfAttention(D, config.n_heads, p)
        self.dropout1 = Dropout(p)
        self.norm1 = nn.LayerNorm(D, eps=config.layer_norm_eps)
        self.cross_attention = MultiHeadCrossAttention(D, config.n_heads, p)
        self.dropout2 = Dropout(p)
        self.norm2 = nn.LayerNorm(D, eps=config.layer_norm_eps)
        self.feed_forward = FeedForward(D, config.d_ff, p, config.activation)
        self.dropout3 = Dropout(p)
        self.norm3 = nn.LayerNorm(D, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, self_mask: torch.Tensor | None,
                memory_mask: torch.Tensor | None, cache: KVCache | None = None,
                return_attention: bool = False) -> DecoderLayerOutput:
        """x: (B, T, D); memory: (B, S, D); self_mask: bool (B, 1, T, P + T), causal;
        memory_mask: bool (B, 1, 1, S). With a ``cache``, x holds only the new positions."""
        past = cache.self_key_value if cache is not None else None
        memory_kv = cache.memory_key_value if cache is not None else None
        if self.norm_first:
            a = self.self_attention(self.norm1(x), self_mask, return_attention, past_key_value=past)
            x = x + self.dropout1(a.output)
            c = self.cross_attention(self.norm2(x), memory, memory_mask, return_attention, memory_kv)
            x = x + self.dropout2(c.output)
            x = x + self.dropout3(self.feed_forward(self.norm3(x)))
        else:
            a = self.self_attention(x, self_mask, return_attention, past_key_value=past)
            x = self.norm1(x + self.dropout1(a.output))
            c = self.cross_attention(x, memory, memory_mask, return_attention, memory_kv)
            x = self.norm2(x + self.dropout2(c.output))
            x = self.norm3(x + self.dropout3(self.feed_forward(x)))
        if cache is not None:
            cache.self_key_value, cache.memory_key_value = a.key_value, c.key_value
        return DecoderLayerOutput(x, a.probabilities, c.probabilities)


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


@dataclass
class DecoderOutput:
    """What the decoder stack returns.

    Attributes:
        last_hidden_state: (B, T, D); values at padding positions are meaningless.
        self_attentions, cross_attentions: with ``output_attentions``, each layer's
            probabilities, (B, H, T, P + T) and (B, H, T, S).
    """

    last_hidden_state: torch.Tensor
    self_attentions: tuple[torch.Tensor, ...] | None = None
    cross_attentions: tuple[torch.Tensor, ...] | None = None


class DecoderStack(nn.Module):
    """N decoder layers (``config.n_layers``) in turn, plus a final LayerNorm for pre-norm.

    Takes already-embedded target tokens (B, T, D), the encoder's context vectors (B, S, D) and
    the public masks of both, 1/True = real token.
    """

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.n_layers))
        self.final_norm = (nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
                           if config.has_final_norm else None)
        self.apply(init_weights)

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
        x = hidden_states
        self_attentions, cross_attentions = [], []
        for i, layer in enumerate(self.layers):
            out = layer(x, memory, self_mask, memory_mask, cache[i] if cache is not None else None,
                        output_attentions)
            x = out.hidden_state
            self_attentions.append(out.self_attention)
            cross_attentions.append(out.cross_attention)
        if self.final_norm is not None:
            x = self.final_norm(x)
        if not output_attentions:
            return DecoderOutput(x)
        return DecoderOutput(x, tuple(self_attentions), tuple(cross_attentions))

    @classmethod
    def from_torch(cls, decoder: nn.TransformerDecoder) -> DecoderStack:
        """A stack with exactly the weights of a PyTorch ``nn.TransformerDecoder``.

        Works whatever its ``batch_first`` (ctxvec is always batch-first) and for both norm
        orders. Variants ctxvec does not implement are refused by name.
        """
        config, state = _config_and_state_from_torch(decoder)
        stack = cls(config)
        stack.load_state_dict(state, strict=True)
        first = next(decoder.parameters())
        return stack.to(device=first.device, dtype=first.dtype)


def _config_and_state_from_torch(
        decoder: nn.TransformerDecoder) -> tuple[EncoderConfig, dict[str, torch.Tensor]]:
    """Key by key, as ``torch_compat`` does for the encoder. PyTorch's cross-attention keeps Q,
    K and V in one ``in_proj_weight`` [W_q; W_k; W_v]: rows 0:D become ``q``, rows D:3D ``kv``."""
    from ctxvec.torch_compat import _activation_name, check_stack

    if not isinstance(decoder, nn.TransformerDecoder):
        raise TypeError(f"expected an nn.TransformerDecoder, got {type(decoder).__name__}.")
    layers = list(decoder.layers)
    for i, layer in enumerate(layers):
        if not isinstance(layer, nn.TransformerDecoderLayer):
            raise ValueError(f"layers[{i}] is a {type(layer).__name__}, not an nn.TransformerDecoderLayer.")
        for name in ("self_attn", "multihead_attn"):
            attn = getattr(layer, name)
            if not attn._qkv_same_embed_dim or attn.in_proj_weight is None:
                raise ValueError(f"layers[{i}].{name}: separate kdim/vdim are not supported.")
            if attn.in_proj_bias is None or attn.bias_k is not None or attn.add_zero_attn:
                raise ValueError(f"layers[{i}].{name}: bias=False, add_bias_kv and add_zero_attn "
                                 "are not supported.")
        for name in ("norm1", "norm2", "norm3"):
            norm = getattr(layer, name)
            if not isinstance(norm, nn.LayerNorm) or norm.weight is None or norm.bias is None:
                raise ValueError(f"layers[{i}].{name} must be an affine LayerNorm with bias.")
    check_stack(layers, decoder.norm, "decoder")
    final = decoder.norm
    first = layers[0]
    D = first.self_attn.embed_dim
    config = EncoderConfig(
        d_model=D, n_heads=first.self_attn.num_heads, d_ff=first.linear1.out_features,
        n_layers=len(layers), dropout=first.dropout.p, activation=_activation_name(first),  # type: ignore[arg-type]
        norm_first=first.norm_first, layer_norm_eps=first.norm1.eps, final_norm=final is not None)
    state: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(layers):
        theirs = {k: v.detach() for k, v in layer.state_dict().items()}
        ours = {
            "self_attention.qkv.weight": theirs["self_attn.in_proj_weight"],  # (3D, D)
            "self_attention.qkv.bias": theirs["self_attn.in_proj_bias"],
            "self_attention.out.weight": theirs["self_attn.out_proj.weight"],
            "self_attention.out.bias": theirs["self_attn.out_proj.bias"],
            "cross_attention.q.weight": theirs["multihead_attn.in_proj_weight"][:D],  # (D, D)
            "cross_attention.q.bias": theirs["multihead_attn.in_proj_bias"][:D],
            "cross_attention.kv.weight": theirs["multihead_attn.in_proj_weight"][D:],  # (2D, D)
            "cross_attention.kv.bias": theirs["multihead_attn.in_proj_bias"][D:],
            "cross_attention.out.weight": theirs["multihead_attn.out_proj.weight"],
            "cross_attention.out.bias": theirs["multihead_attn.out_proj.bias"],
            "feed_forward.up.weight": theirs["linear1.weight"],
            "feed_forward.up.bias": theirs["linear1.bias"],
            "feed_forward.down.weight": theirs["linear2.weight"],
            "feed_forward.down.bias": theirs["linear2.bias"],
        }
        for n in ("norm1", "norm2", "norm3"):
            ours[f"{n}.weight"], ours[f"{n}.bias"] = theirs[f"{n}.weight"], theirs[f"{n}.bias"]
        state.update({f"layers.{i}.{k}": v for k, v in ours.items()})
    if final is not None:
        state["final_norm.weight"] = final.weight.detach()
        state["final_norm.bias"] = final.bias.detach()
    return config, state


@dataclass(frozen=True)
class Seq2SeqConfig:
    """Hyperparameters of an encoder-decoder translator.

    The decoder copies the encoder's width, heads, feed-forward, norm placement, positions and
    dropout; only its depth and its vocabulary may differ.
    """

    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    n_decoder_layers: int | None = None  # None: as deep as the encoder
    # None: one vocabulary for both languages (a joint WordPiece), the encoder's vocab_size.
    tgt_vocab_size: int | None = None
    tgt_pad_id: int | None = None  # None: the encoder's pad_id
    # The decoder's input embedding is its output projection (Press & Wolf 2017; Vaswani et al.).
    tie_embeddings: bool = True
    # One token table for encoder and decoder; needs the shared vocabulary (tgt_vocab_size=None).
    share_embeddings: bool = False

    def __post_init__(self) -> None:
        def need(ok: bool, sentence: str) -> None:
            if not ok:
                raise ValueError(f"Invalid Seq2SeqConfig: {sentence}")

        def positive_int(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and value > 0

        need(isinstance(self.encoder, EncoderConfig),
             f"encoder must be an EncoderConfig, got {type(self.encoder).__name__}.")
        need(self.n_decoder_layers is None or positive_int(self.n_decoder_layers),
             f"n_decoder_layers must be a positive integer or None, got {self.n_decoder_layers!r}.")
        need(self.tgt_vocab_size is None or positive_int(self.tgt_vocab_size),
             f"tgt_vocab_size must be a positive integer or None, got {self.tgt_vocab_size!r}.")
        vocab = self.target_vocab_size
        pad = self.encoder.pad_id if self.tgt_pad_id is None else self.tgt_pad_id
        need(isinstance(pad, int) and not isinstance(pad, bool) and 0 <= pad < vocab,
             f"tgt_pad_id ({pad!r}) must be a token id in [0, target vocabulary size={vocab}).")
        for name in ("tie_embeddings", "share_embeddings"):
            need(isinstance(getattr(self, name), bool), f"{name} must be True or False.")
        need(not self.share_embeddings or self.tgt_vocab_size is None,
             "share_embeddings needs one vocabulary for both languages: leave tgt_vocab_size None.")

    @property
    def target_vocab_size(self) -> int:
        return self.encoder.vocab_size if self.tgt_vocab_size is None else self.tgt_vocab_size

    @property
    def decoder(self) -> EncoderConfig:
        """The decoder's layer hyperparameters: the encoder's, with its own depth and vocabulary."""
        return self.encoder.replace(
            n_layers=self.n_decoder_layers or self.encoder.n_layers, vocab_size=self.target_vocab_size,
            pad_id=self.encoder.pad_id if self.tgt_pad_id is None else self.tgt_pad_id)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Seq2SeqConfig:
        refuse_unknown_fields(cls, values)
        values = dict(values)
        if isinstance(values.get("encoder"), dict):
            values["encoder"] = EncoderConfig.from_dict(values["encoder"])
        return cls(**values)


def check_token_ids(ids: torch.Tensor, vocab_size: int, name: str) -> None:
    """Clear errors for ids that would otherwise fail deep inside PyTorch."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(ids).__name__}.")
    if not _is_integer(ids):
        raise TypeError(f"{name} must be an integer tensor of token ids, got {ids.dtype}.")
    if ids.dim() != 2 or ids.shape[1] == 0:
        raise ValueError(f"{name} must have shape (batch, seq_len) with seq_len >= 1, "
                         f"got {tuple(ids.shape)}.")
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(f"{name}: token id {low if low < 0 else high} is outside the vocabulary "
                         f"[0, {vocab_size}).")


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
        check_token_ids(input_ids, self.config.vocab_size, "tgt_ids")
        start = cache[0].length if cache else 0
        if start + input_ids.shape[1] > self.config.max_len:
            raise ValueError(f"target length {start + input_ids.shape[1]} exceeds max_len="
                             f"{self.config.max_len}, the size of the position table.")
        x = self.embeddings(input_ids, start=start)  # (B, T, D) at positions start .. start + T - 1
        return self.stack(x, memory, attention_mask, memory_attention_mask, cache, output_attentions)


@dataclass
class Seq2SeqOutput:
    """What the translator returns.

    Attributes:
        logits: (B, T, V) next-token scores at every target position.
        encoder_last_hidden_state: (B, S, D) the source's context vectors (0 at padding).
        decoder_last_hidden_state: (B, T, D).
        self_attentions, cross_attentions: with ``output_attentions``, per decoder layer.
    """

    logits: torch.Tensor
    encoder_last_hidden_state: torch.Tensor
    decoder_last_hidden_state: torch.Tensor
    self_attentions: tuple[torch.Tensor, ...] | None = None
    cross_attentions: tuple[torch.Tensor, ...] | None = None


def sequence_loss(logits: torch.Tensor, labels: torch.Tensor, label_mask: torch.Tensor | None = None,
                  label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy over the real labels. logits: (B, T, V); labels, label_mask: (B, T)."""
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree.")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}.")
    real = check_attention_mask(label_mask, tuple(labels.shape), labels.device)
    if not bool(real.any()):
        raise ValueError("label_mask has no real token: there is nothing to predict.")
    labels = labels.masked_fill(~real, -100)  # -100: ignored by cross_entropy
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten().long(), ignore_index=-100,
                           label_smoothing=label_smoothing)


class Translator(nn.Module):
    """Encoder + decoder + output projection: source ids -> next target-token logits.

    Example:
        >>> config = Seq2SeqConfig(EncoderConfig(vocab_size=100, d_model=32, n_heads=4, d_ff=64, n_layers=2))
        >>> model = Translator(config).eval()
        >>> src, tgt = torch.tensor([[5, 6, 7, 2]]), torch.tensor([[1, 8, 9]])
        >>> model(src, None, tgt).logits.shape
        torch.Size([1, 3, 100])
    """

    def __init__(self, config: Seq2SeqConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config.encoder)
        self.decoder = Decoder(config.decoder)
        self.output = nn.Linear(config.encoder.d_model, config.target_vocab_size, bias=False)
        # Weight matrices start Xavier-uniform, as in nn.Transformer and the Annotated
        # Transformer: BERT's N(0, 0.02) (``init_weights``) keeps a small translator's attention
        # near-uniform for hundreds of steps (d_model=32 copy task, 300 steps: 30% of sentences
        # right instead of 86%). Token tables keep their own initialisation.
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
        if config.share_embeddings:
            self.decoder.embeddings.tokens = self.encoder.embeddings.tokens
        if config.tie_embeddings:
            self.output.weight = self.decoder.embeddings.tokens.weight  # (V, D), one parameter

    def encode(self, src_ids: torch.Tensor, src_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, S) source ids -> (B, S, D) context vectors, the decoder's memory."""
        return self.encoder(src_ids, src_mask).last_hidden_state

    def forward(self, src_ids: torch.Tensor, src_mask: torch.Tensor | None, tgt_ids: torch.Tensor,
                tgt_mask: torch.Tensor | None = None, output_attentions: bool = False) -> Seq2SeqOutput:
        """src_ids, src_mask: (B, S); tgt_ids, tgt_mask: (B, T), the decoder's input (BOS first).

        ``logits[:, t]`` predicts target token t + 1 from tokens 0 .. t (teacher forcing).
        """
        if isinstance(src_ids, torch.Tensor) and isinstance(tgt_ids, torch.Tensor) \
                and src_ids.shape[:1] != tgt_ids.shape[:1]:
            raise ValueError(f"src_ids has batch {src_ids.shape[0]} but tgt_ids has {tgt_ids.shape[0]}.")
        memory = self.encode(src_ids, src_mask)
        out = self.decoder(tgt_ids, tgt_mask, memory, src_mask, output_attentions=output_attentions)
        return Seq2SeqOutput(self.output(out.last_hidden_state), memory, out.last_hidden_state,
                             out.self_attentions, out.cross_attentions)

    def loss(self, src_ids: torch.Tensor, src_mask: torch.Tensor | None, tgt_ids: torch.Tensor,
             tgt_mask: torch.Tensor | None = None, label_smoothing: float = 0.1) -> torch.Tensor:
        """Teacher-forced cross-entropy with label smoothing (0.1, as in Vaswani et al.).

        tgt_ids: (B, T) = BOS, y_1 .. y_n, EOS, padding: the decoder reads tokens 0 .. T-2 and
        predicts tokens 1 .. T-1; padding (tgt_mask 0) is ignored.
        """
        if isinstance(tgt_ids, torch.Tensor) and (tgt_ids.dim() != 2 or tgt_ids.shape[1] < 2):
            raise ValueError("tgt_ids must be (batch, seq_len >= 2): BOS, tokens, EOS; "
                             f"got {tuple(tgt_ids.shape)}.")
        if tgt_mask is not None:
            tgt_mask = check_attention_mask(tgt_mask, tuple(tgt_ids.shape), tgt_ids.device)
        inputs, labels = tgt_ids[:, :-1], tgt_ids[:, 1:]  # (B, T-1) each
        out = self(src_ids, src_mask, inputs, tgt_mask[:, :-1] if tgt_mask is not None else None)
        label_mask = tgt_mask[:, 1:] if tgt_mask is not None else None
        return sequence_loss(out.logits, labels, label_mask, label_smoothing)
