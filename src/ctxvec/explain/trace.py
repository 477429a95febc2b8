"""Explain, the trace: one text through the encoder, every step recorded, checked against the model.

``trace(pipeline, text)`` runs the encoder's own forward pass on the plain route (padded
tensors, every step in the open; ``model.route``) with forward hooks on its modules, and keeps
what each step computed in a ``Trace``. It then checks the result against the model's normal,
fast forward pass (within 1e-5), so the page can never show numbers the model does not produce.
The trace ends where ``Pipeline.embed`` ends: the pipeline's own ``Pooling`` turns the context
vectors into the sentence vector, and any further texts get theirs from ``Pipeline.embed``,
with their cosine similarities (``PoolingTrace``).

The text is run alone (a batch of one), padded with a few [PAD] tokens so that the page can
show what padding and the attention mask do; padding never changes the real tokens' vectors.

Letters in shape comments: T tokens (real + padding), n real tokens, V vocabulary, D d_model,
H heads, Dh head width, F d_ff, L layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ctxvec.model.config import EncoderConfig
from ctxvec.validation import is_int
from ctxvec.model.embedding import one_hot
from ctxvec.model.encoder import Encoder
from ctxvec.model.layer import EncoderLayer
from ctxvec.model.route import Route
from ctxvec.pipeline import Pipeline
from ctxvec.model.pooling import Pooling

DEFAULT_MAX_TOKENS = 64  # the page stays readable (and its data small) up to about this many
DEFAULT_PADDING = 2  # [PAD] tokens appended to show padding and the attention mask
TOLERANCE = 1e-5  # largest allowed difference between the trace and the model (relative above 1)

@dataclass
class LayerTrace:
    """One encoder layer's intermediate tensors (a batch of one: the leading 1 is kept).

    ``norm1_input`` / ``norm1_output`` are what LayerNorm #1 receives and returns: in post-norm
    the residual sum ``x + attention`` and the layer's stream after step 6; in pre-norm the
    stream ``x`` and the attention's input. The same holds for ``norm2_*`` around the FFN.
    """

    input: torch.Tensor  # (1, T, D)
    q: torch.Tensor  # (1, H, T, Dh)
    k: torch.Tensor  # (1, H, T, Dh)
    v: torch.Tensor  # (1, H, T, Dh)
    scores: torch.Tensor  # (1, H, T, T) Q·Kᵀ / √Dh, -inf at padding keys
    probabilities: torch.Tensor  # (1, H, T, T) softmax over the real keys
    concat: torch.Tensor  # (1, T, D) the heads side by side again
    attention_output: torch.Tensor  # (1, T, D) after the output projection
    norm1_input: torch.Tensor  # (1, T, D)
    norm1_output: torch.Tensor  # (1, T, D)
    ffn_pre_activation: torch.Tensor  # (1, T, F) up(x)
    ffn_hidden: torch.Tensor  # (1, T, F) activation(up(x))
    ffn_output: torch.Tensor  # (1, T, D) down(hidden)
    norm2_input: torch.Tensor  # (1, T, D)
    norm2_output: torch.Tensor  # (1, T, D)
    output: torch.Tensor  # (1, T, D) before the final LayerNorm, if the model has one


@dataclass
class PoolingTrace:
    """Step 9: the context vectors pooled into one sentence vector, as ``Pipeline.embed`` does.

    ``pooled`` and ``vector`` come from the traced tokens through the pipeline's own ``Pooling``;
    ``vectors`` are ``Pipeline.embed(texts)`` itself (what ``ctxvec embed`` writes), the traced
    text first. When the trace saw the same tokens as ``embed`` (no --max-tokens cut),
    ``vector`` equals ``vectors[0]`` within the tolerance and ``embed_error`` says by how much.
    """

    mode: str  # the pipeline's Pooling: "mean", "cls" or "max"
    normalize: bool  # whether it scales the sentence vector to unit L2 norm
    pooled: torch.Tensor  # (D,) the traced text's real tokens pooled, before any normalisation
    vector: torch.Tensor  # (D,) its sentence vector
    texts: list[str]  # the traced text, then the others
    vectors: np.ndarray  # (m, D) Pipeline.embed(texts)
    n_tokens: list[int]  # tokens embed read per text (special tokens included)
    truncated: list[bool]  # whether embed cut the text at the model's limit
    embed_error: float | None  # max |vector - vectors[0]|; None when --max-tokens cut the trace


@dataclass
class Trace:
    """Every step of one text through the encoder, with the facts the page needs."""

    text: str
    model: str
    description: str
    config: EncoderConfig
    tokens: list[str]  # T entries, padding included
    kinds: list[str]  # "special", "word" or "pad" per token
    input_ids: torch.Tensor  # (1, T)
    attention_mask: torch.Tensor  # (1, T), 1 = real token
    n_real: int
    n_tokens_full: int  # tokens in the whole text (special tokens included)
    truncated: bool  # cut to max_tokens (or to the model's limit)
    cut_by: str | None  # which limit cut the text: "max_tokens", "model" or None (not cut)
    max_tokens: int
    model_max_len: int
    padding_requested: int  # [PAD] tokens asked for; len(tokens) - n_real were appended
    one_hot: torch.Tensor  # (1, T, V)
    lookup_error: float  # max |one_hot @ E - E[ids]|
    token_embedding: torch.Tensor  # (1, T, D), scaled by √D when the config says so
    positions: torch.Tensor  # (T, D)
    token_type: torch.Tensor | None  # (D,) segment 0's vector, BERT only
    embedding_sum: torch.Tensor  # (1, T, D) tokens + positions (+ segment)
    embeddings: torch.Tensor  # (1, T, D) the first layer's input (after LayerNorm, BERT)
    layers: list[LayerTrace]
    final: torch.Tensor  # (1, T, D) the context vectors
    pooling: PoolingTrace
    max_error: float  # largest difference from the model (relative to the values' size above 1)


def trace(pipeline: Pipeline, text: str, max_tokens: int = DEFAULT_MAX_TOKENS,
          padding: int = DEFAULT_PADDING, others: Sequence[str] = ()) -> Trace:
    """Run ``text`` through ``pipeline``'s encoder step by step and record every tensor.

    Args:
        pipeline: a loaded model (``ctxvec.load(...)``), in fp32.
        text: the text to trace.
        max_tokens: keep at most this many tokens (special tokens included); a longer text is
            cut and the page says so.
        padding: how many [PAD] tokens to append (0 for none), to show the attention mask; at
            most as many as the model's position table has room for.
        others: more texts, for their sentence vectors and cosine similarities (step 9).

    Raises:
        ValueError: bad arguments, or a model not in fp32.
        RuntimeError: the trace differs from the model by more than 1e-5 (a bug).
    """
    encoder, tokenizer = pipeline.encoder, pipeline.tokenizer
    config = encoder.config
    for item in [text, *others]:
        if not isinstance(item, str):
            raise TypeError(f"texts must be str, got {type(item).__name__}.")
    if next(encoder.parameters()).dtype != torch.float32:
        raise ValueError("explain shows the fp32 model; load it with precision='fp32'.")
    if not is_int(max_tokens) or max_tokens <= tokenizer.n_special:
        raise ValueError(f"max_tokens must be an integer above the {tokenizer.n_special} special "
                         f"tokens, got {max_tokens!r}.")
    if not is_int(padding) or padding < 0:
        raise ValueError(f"padding must be a non-negative integer, got {padding!r}.")
    encoded = tokenizer.tokenize([text], max_len=min(max_tokens, tokenizer.max_len))[0]
    n = len(encoded.ids)
    applied = min(padding, config.max_len - n)  # the position table ends there
    batch = tokenizer.pad([encoded], length=n + applied)
    device = next(encoder.parameters()).device
    ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)  # (1, T), (1, T)
    kinds = ["special" if s else "word" for s in encoded.special_tokens_mask] + ["pad"] * applied
    # the smaller limit cut the text; at a tie the model's (it could not have read more anyway)
    cut_by = None if not encoded.truncated else "max_tokens" if max_tokens < tokenizer.max_len else "model"

    was_training = encoder.training
    encoder.eval()  # dropout off: the page shows inference
    try:
        with torch.inference_mode():
            steps = _run_steps(encoder, ids, mask)
            pooling = _pool(pipeline, steps["final"], mask, [text, *others],
                            same_tokens=cut_by != "max_tokens")
            max_error = _check_against_model(encoder, ids, mask, steps, pooling)
    finally:
        encoder.train(was_training)
    return Trace(text=text, model=pipeline.name, description=pipeline.description, config=config,
                 tokens=encoded.tokens + [tokenizer.pad_token] * applied, kinds=kinds,
                 input_ids=ids, attention_mask=mask, n_real=n, n_tokens_full=encoded.n_tokens_full,
                 truncated=encoded.truncated, cut_by=cut_by, max_tokens=max_tokens,
                 model_max_len=tokenizer.max_len, padding_requested=padding, pooling=pooling,
                 max_error=max_error, **steps)


def _run_steps(encoder: Encoder, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, Any]:
    """The encoder's own forward pass, on the plain route (padded tensors, every step in the
    open), with forward hooks on its modules recording what each step computed: the page shows
    the model's numbers, never a re-implementation of them."""
    config, emb, layers = encoder.config, encoder.embeddings, encoder.stack.layers
    # 2) one-hot, and why the embedding is a lookup: one_hot @ E == E[ids]
    hot = one_hot(ids, config.vocab_size)  # (1, T, V)
    lookup_error = float((hot @ emb.tokens.weight - emb.tokens.weight[ids]).abs().max())
    seen: dict[tuple[str, int], tuple[tuple, Any]] = {}  # (name, layer) -> (inputs, output)
    watched = {("tokens", -1): emb.tokens, ("positions", -1): emb.positions, ("embeddings", -1): emb}
    if emb.norm is not None:
        watched[("embedding_norm", -1)] = emb.norm
    for i, layer in enumerate(layers):
        watched.update({("layer", i): layer, ("qkv", i): layer.attention.qkv, ("out", i): layer.attention.out,
                        ("attention", i): layer.attention, ("norm1", i): layer.norm1, ("up", i): layer.feed_forward.up,
                        ("down", i): layer.feed_forward.down, ("norm2", i): layer.norm2})
    hooks = [module.register_forward_hook(lambda m, args, out, key=key: seen.__setitem__(key, (args, out)))
             for key, module in watched.items()]
    try:
        route = Route(mask.bool(), "explain: the plain route, every step on padded tensors")
        final = encoder(ids, mask, output_attentions=True, route=route).last_hidden_state  # (1, T, D)
    finally:
        for hook in hooks:
            hook.remove()
    token_type = emb.token_types.weight[0].detach() if emb.token_types is not None else None  # (D,)
    embeddings = seen[("embeddings", -1)][1]  # (1, T, D) the first layer's input
    summed = seen[("embedding_norm", -1)][0][0] if emb.norm is not None else embeddings  # before LayerNorm
    return dict(one_hot=hot, lookup_error=lookup_error, token_embedding=seen[("tokens", -1)][1],
                positions=seen[("positions", -1)][1].detach(), token_type=token_type, embedding_sum=summed,
                embeddings=embeddings, layers=[_layer_trace(seen, i, layer) for i, layer in enumerate(layers)],
                final=final)


