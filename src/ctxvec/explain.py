"""Explain: one text through the assembly line, step by step, as a page.

- ``trace(pipeline, text)`` runs the encoder's own modules one step at a time (the calls that
  ``Encoder.forward`` makes, in its order) and records every intermediate tensor in a ``Trace``.
  It then checks the result against the model's normal forward (within 1e-5), so the page can
  never show numbers the model does not produce.
- The trace ends where ``Pipeline.embed`` ends: the pipeline's own ``Pooling`` turns the context
  vectors into the sentence vector, and any further texts get theirs from ``Pipeline.embed``,
  with their cosine similarities (``PoolingTrace``).
- ``render_html(trace)`` returns one self-contained HTML page (``explain_page``): inline CSS and JS, the
  numbers embedded as JSON, pictures drawn on <canvas>; no network request, no CDN. Past a budget
  the heavy views are thinned (``plan_thinning``) so that a page stays under ~10 MB at any length.
- ``write_pngs(trace, folder)`` draws the main figures as PNG files with matplotlib.

Every file is written atomically (``checkpoint.atomic_write``): a failed write leaves no half file.

The text is run alone (a batch of one), padded with a few [PAD] tokens so that the page can
show what padding and the attention mask do; padding never changes the real tokens' vectors.

Letters in shape comments: T tokens (real + padding), n real tokens, V vocabulary, D d_model,
H heads, Dh head width, F d_ff, L layers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ctxvec.attention import attention
from ctxvec.checkpoint import atomic_write
from ctxvec.config import EncoderConfig
from ctxvec.embedding import one_hot
from ctxvec.encoder import Encoder, key_mask_from
from ctxvec.layer import EncoderLayer, FeedForward
from ctxvec.pipeline import Pipeline
from ctxvec.pooling import Pooling

DEFAULT_MAX_TOKENS = 64  # the page stays readable (and its data small) up to about this many
DEFAULT_PADDING = 2  # [PAD] tokens appended to show padding and the attention mask
TOLERANCE = 1e-5  # largest allowed difference between the trace and the model (relative above 1)

# Numbers on the page, per view, up to which it is sent whole. The heavy views grow with
# tokens² x heads x layers (attention) and tokens x d_ff x layers (FFN units); the bundled
# models' default 64 tokens fit whole. Past a budget a view is thinned, and the page says how.
# With the rounding of DECIMALS, a page stays under ~10 MB at any length.
BUDGET = {"attention": 850_000, "ffn": 200_000, "wide": 60_000, "similarity": 40_000}
# decimals kept per view: what the page shows; the sentence vectors keep enough for a reader to
# check them against Pipeline.embed (1e-5)
DECIMALS = {"probabilities": 4, "scores": 2, "ffn": 2, "wide": 3, "positions": 5, "stats": 4,
            "vector": 6}


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
    if not isinstance(max_tokens, int) or max_tokens <= tokenizer.n_special:
        raise ValueError(f"max_tokens must be an integer above the {tokenizer.n_special} special "
                         f"tokens, got {max_tokens!r}.")
    if not isinstance(padding, int) or padding < 0:
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
    """The encoder's forward, one named step at a time, with its own modules."""
    config, emb = encoder.config, encoder.embeddings
    T = ids.shape[1]
    # 2) one-hot, and why the embedding is a lookup: one_hot @ E == E[ids]
    hot = one_hot(ids, config.vocab_size)  # (1, T, V)
    lookup_error = float((hot @ emb.tokens.weight - emb.tokens.weight[ids]).abs().max())
    # 3) embedding, 4) positions (+ segment 0 and LayerNorm in the BERT family)
    token_embedding = emb.tokens(ids)  # (1, T, D)
    positions = emb.positions(T).detach()  # (T, D); a learned table is a parameter
    token_type = emb.token_types.weight[0].detach() if emb.token_types is not None else None  # (D,)
    summed = token_embedding + positions
    if token_type is not None:
        summed = summed + token_type
    embeddings = x = emb.norm(summed) if emb.norm is not None else summed  # (1, T, D)
    # 5-7) the layers; one "may attend" mask shared by all, as in EncoderStack
    key_mask = key_mask_from(mask.bool())  # (1, 1, 1, T) or None
    layers = []
    for i, layer in enumerate(encoder.stack.layers):
        layers.append(_run_layer(layer, x, key_mask))
        x = layers[-1].output
        if encoder.stack.final_norm is not None and i == len(encoder.stack.layers) - 1:
            x = encoder.stack.final_norm(x)
    return dict(one_hot=hot, lookup_error=lookup_error, token_embedding=token_embedding,
                positions=positions, token_type=token_type, embedding_sum=summed,
                embeddings=embeddings, layers=layers, final=x)


