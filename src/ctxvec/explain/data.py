"""Explain, the page's data: the trace as JSON-ready numbers, thinned to stay small.

Past a budget of numbers per view the heavy views are thinned (``plan_thinning``): attention
maps pool tokens in runs, the feed-forward map and the (tokens x d_model) maps keep every k-th
unit or dimension; the page says what it thinned. A page stays under ~10 MB at any length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ctxvec.explain.trace import LayerTrace, PoolingTrace, Trace
from ctxvec.model.config import EncoderConfig

# Numbers on the page, per view, up to which it is sent whole. The heavy views grow with
# tokens² x heads x layers (attention) and tokens x d_ff x layers (FFN units); the bundled
# models' default 64 tokens fit whole. Past a budget a view is thinned, and the page says how.
# With the rounding of DECIMALS, a page stays under ~10 MB at any length.
BUDGET = {"attention": 850_000, "ffn": 200_000, "wide": 60_000, "similarity": 40_000}
# decimals kept per view: what the page shows; the sentence vectors keep enough for a reader to
# check them against Pipeline.embed (1e-5)
DECIMALS = {"probabilities": 4, "scores": 2, "ffn": 2, "wide": 3, "positions": 5, "stats": 4,
            "vector": 6}


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