def _layer_trace(seen: dict[tuple[str, int], tuple[tuple, Any]], i: int, layer: EncoderLayer) -> LayerTrace:
    """Layer ``i``'s steps, from what the hooks saw (a batch of one, padded)."""
    (layer_input, *_), layer_output = seen[("layer", i)]
    attention = seen[("attention", i)][1]
    qkv = seen[("qkv", i)][1]  # (1, T, 3D): Q, K and V side by side
    q, k, v = Route().split_heads(qkv, 3 * layer.attention.n_heads).chunk(3, dim=1)  # 3 x (1, H, T, Dh)
    (norm1_input,), norm1_output = seen[("norm1", i)]
    (norm2_input,), norm2_output = seen[("norm2", i)]
    (hidden,), ffn_output = seen[("down", i)]  # the activation's output (dropout is off)
    return LayerTrace(input=layer_input, q=q, k=k, v=v, scores=attention.scores,
                      probabilities=attention.probabilities, concat=seen[("out", i)][0][0],
                      attention_output=seen[("out", i)][1], norm1_input=norm1_input, norm1_output=norm1_output,
                      ffn_pre_activation=seen[("up", i)][1], ffn_hidden=hidden, ffn_output=ffn_output,
                      norm2_input=norm2_input, norm2_output=norm2_output, output=layer_output.hidden_state)


