"""Explain: one text through the assembly line, step by step, as a page.

- ``trace(pipeline, text)`` runs the encoder's own modules one step at a time (the calls that
  ``Encoder.forward`` makes, in its order) and records every intermediate tensor in a ``Trace``.
  It then checks the result against the model's normal forward (within 1e-5), so the page can
  never show numbers the model does not produce.
- ``render_html(trace)`` returns one self-contained HTML page (``explain_page``): inline CSS and JS, the
  numbers embedded as JSON, pictures drawn on <canvas>; no network request, no CDN.
- ``write_pngs(trace, folder)`` draws the main figures as PNG files with matplotlib.

The text is run alone (a batch of one), padded with a few [PAD] tokens so that the page can
show what padding and the attention mask do; padding never changes the real tokens' vectors.

Letters in shape comments: T tokens (real + padding), n real tokens, V vocabulary, D d_model,
H heads, Dh head width, F d_ff, L layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ctxvec.attention import attention
from ctxvec.config import EncoderConfig
from ctxvec.embedding import one_hot
from ctxvec.encoder import Encoder, key_mask_from
from ctxvec.layer import EncoderLayer, FeedForward
from ctxvec.pipeline import Pipeline

DEFAULT_MAX_TOKENS = 64  # the page stays readable (and its data small) up to about this many
DEFAULT_PADDING = 2  # [PAD] tokens appended to show padding and the attention mask
TOLERANCE = 1e-5  # largest allowed difference between the trace and Encoder.forward


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
    max_tokens: int
    model_max_len: int
    one_hot: torch.Tensor  # (1, T, V)
    lookup_error: float  # max |one_hot @ E - E[ids]|
    token_embedding: torch.Tensor  # (1, T, D), scaled by √D when the config says so
    positions: torch.Tensor  # (T, D)
    token_type: torch.Tensor | None  # (D,) segment 0's vector, BERT only
    embedding_sum: torch.Tensor  # (1, T, D) tokens + positions (+ segment)
    embeddings: torch.Tensor  # (1, T, D) the first layer's input (after LayerNorm, BERT)
    layers: list[LayerTrace]
    final: torch.Tensor  # (1, T, D) the context vectors
    max_error: float  # largest difference from Encoder.forward (real tokens)


def trace(pipeline: Pipeline, text: str, max_tokens: int = DEFAULT_MAX_TOKENS,
          padding: int = DEFAULT_PADDING) -> Trace:
    """Run ``text`` through ``pipeline``'s encoder step by step and record every tensor.

    Args:
        pipeline: a loaded model (``ctxvec.load(...)``), in fp32.
        text: one text.
        max_tokens: keep at most this many tokens (special tokens included); a longer text is
            cut and the page says so.
        padding: how many [PAD] tokens to append (0 for none), to show the attention mask.

    Raises:
        ValueError: bad arguments, or a model not in fp32.
        RuntimeError: the trace differs from ``Encoder.forward`` by more than 1e-5 (a bug).
    """
    encoder, tokenizer = pipeline.encoder, pipeline.tokenizer
    config = encoder.config
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}.")
    if next(encoder.parameters()).dtype != torch.float32:
        raise ValueError("explain shows the fp32 model; load it with precision='fp32'.")
    if not isinstance(max_tokens, int) or max_tokens <= tokenizer.n_special:
        raise ValueError(f"max_tokens must be an integer above the {tokenizer.n_special} special "
                         f"tokens, got {max_tokens!r}.")
    if not isinstance(padding, int) or padding < 0:
        raise ValueError(f"padding must be a non-negative integer, got {padding!r}.")
    encoded = tokenizer.tokenize([text], max_len=min(max_tokens, tokenizer.max_len))[0]
    n = len(encoded.ids)
    padding = min(padding, config.max_len - n)
    batch = tokenizer.pad([encoded], length=n + padding)
    device = next(encoder.parameters()).device
    ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)  # (1, T), (1, T)
    kinds = ["special" if s else "word" for s in encoded.special_tokens_mask] + ["pad"] * padding

    was_training = encoder.training
    encoder.eval()  # dropout off: the page shows inference
    try:
        with torch.inference_mode():
            steps = _run_steps(encoder, ids, mask)
            max_error = _check_against_model(encoder, ids, mask, steps)
    finally:
        encoder.train(was_training)
    return Trace(text=text, model=pipeline.name, description=pipeline.description, config=config,
                 tokens=encoded.tokens + [tokenizer.pad_token] * padding, kinds=kinds,
                 input_ids=ids, attention_mask=mask, n_real=n, n_tokens_full=encoded.n_tokens_full,
                 truncated=encoded.truncated, max_tokens=max_tokens, model_max_len=tokenizer.max_len,
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


def _check_against_model(encoder: Encoder, ids: torch.Tensor, mask: torch.Tensor,
                         steps: dict[str, Any]) -> float:
    """Largest difference between the trace and ``Encoder.forward`` on the real tokens."""
    real = mask[0].bool()
    full = encoder(ids, mask, output_hidden_states=True, output_attentions=True)
    fused = encoder(ids, mask).last_hidden_state  # the normal path (fused attention)
    layers = steps["layers"]
    ours = [steps["embeddings"]] + [t.output for t in layers[:-1]] + [steps["final"]]
    errors = [(ours[i][0, real] - h[0, real]).abs().max() for i, h in enumerate(full.hidden_states)]
    errors += [(t.probabilities[0][:, real] - a[0][:, real]).abs().max()
               for t, a in zip(layers, full.attentions)]
    errors.append((steps["final"][0, real] - fused[0, real]).abs().max())
    worst = float(max(errors))
    if not worst <= TOLERANCE:
        raise RuntimeError(f"the step-by-step trace differs from Encoder.forward by {worst:.3g} "
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
    return {"mean": _nums(x.mean(-1), 4), "std": _nums(x.std(-1, unbiased=False), 4)}


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


def page_data(t: Trace) -> dict[str, Any]:
    """Everything the page draws, as JSON-ready lists (attention rows for real queries only)."""
    n, c = t.n_real, t.config
    final = t.final[0, :n]  # (n, D)
    unit = torch.nn.functional.normalize(final, dim=-1)
    states = [t.embeddings] + [layer.output for layer in t.layers[:-1]] + [t.final]
    norms = [s[0, :n].norm(dim=-1) for s in states]  # L + 1 x (n,)
    cosines = [torch.nn.functional.cosine_similarity(a[0, :n], b[0, :n], dim=-1)
               for a, b in zip(states[:-1], states[1:])]  # L x (n,)
    layers = []
    for layer in t.layers:
        probs = layer.probabilities[0, :, :n]  # (H, n, T): real queries, all keys
        pre = layer.ffn_pre_activation[0, :n]  # (n, F)
        counts, edges = np.histogram(pre.cpu().numpy(), bins=40)
        layers.append({
            "scores": _nums(layer.scores[0, :, :n], 3),
            "attention": _nums(probs, 5),
            "mean_attention": _nums(probs.mean(0), 5),
            "norm1": {"before": _stats(layer.norm1_input, n), "after": _stats(layer.norm1_output, n)},
            "norm2": {"before": _stats(layer.norm2_input, n), "after": _stats(layer.norm2_output, n)},
            "ffn_hidden": _nums(layer.ffn_hidden[0, :n], 2),
            "ffn_active": _nums((pre > 0).float().mean(-1), 4),
            "ffn_histogram": {"counts": counts.tolist(), "edges": _nums(edges, 3)},
        })
    return {
        "text": t.text, "model": t.model, "description": t.description,
        "config": {**c.to_dict(), "d_head": c.d_head, "has_final_norm": c.has_final_norm},
        "architecture": describe_architecture(c),
        "tokens": t.tokens, "kinds": t.kinds, "ids": t.input_ids[0].tolist(),
        "mask": t.attention_mask[0].tolist(), "n_real": n, "n_tokens_full": t.n_tokens_full,
        "truncated": t.truncated, "max_tokens": t.max_tokens, "model_max_len": t.model_max_len,
        "lookup_error": t.lookup_error, "max_error": t.max_error,
        "token_embedding": _nums(t.token_embedding[0], 3),
        "positions": _nums(t.positions, 5),
        "token_type": _nums(t.token_type, 4) if t.token_type is not None else None,
        "embedding_sum": _nums(t.embedding_sum[0], 3),
        "embeddings": _nums(t.embeddings[0], 3),
        "layers": layers,
        "norms": _nums(torch.stack(norms), 4),  # (L + 1, n)
        "cosines": _nums(torch.stack(cosines), 4),  # (L, n)
        "final": _nums(final, 4),
        "similarity": _nums(unit @ unit.T, 4),  # (n, n) cosine
    }


# ---- outputs ------------------------------------------------------------------------------

def render_html(t: Trace) -> str:
    """The page: one self-contained HTML string (inline CSS and JS, data as embedded JSON)."""
    from ctxvec.explain_page import render

    return render(page_data(t))


def explain(pipeline: Pipeline, text: str, output: str | Path, max_tokens: int = DEFAULT_MAX_TOKENS,
            padding: int = DEFAULT_PADDING) -> Trace:
    """Trace ``text`` and write the page to ``output``; returns the trace."""
    t = trace(pipeline, text, max_tokens=max_tokens, padding=padding)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(render_html(t), encoding="utf-8")
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
    data = page_data(t)
    paths: list[Path] = []

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        fig.savefig(folder / name)
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
            fig, ax = plt.subplots(figsize=(1.6 + 0.3 * cols * step, 1.2 + 0.3 * rows * step), dpi=100)
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

        fig, ax = plt.subplots(figsize=(2 + 0.35 * n, 1.5 + 0.35 * n), dpi=110)
        image = ax.imshow(np.array(data["similarity"]), cmap="RdBu_r", vmin=-1, vmax=1)
        ax.set_xticks(range(n), real, rotation=90)
        ax.set_yticks(range(n), real)
        ax.set_title("cosine similarity of the context vectors")
        fig.colorbar(image, ax=ax)
        save(fig, "similarity.png")

        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
        norms, cosines = np.array(data["norms"]), np.array(data["cosines"])  # (L + 1, n), (L, n)
        for j, tok in enumerate(real):
            left.plot(range(len(norms)), norms[:, j], marker="o", label=tok)
            right.plot(range(1, len(norms)), cosines[:, j], marker="o", label=tok)
        left.set(xlabel="layer (0 = embeddings)", ylabel="vector norm", title="norm per token")
        right.set(xlabel="layer", ylabel="cosine", title="cosine to the previous layer's vector")
        if n <= 20:
            right.legend(fontsize=7, ncol=2)
        save(fig, "layers.png")
    return paths