def _run_layer(layer: EncoderLayer, x: torch.Tensor, key_mask: torch.Tensor | None) -> LayerTrace:
    """One ``EncoderLayer`` as its forward computes it, keeping every intermediate."""
    mha, ffn = layer.attention, layer.feed_forward
    B, T, D = x.shape
    H = mha.n_heads
    layer_input = x
    attn_in = layer.norm1(x) if layer.norm_first else x
    # 5) project to Q, K, V (one fused matmul), split into heads
    qkv = mha.qkv(attn_in).view(B, T, 3, H, D // H)  # (1, T, 3, H, Dh)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (1, H, T, Dh)
    scores = q @ k.transpose(-2, -1) / math.sqrt(D // H)  # (1, H, T, T)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask, float("-inf"))
    heads, probabilities = attention(q, k, v, key_mask)  # the library's own softmax(QKᵀ/√d)·V
    concat = heads.transpose(1, 2).reshape(B, T, D)  # (1, H, T, Dh) -> (1, T, H*Dh)
    attn_out = mha.out(concat)  # (1, T, D)
    if layer.norm_first:  # x = x + attn(norm1(x)); x = x + ffn(norm2(x))
        norm1_input, norm1_output = x, attn_in
        x = norm2_input = x + attn_out
        norm2_output = layer.norm2(x)
        pre, hidden, ffn_out = _feed_forward(ffn, norm2_output)
        out = x + ffn_out
    else:  # x = norm1(x + attn(x)); x = norm2(x + ffn(x))
        norm1_input = x + attn_out
        x = norm1_output = layer.norm1(norm1_input)
        pre, hidden, ffn_out = _feed_forward(ffn, x)
        norm2_input = x + ffn_out
        out = norm2_output = layer.norm2(norm2_input)
    return LayerTrace(input=layer_input, q=q, k=k, v=v,
                      scores=scores, probabilities=probabilities, concat=concat,
                      attention_output=attn_out, norm1_input=norm1_input, norm1_output=norm1_output,
                      ffn_pre_activation=pre, ffn_hidden=hidden, ffn_output=ffn_out,
                      norm2_input=norm2_input, norm2_output=norm2_output, output=out)


def _feed_forward(ffn: FeedForward, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``FeedForward`` step by step: (up(x) (1, T, F), activation (1, T, F), down (1, T, D))."""
    pre = ffn.up(x)
    hidden = ffn.activation(pre)
    return pre, hidden, ffn.down(hidden)


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


# ---- the page's data --------------------------------------------------------------------

def _nums(t: torch.Tensor | np.ndarray, decimals: int = 5) -> Any:
    """A tensor as nested lists of rounded floats; -inf (masked scores) becomes null."""
    if isinstance(t, torch.Tensor):
        t = t.detach().cpu().numpy()
    a = np.round(np.asarray(t, dtype=np.float64), decimals)
    return a.tolist() if np.isfinite(a).all() else _with_nulls(a)


def _with_nulls(a: np.ndarray) -> Any:
    if a.ndim > 1:
        return [_with_nulls(row) for row in a]
    return [float(v) if np.isfinite(v) else None for v in a]


def _stats(t: torch.Tensor, n: int) -> dict[str, Any]:
    """Per-token mean and standard deviation over d_model (the statistics LayerNorm fixes)."""
    x = t[0, :n]  # (n, D)
    return {"mean": _nums(x.mean(-1), DECIMALS["stats"]),
            "std": _nums(x.std(-1, unbiased=False), DECIMALS["stats"])}


def describe_architecture(config: EncoderConfig) -> dict[str, str]:
    """The model's actual choices, in words (the page states them; tests check them)."""
    d = config.d_model
    return {
        "norm": ("pre-norm: x = x + sublayer(LayerNorm(x))" if config.norm_first
                 else "post-norm: x = LayerNorm(x + sublayer(x)), the seed's Add & Norm"),
        "position": ("sinusoidal positions: a fixed sin/cos table (a formula, not learned)"
                     if config.position == "sinusoidal"
                     else "learned positions: a trained table, one row per position"),
        "activation": ("ReLU in the feed-forward" if config.activation == "relu"
                       else "GELU (exact erf form) in the feed-forward"),
        "scale": (f"token embeddings multiplied by √d_model = {math.sqrt(d):.2f}"
                  if config.scale_embeddings else "token embeddings not scaled"),
        "segments": ("a segment (token type) embedding, type 0 for one text"
                     if config.type_vocab_size else "no segment embedding"),
        "embedding_norm": ("a LayerNorm on the summed embeddings" if config.embedding_norm
                           else "no LayerNorm on the embeddings"),
        "final_norm": ("a final LayerNorm after the last layer" if config.has_final_norm
                       else "no final LayerNorm"),
        "sizes": (f"{config.n_layers} layers, d_model {d}, {config.n_heads} heads x "
                  f"{config.d_head}, d_ff {config.d_ff}, vocabulary {config.vocab_size}"),
    }


# ---- thinning: a page stays small at any length -----------------------------------------

@dataclass(frozen=True)
class Thinning:
    """How much each heavy view is thinned (1 everywhere: nothing is)."""

    group: int  # attention maps: tokens pooled in runs of this many
    ffn_step: int  # FFN hidden units: every ffn_step-th unit
    dim_step: int  # the (tokens x d_model) maps: every dim_step-th dimension
    similarity_group: int  # step 8's token x token cosines: tokens pooled in runs of this many

    @property
    def any(self) -> bool:
        return max(self.group, self.ffn_step, self.dim_step, self.similarity_group) > 1


def _runs(n: int, T: int, k: int) -> list[range]:
    """Positions 0..T-1 in runs of ``k``; real tokens (the first n) and padding never share one."""
    return ([range(a, min(a + k, n)) for a in range(0, n, k)]
            + [range(a, min(a + k, T)) for a in range(n, T, k)])


def plan_thinning(n: int, T: int, config: EncoderConfig) -> Thinning:
    """The least thinning that keeps every view within ``BUDGET`` (n real tokens of T)."""
    maps = 2 * config.n_layers * config.n_heads  # scores and probabilities of every head
    group = 1
    while maps * math.ceil(n / group) * len(_runs(n, T, group)) > BUDGET["attention"]:
        group += 1
    similarity_group = 1
    while math.ceil(n / similarity_group) ** 2 > BUDGET["similarity"]:
        similarity_group += 1
    return Thinning(group=group,
                    ffn_step=math.ceil(n * config.d_ff * config.n_layers / BUDGET["ffn"]),
                    dim_step=math.ceil(T * config.d_model / BUDGET["wide"]),
                    similarity_group=similarity_group)


def _run_matrix(runs: list[range], width: int, mean: bool) -> torch.Tensor:
    """(len(runs), width): row r adds up (or averages) the positions of run r."""
    m = torch.zeros(len(runs), width)
    for r, run in enumerate(runs):
        m[r, run.start:run.stop] = 1 / len(run) if mean else 1
    return m


def _pool_attention(scores: torch.Tensor, probs: torch.Tensor, n: int, k: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(H, n, T) scores and probabilities -> (H, G, G') over runs of k tokens (``_runs``).

    A cell of the probabilities is the share of attention the run of queries gives the run of
    keys (mean over queries, sum over keys: every row still sums to 1); of the scores, their
    mean. Padding runs keep -inf scores and 0 probabilities, as padding keys have.
    """
    if k == 1:
        return scores, probs
    T = probs.shape[-1]
    runs = _runs(n, T, k)
    real_runs = math.ceil(n / k)
    queries = _run_matrix(runs[:real_runs], n, mean=True)  # (G, n)
    probs = queries @ probs @ _run_matrix(runs, T, mean=False).T  # (H, G, G')
    real = queries @ scores[..., :n] @ _run_matrix(runs[:real_runs], n, mean=True).T  # (H, G, G)
    masked = torch.full((*real.shape[:-1], len(runs) - real_runs), float("-inf"))
    return torch.cat([real, masked], dim=-1), probs


def _run_labels(tokens: list[str], runs: list[range]) -> list[str]:
    return [tokens[r.start] if len(r) == 1 else f"{r.start}-{r.stop - 1}" for r in runs]


# ---- the page's data --------------------------------------------------------------------

def _layer_data(layer: LayerTrace, n: int, thin: Thinning) -> dict[str, Any]:
    """One layer's views for steps 5-7 (attention rows for real queries only)."""
    scores, probs = _pool_attention(layer.scores[0, :, :n].cpu(), layer.probabilities[0, :, :n].cpu(),
                                    n, thin.group)  # (H, G, G')
    pre = layer.ffn_pre_activation[0, :n]  # (n, F)
    counts, edges = np.histogram(pre.cpu().numpy(), bins=40)
    return {
        "scores": _nums(scores, DECIMALS["scores"]),
        "attention": _nums(probs, DECIMALS["probabilities"]),
        "norm1": {"before": _stats(layer.norm1_input, n), "after": _stats(layer.norm1_output, n)},
        "norm2": {"before": _stats(layer.norm2_input, n), "after": _stats(layer.norm2_output, n)},
        "ffn_hidden": _nums(layer.ffn_hidden[0, :n, ::thin.ffn_step], DECIMALS["ffn"]),
        # the share of active units and the histogram count every unit, thinned or not
        "ffn_active": _nums((pre > 0).float().mean(-1), 4),
        "ffn_histogram": {"counts": counts.tolist(), "edges": _nums(edges, 3)},
    }


def _pooling_data(p: PoolingTrace, final: torch.Tensor) -> dict[str, Any]:
    """Step 9: how the pooling weighs each real token, the vectors, the texts' cosines."""
    n = final.shape[0]  # final: (n, D), the real tokens' context vectors
    if p.mode == "mean":
        weights = torch.full((n,), 1 / n)
    elif p.mode == "cls":
        weights = torch.zeros(n)
        weights[0] = 1.0
    else:  # max: the share of dimensions whose maximum each token holds
        weights = torch.bincount(final.argmax(0).cpu(), minlength=n).float() / final.shape[1]
    unit = torch.nn.functional.normalize(torch.from_numpy(p.vectors), dim=-1)
    return {
        "mode": p.mode, "normalize": p.normalize, "weights": _nums(weights, 4),
        "pooled": _nums(p.pooled, DECIMALS["vector"]), "pooled_norm": float(p.pooled.norm()),
        "vector": _nums(p.vector, DECIMALS["vector"]), "embed_error": p.embed_error,
        "texts": p.texts, "vectors": _nums(p.vectors, DECIMALS["vector"]),
        "n_tokens": p.n_tokens, "truncated": p.truncated,
        "similarity": _nums(unit @ unit.T, 4),  # (m, m) cosine
    }


def token_similarity(t: Trace) -> torch.Tensor:
    """(n, n) cosine similarity of the real tokens' context vectors."""
    unit = torch.nn.functional.normalize(t.final[0, :t.n_real].cpu(), dim=-1)
    return unit @ unit.T


def layer_changes(t: Trace) -> tuple[torch.Tensor, torch.Tensor]:
    """Each real token's vector norm after every layer (L + 1, n) and cosine to the last (L, n)."""
    n = t.n_real
    states = [t.embeddings] + [layer.output for layer in t.layers[:-1]] + [t.final]
    norms = torch.stack([s[0, :n].norm(dim=-1) for s in states]).cpu()
    cosines = torch.stack([torch.nn.functional.cosine_similarity(a[0, :n], b[0, :n], dim=-1)
                           for a, b in zip(states[:-1], states[1:])]).cpu()
    return norms, cosines


def page_data(t: Trace) -> dict[str, Any]:
    """Everything the page draws, as JSON-ready lists, thinned past ``BUDGET``."""
    n, c, T = t.n_real, t.config, len(t.tokens)
    thin = plan_thinning(n, T, c)
    runs, similarity_runs = _runs(n, T, thin.group), _runs(n, n, thin.similarity_group)
    similarity = _run_matrix(similarity_runs, n, mean=True)  # (G, n): mean cosine over runs
    dims = slice(None, None, thin.dim_step)
    norms, cosines = layer_changes(t)
    return {
        "text": t.text, "model": t.model, "description": t.description,
        "config": {**c.to_dict(), "d_head": c.d_head, "has_final_norm": c.has_final_norm},
        "architecture": describe_architecture(c),
        "tokens": t.tokens, "kinds": t.kinds, "ids": t.input_ids[0].tolist(),
        "mask": t.attention_mask[0].tolist(), "n_real": n, "n_tokens_full": t.n_tokens_full,
        "truncated": t.truncated, "cut_by": t.cut_by, "max_tokens": t.max_tokens,
        "model_max_len": t.model_max_len, "padding_requested": t.padding_requested,
        "lookup_error": t.lookup_error, "max_error": t.max_error,
        "thinning": {"group": thin.group, "ffn_step": thin.ffn_step, "dim_step": thin.dim_step,
                     "similarity_group": thin.similarity_group, "budget": BUDGET, "decimals": DECIMALS},
        "attention_labels": _run_labels(t.tokens, runs), "attention_real": math.ceil(n / thin.group),
        "dims": list(range(c.d_model))[dims], "ffn_units": list(range(c.d_ff))[::thin.ffn_step],
        "token_embedding": _nums(t.token_embedding[0, :, dims], DECIMALS["wide"]),
        "positions": _nums(t.positions[:, dims], DECIMALS["positions"]),
        "token_type": _nums(t.token_type, 4) if t.token_type is not None else None,
        "embedding_sum": _nums(t.embedding_sum[0, :, dims], DECIMALS["wide"]),
        "embeddings": _nums(t.embeddings[0, :, dims], DECIMALS["wide"]),
        "layers": [_layer_data(layer, n, thin) for layer in t.layers],
        "norms": _nums(norms, 4),  # (L + 1, n)
        "cosines": _nums(cosines, 4),  # (L, n)
        "final": _nums(t.final[0, :n, dims], DECIMALS["wide"]),
        "similarity_labels": _run_labels(t.tokens, similarity_runs),
        "similarity": _nums(similarity @ token_similarity(t) @ similarity.T, 4),  # (G, G) cosine
        "pooling": _pooling_data(t.pooling, t.final[0, :n]),
    }


# ---- outputs ------------------------------------------------------------------------------

def render_html(t: Trace) -> str:
    """The page: one self-contained HTML string (inline CSS and JS, data as embedded JSON)."""
    from ctxvec.explain_page import render

    return render(page_data(t))


def explain(pipeline: Pipeline, texts: str | Sequence[str], output: str | Path,
            max_tokens: int = DEFAULT_MAX_TOKENS, padding: int = DEFAULT_PADDING) -> Trace:
    """Trace the first of ``texts`` and write the page to ``output`` (atomically); returns the trace.

    Every text gets its sentence vector on the page, with their cosine similarities.
    """
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts:
        raise ValueError("explain needs at least one text.")
    t = trace(pipeline, texts[0], max_tokens=max_tokens, padding=padding, others=texts[1:])
    page = render_html(t)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(output, lambda tmp: tmp.write_text(page, encoding="utf-8"))
    return t


def _label(token: str) -> str:
    # "$" would switch matplotlib to math text
    return (token if len(token) <= 12 else token[:11] + "…").replace("$", r"\$")


def write_pngs(t: Trace, folder: str | Path) -> list[Path]:
    """The main figures as PNG files in ``folder``; returns their paths.

    positions.png, attention_layer_<i>.png (every head and their average), similarity.png and
    layers.png (each token's norm and cosine to the previous layer, layer by layer).
    """
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n, c = t.n_real, t.config
    real = [_label(tok) for tok in t.tokens[:n]]
    paths: list[Path] = []

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        try:  # atomically: a failed write (a full disk) leaves no truncated PNG
            atomic_write(folder / name, lambda tmp: fig.savefig(tmp, format="png"))
        finally:
            plt.close(fig)
        paths.append(folder / name)

    with warnings.catch_warnings():
        # tokens in scripts the default font lacks (CJK, emoji) are drawn as boxes, not errors
        warnings.filterwarnings("ignore", message="Glyph .* missing from", category=UserWarning)
        fig, ax = plt.subplots(figsize=(10, 2.5 + 0.12 * len(t.tokens)), dpi=110)
        image = ax.imshow(t.positions.cpu().numpy(), aspect="auto", cmap="RdBu_r", interpolation="nearest")
        ax.set_xlabel("dimension")
        ax.set_ylabel("position")
        kind = "sin/cos" if c.position == "sinusoidal" else "learned"
        ax.set_title(f"{t.model}: {kind} positional encoding, positions 0-{len(t.tokens) - 1}")
        fig.colorbar(image, ax=ax)
        save(fig, "positions.png")

        # every head of a layer and their average in one image (one Axes: fast to draw)
        cols = min(5, c.n_heads + 1)
        rows = math.ceil((c.n_heads + 1) / cols)
        step = n + 1  # one blank cell between panels
        for i, layer in enumerate(t.layers):
            probs = layer.probabilities[0, :, :n, :n].cpu().numpy()  # (H, n, n) real tokens
            panels = [("average", probs.mean(0))] + [(f"head {h + 1}", p) for h, p in enumerate(probs)]
            mosaic = np.full((rows * step - 1, cols * step - 1), np.nan)
            cell = min(0.3, 24 / (cols * step))  # inches: long texts shrink the cells, not grow the file
            fig, ax = plt.subplots(figsize=(1.6 + cell * cols * step, 1.2 + cell * rows * step), dpi=100)
            for k, (title, p) in enumerate(panels):
                r, col = divmod(k, cols)
                mosaic[r * step: r * step + n, col * step: col * step + n] = p
                ax.text(col * step + (n - 1) / 2, r * step - 0.7, title, ha="center", fontsize=8)
            image = ax.imshow(mosaic, cmap="viridis", vmin=0, interpolation="nearest")
            labelled = n <= 16
            ax.set_yticks([r * step + j for r in range(rows) for j in range(n)] if labelled else [],
                          real * rows if labelled else [], fontsize=7)
            last = len(panels) - (rows - 1) * cols  # panels in the bottom row, which gets the labels
            ax.set_xticks([col * step + j for col in range(last) for j in range(n)] if labelled else [],
                          real * last if labelled else [], fontsize=7, rotation=90)
            ax.set_frame_on(False)
            fig.colorbar(image, ax=ax, fraction=0.03)
            ax.set_title(f"{t.model}: attention probabilities, layer {i + 1} "
                         "(rows: queries, columns: keys)", pad=14)
            save(fig, f"attention_layer_{i + 1}.png")

        cell = min(0.35, 20 / n)  # inches per token, as above
        fig, ax = plt.subplots(figsize=(2 + cell * n, 1.5 + cell * n), dpi=110)
        image = ax.imshow(token_similarity(t).numpy(), cmap="RdBu_r", vmin=-1, vmax=1)
        labels = real if cell >= 0.15 else []  # below ~11 px a row, names would overprint
        ax.set_xticks(range(n) if labels else [], labels, rotation=90)
        ax.set_yticks(range(n) if labels else [], labels)
        ax.set_title("cosine similarity of the context vectors")
        fig.colorbar(image, ax=ax)
        save(fig, "similarity.png")

        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
        norms, cosines = (x.numpy() for x in layer_changes(t))  # (L + 1, n), (L, n)
        for j, tok in enumerate(real):
            left.plot(range(len(norms)), norms[:, j], marker="o", label=tok)
            right.plot(range(1, len(norms)), cosines[:, j], marker="o", label=tok)
        left.set(xlabel="layer (0 = embeddings)", ylabel="vector norm", title="norm per token")
        right.set(xlabel="layer", ylabel="cosine", title="cosine to the previous layer's vector")
        if n <= 20:
            right.legend(fontsize=7, ncol=2)
        save(fig, "layers.png")
    return paths