def _pool(pipeline: Pipeline, final: torch.Tensor, mask: torch.Tensor, texts: list[str],
          same_tokens: bool) -> PoolingTrace:
    """Step 9 with the pipeline's own ``Pooling``; every text's vector from ``Pipeline.embed``."""
    pooling = pipeline.pooling
    # the same class with normalisation off shows the vector before the L2 step
    pooled = Pooling(pooling.mode, normalize=False)(final, mask)[0].cpu()  # (D,)
    vector = pooling(final, mask)[0].cpu()  # (D,) exactly what embed computes from these tokens
    details = pipeline.embed_with_details(texts)
    error = float(np.abs(vector.numpy() - details.vectors[0]).max()) if same_tokens else None
    return PoolingTrace(mode=pooling.mode, normalize=pooling.normalize, pooled=pooled, vector=vector,
                        texts=list(texts), vectors=details.vectors, n_tokens=details.n_tokens.tolist(),
                        truncated=details.truncated.tolist(), embed_error=error)


def _difference(ours: torch.Tensor, model: torch.Tensor) -> float:
    """max |ours - model|, relative to the values' size above 1: float32 rounding grows with it
    (MiniLM's hidden states reach ~10, where two correct routes differ by ~1e-5)."""
    return float((ours - model).abs().max()) / max(1.0, float(model.abs().max()))


def _check_against_model(encoder: Encoder, ids: torch.Tensor, mask: torch.Tensor,
                         steps: dict[str, Any], pooling: PoolingTrace) -> float:
    """Largest difference between the trace and ``Encoder.forward`` (and ``Pipeline.embed``)."""
    real = mask[0].bool()
    full = encoder(ids, mask, output_hidden_states=True, output_attentions=True)
    fused = encoder(ids, mask).last_hidden_state  # the normal path (fused attention)
    layers = steps["layers"]
    ours = [steps["embeddings"]] + [t.output for t in layers[:-1]] + [steps["final"]]
    errors = [_difference(ours[i][0, real], h[0, real]) for i, h in enumerate(full.hidden_states)]
    errors += [_difference(t.probabilities[0][:, real], a[0][:, real])
               for t, a in zip(layers, full.attentions)]
    errors.append(_difference(steps["final"][0, real], fused[0, real]))
    if pooling.embed_error is not None:
        errors.append(pooling.embed_error / max(1.0, float(np.abs(pooling.vectors[0]).max())))
    worst = max(errors)
    if not worst <= TOLERANCE:
        raise RuntimeError(f"the step-by-step trace differs from the model by {worst:.3g} "
                           f"(more than {TOLERANCE}); the explanation would not match the model.")
    return worst
