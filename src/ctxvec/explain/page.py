"""The explain page's HTML (see ``ctxvec.explain``); its CSS and JavaScript are the asset files
``explain/assets/page.css`` and ``page.js``, inlined into the page.

``render(data)`` turns ``explain.data.page_data(...)`` into one self-contained HTML string: the
prose and the tables are written here (every piece of text from the input goes through
``html.escape``), the numbers travel as a JSON block, and the inline script draws the pictures
on <canvas> from them. Nothing is fetched: no external script, style, font or image.

The script sizes every picture to the width its figure has (and redraws on resize), so nothing
overflows into a scrollbar; every text it draws on a canvas goes through one ``label`` function
that keeps a record of its box, which the tests read to check that no two labels overlap.
"""

from __future__ import annotations

import json
from functools import cache
from html import escape
from importlib import resources
from typing import Any

SECTIONS = (
    ("step-tokens", "1. Tokens and padding"),
    ("step-onehot", "2. One-hot"),
    ("step-embedding", "3. Embedding"),
    ("step-positions", "4. Positional encoding and the sum"),
    ("step-attention", "5. Multi-head self-attention"),
    ("step-addnorm1", "6. Add & Norm #1"),
    ("step-ffn", "7. Feed-forward + Add & Norm #2"),
    ("step-stack", "8. Stacking: the context vectors"),
    ("step-pooling", "9. Pooling: the sentence vector"),
)


@cache
def _asset(name: str) -> str:
    """A file of ``explain/assets`` (inlined into the page: nothing is fetched)."""
    return (resources.files("ctxvec.explain") / "assets" / name).read_text(encoding="utf-8")


def shape(*dims: int | str) -> str:
    """``shape(1, 6, 384)`` -> ``<code class="shape">(1, 6, 384)</code>``."""
    return f'<code class="shape">({", ".join(str(d) for d in dims)})</code>'


def figure(canvas_id: str, caption: str) -> str:
    return (f'<figure class="fig"><figcaption>{caption}</figcaption>'
            f'<div class="scroll"><canvas id="{canvas_id}" class="map"></canvas></div>'
            f'<div class="legend"></div></figure>')


def _json_block(data: dict[str, Any]) -> str:
    # <, > and & as \u escapes: the JSON can never close its <script> element, whatever the text.
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return f'<script type="application/json" id="ctxvec-data">{text}</script>'


def _clip(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _every(step: int, of: int, what: str) -> str:
    """``_every(4, 1024, "hidden units")`` -> "every 4th of the 1024 hidden units"."""
    suffix = "th" if 10 <= step % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(step % 10, "th")
    return f"every {step}{suffix} of the {of} {what}"


def _cut_note(d: dict[str, Any]) -> str:
    """Which limit cut the text: --max-tokens or the model's own."""
    n, full, limit = d["n_real"], d["n_tokens_full"], d["model_max_len"]
    if not d["truncated"]:
        return ""
    if d["cut_by"] == "max_tokens":
        why = (f'<code>--max-tokens {d["max_tokens"]}</code> cut it. The model itself reads up to '
               f"{limit} tokens" + (f" (it would cut this text at {limit})" if full > limit else "")
               + ", and so does <code>ctxvec embed</code>, which gives step 9's sentence vectors")
    else:
        why = (f"the model's own limit of {limit} tokens cut it (<code>--max-tokens "
               f"{d['max_tokens']}</code> would allow {'more' if d['max_tokens'] > limit else 'as many'}; "
               "<code>ctxvec embed</code> cuts the text there too)")
    return (f'<p class="note" id="cap-note">This text has {full} tokens; the page shows the first '
            f"{n} (special tokens included): {why}.</p>")


def _padding_note(d: dict[str, Any]) -> str:
    asked, shown, room = d["padding_requested"], len(d["tokens"]) - d["n_real"], d["config"]["max_len"]
    if asked == shown:
        return ""
    return (f'<p class="note" id="padding-note">You asked for {asked} [PAD] tokens '
            f"(<code>--padding {asked}</code>); the model has {room} positions and the text takes "
            f"{d['n_real']}, so the page shows {shown}.</p>")


def _thinning_note(d: dict[str, Any]) -> str:
    """What the page left out to stay small, view by view (nothing when it left nothing out)."""
    th, c, n = d["thinning"], d["config"], d["n_real"]
    items = []
    if th["group"] > 1:
        items.append(f"attention (step 5): tokens pooled in runs of {th['group']} "
                     f"({d['attention_real']} rows instead of {n}); a cell is the share of attention "
                     "a run of queries gives a run of keys (every row still sums to 1), a score "
                     "cell the run's mean")
    if th["ffn_step"] > 1:
        items.append(f"feed-forward (step 7): {_every(th['ffn_step'], c['d_ff'], 'hidden units')} "
                     "drawn; the histogram and the share of active units count all of them")
    if th["dim_step"] > 1:
        items.append(f"embeddings, positions and context vectors (steps 3, 4, 8): "
                     f"{_every(th['dim_step'], c['d_model'], 'dimensions')} drawn")
    if th["similarity_group"] > 1:
        items.append(f"token similarities (step 8): tokens pooled in runs of "
                     f"{th['similarity_group']}, a cell the mean cosine")
    if not items:
        return ""
    lis = "".join(f"<li>{escape(item)}</li>" for item in items)
    return (f'<div class="note" id="thin-note">This text is long: to keep the page small (and '
            f"the pictures readable), it thins these views:<ul>{lis}</ul></div>")


def _header(d: dict[str, Any]) -> str:
    c, arch = d["config"], d["architecture"]
    n, T = d["n_real"], len(d["tokens"])
    dec = d["thinning"]["decimals"]
    items = "".join(f'<li data-choice="{key}">{escape(value)}</li>' for key, value in arch.items())
    nav = "".join(f'<a href="#{sid}">{escape(title)}</a>' for sid, title in SECTIONS)
    layers = "".join(f'<option value="{i}">layer {i + 1}</option>' for i in range(c["n_layers"]))
    heads = '<option value="avg">average over heads</option>' + "".join(
        f'<option value="{h}">head {h + 1}</option>' for h in range(c["n_heads"]))
    return f"""<header>
<h1>The assembly line for <q id="text" title="{escape(d["text"])}">{escape(_clip(d["text"]))}</q></h1>
<p>Model <b id="model">{escape(d["model"])}</b>: {escape(d["description"])}.
{n} real tokens + {T - n} padding = {T} positions.</p>
<p>This model's actual choices:</p>
<ul id="arch">{items}</ul>
<p class="check" id="check">Every number here was recorded from the model's own modules, step by step,
and checked against its normal forward pass and <code>Pipeline.embed</code>: largest difference
{d["max_error"]:.1e} (relative to the values' size where it exceeds 1; limit 1e-5). The page rounds
them: attention probabilities to {dec["probabilities"]} decimals, scores and hidden units to
{dec["scores"]}, the sentence vectors to {dec["vector"]}. Hover over a picture for its values.</p>
{_cut_note(d)}{_padding_note(d)}{_thinning_note(d)}
<nav>{nav}</nav>
</header>
<div id="controls"><label>Layer <select id="layer-select">{layers}</select></label>
<label>Head <select id="head-select">{heads}</select></label>
<span class="hint">steps 5-7 show this layer (and head)</span></div>"""


def _tokens(d: dict[str, Any]) -> str:
    T, n = len(d["tokens"]), d["n_real"]
    cells = "".join(
        f'<div class="{kind}"><div class="pos">{i}</div><div class="tok">{escape(tok)}</div>'
        f'<div class="id">{tid}</div><div class="m">{m}</div></div>'
        for i, (tok, tid, m, kind) in enumerate(zip(d["tokens"], d["ids"], d["mask"], d["kinds"])))
    pad = (f"Here the text is padded with {T - n} [PAD] tokens to show it." if T > n
           else "This page shows no padding (<code>--padding 0</code>).")
    return f"""<p>The tokenizer splits the text into word pieces (<code>##</code> marks a piece that
continues a word), adds the special tokens <code>[CLS]</code> and <code>[SEP]</code>, and maps each
piece to its id in the vocabulary. In a batch, shorter texts are padded to the longest one; the
attention mask says which positions are real (1) and which are padding (0). {pad}</p>
<p class="shapes">input_ids {shape(1, T)} &middot; attention_mask {shape(1, T)}</p>
<div class="tokens" id="token-table">{cells}</div>
<p class="key"><span class="word">word piece</span> <span class="special">special token</span>
<span class="pad">padding</span> &middot; in each box: position, token, id, mask</p>
{figure("c-mask", "attention_mask: 1 = real token, 0 = padding")}"""


def _onehot(d: dict[str, Any]) -> str:
    T, V, D = len(d["tokens"]), d["config"]["vocab_size"], d["config"]["d_model"]
    ones = ", ".join(f"({i}, {tid})" for i, tid in enumerate(d["ids"][:12])) + (" ..." if T > 12 else "")
    return f"""<p>Each id becomes a vector of V = {V} numbers, all 0 except a single 1 in the id's
column: {T} tokens give a one-hot tensor {shape(1, T, V)} holding {T} ones, at (position, column)
{ones}. Multiplying it by the embedding table E {shape(V, D)} picks out row <i>id</i> of E, which is
exactly looking the row up, <code>E[ids]</code>: here max |one_hot &middot; E &minus; E[ids]| =
<b id="lookup-error">{d["lookup_error"]:g}</b>. That is why models never build the one-hot tensor:
the lookup is the same product without the {T * (V - 1)} zeros.</p>
{figure("c-onehot", f"one-hot rows: each mark is the single 1 among {V} columns")}"""


def _dims_note(d: dict[str, Any]) -> str:
    step = d["thinning"]["dim_step"]
    return f" ({_every(step, d['config']['d_model'], 'dimensions')})" if step > 1 else ""


def _embedding(d: dict[str, Any]) -> str:
    c, T = d["config"], len(d["tokens"])
    scale = (f"As in Vaswani et al., the row is multiplied by &radic;d_model = {c['d_model'] ** 0.5:.2f}, "
             "so that it is on the same scale as the positional encoding."
             if c["scale_embeddings"] else "This model does not scale the rows (BERT does not).")
    return f"""<p>The embedding is a learned table E {shape(c["vocab_size"], c["d_model"])}, one row of
{c["d_model"]} numbers per token in the vocabulary, learned by backpropagation. Each token gets
its row; padding gets the [PAD] row like any token (the mask keeps it out of attention). {scale}</p>
<p class="shapes">token embeddings {shape(1, T, c["d_model"])}</p>
{figure("c-embedding", "token embeddings: one row per token, one column per dimension" + _dims_note(d))}"""


def _positions(d: dict[str, Any]) -> str:
    c, T = d["config"], len(d["tokens"])
    D, dims = c["d_model"], _dims_note(d)
    if c["position"] == "sinusoidal":
        what = (f"This model uses <b>sinusoidal</b> positions: a fixed table, a formula rather than "
                f"learned weights, PE[pos, 2i] = sin(pos / 10000<sup>2i/{D}</sup>) and PE[pos, 2i+1] = "
                f"cos(pos / 10000<sup>2i/{D}</sup>). The first columns swing fast with the position, "
                "the last ones slowly; together they give every position its own pattern.")
        caption = f"sin/cos positional encoding for positions 0-{T - 1}"
    else:
        what = (f"This model uses <b>learned</b> positions: a trained table {shape(c['max_len'], D)}, "
                "one row per position, learned with the rest of the weights (no sin/cos formula).")
        caption = f"learned position vectors for positions 0-{T - 1}"
    parts = ["token embedding", "position"] + (["segment (token type 0)"] if c["type_vocab_size"] else [])
    norm = (" and then normalised by a LayerNorm (as in BERT)" if c["embedding_norm"] else "")
    after = (figure("c-embeddings", "after the embedding LayerNorm: the first layer's input" + dims)
             if c["embedding_norm"] else "")
    return f"""<p>Attention by itself does not know the order of the tokens, so each position adds a
vector of its own. {what}</p>
<p class="shapes">positions {shape(T, D)} (the same for every text of a batch) &middot; sum {shape(1, T, D)}</p>
{figure("c-positions", caption + dims)}
<p>The first layer's input is the sum {" + ".join(parts)}{norm}.</p>
{figure("c-sum", "the sum: " + " + ".join(parts) + dims)}
{after}"""


def _attention(d: dict[str, Any]) -> str:
    c, T = d["config"], len(d["tokens"])
    D, H, Dh = c["d_model"], c["n_heads"], c["d_head"]
    blocks = "".join(f'<span style="flex:1;--h:{h * 360 // H}" title="head {h + 1}: {Dh} values">{h + 1}</span>'
                     for h in range(H))
    inp = "LayerNorm(x) (pre-norm)" if c["norm_first"] else "x"
    group = d["thinning"]["group"]
    runs = (f" Tokens are pooled in runs of {group} here (see the note at the top): a row or column "
            "is a run of tokens, named by its positions." if group > 1 else "")
    return f"""<p>Every layer projects its input {inp} to queries Q, keys K and values V with one fused
matrix ({D} &rarr; 3 &times; {D}) and splits each into {H} heads of {Dh}. For each head:
scores = Q&middot;K<sup>T</sup> / &radic;{Dh} (how well each query matches each key), padding keys
set to &minus;&infin;, then a softmax over the keys turns every row into probabilities that sum to 1
over the real tokens; the head's output is those weights times V.</p>
<p class="shapes">Q, K, V {shape(1, H, T, Dh)} &middot; scores, probabilities {shape(1, H, T, T)}
&middot; heads {shape(1, H, T, Dh)}</p>
<div class="pair">
{figure("c-scores", 'scaled scores Q&middot;K<sup>T</sup>/&radic;d<sub>head</sub> <span class="sel"></span>')}
{figure("c-attention", 'softmax probabilities <span class="sel"></span>')}
</div>
<p class="hint">Rows: queries (the token that looks); columns: keys (the tokens looked at). Padding
keys are masked (probability exactly 0); padding rows are grey: the model does not compute them.{runs}</p>
<p>All heads of this layer (click one to select it):</p>
<div id="heads-grid"></div>
<p>The {H} heads' outputs, {Dh} values each, are concatenated back to d_model = {H} &times; {Dh} =
{D} and mixed by the output projection ({D} &rarr; {D}):</p>
<div class="concat">{blocks}</div>
<p class="shapes">concat {shape(1, T, D)} &rarr; output projection {shape(1, T, D)}</p>"""


def _addnorm1(d: dict[str, Any]) -> str:
    c, T = d["config"], len(d["tokens"])
    if c["norm_first"]:
        what = ("This model is <b>pre-norm</b>: the LayerNorm comes first, on the attention's input, "
                "and the residual adds the attention's output to the un-normalised stream: "
                "<code>x = x + Attention(LayerNorm(x))</code>. Below: x before and after LayerNorm #1.")
    else:
        what = ("This model is <b>post-norm</b> (the seed's Add &amp; Norm): the attention's output is "
                "added to its input (the residual connection) and the sum is normalised: "
                "<code>x = LayerNorm(x + Attention(x))</code>. Below: the sum before and after the LayerNorm.")
    return f"""<p>{what} LayerNorm works on each token alone: it subtracts the token's mean over its
{c["d_model"]} values, divides by their standard deviation, then applies a learned scale and shift,
so every token leaves with a similar scale whatever happened before.</p>
<p class="shapes">before, after {shape(1, T, c["d_model"])}; mean and std per token over the last axis</p>
{figure("c-norm1", "per token: mean and standard deviation, before and after LayerNorm #1")}
<div class="scroll"><table class="stats" id="t-norm1"></table></div>"""


def _ffn(d: dict[str, Any]) -> str:
    c, T = d["config"], len(d["tokens"])
    D, F, step = c["d_model"], c["d_ff"], d["thinning"]["ffn_step"]
    if c["activation"] == "relu":
        act = ("<b>ReLU</b> keeps the positive values and sets the rest to exactly 0, so a unit is "
               "either active (&gt; 0) or off.")
    else:
        act = ("<b>GELU</b> is smooth: positive values pass almost unchanged and negative ones are "
               "squashed towards 0 (not exactly 0); \"active\" below means a positive input.")
    norm = ("then the residual: <code>x = x + FFN(LayerNorm(x))</code> (pre-norm)" if c["norm_first"]
            else "then Add &amp; Norm #2: <code>x = LayerNorm(x + FFN(x))</code>")
    units = f"{F} per token" + (f"; {_every(step, F, 'units')}" if step > 1 else "")
    return f"""<p>The feed-forward network works on each token alone: {D} &rarr; {F} (&times;{F / D:g}
wider), activation, {F} &rarr; {D}; {norm}. {act}</p>
<p class="shapes">up {shape(1, T, F)} &rarr; activation {shape(1, T, F)} &rarr; down {shape(1, T, D)}</p>
{figure("c-ffn", f"hidden units after the activation ({units})")}
{figure("c-ffn-hist", "distribution of the inputs to the activation (all real tokens, all units)")}
{figure("c-norm2", "per token: mean and std before and after LayerNorm #2")}
<div class="scroll"><table class="stats" id="t-ffn"></table></div>"""


def _stack(d: dict[str, Any]) -> str:
    c, n = d["config"], d["n_real"]
    final = (" After the last layer, a final LayerNorm." if c["has_final_norm"] else "")
    group = d["thinning"]["similarity_group"]
    runs = f" (tokens pooled in runs of {group}: a cell is the mean cosine)" if group > 1 else ""
    return f"""<p>Each layer's output is the next layer's input; after {c["n_layers"]} layers every token's
vector has gathered information from the others: its context vector.{final} Below: each token's
vector length after every layer, and the cosine between its vector after a layer and before it
(1 = unchanged direction).</p>
<p class="shapes">every layer: {shape(1, len(d["tokens"]), c["d_model"])} &rarr; the context vectors
of the real tokens {shape(n, c["d_model"])}</p>
<div class="pair">
{figure("c-norms", "vector norm per token (emb = the first layer's input)")}
{figure("c-cosines", "cosine to the previous layer's vector")}
</div>
{figure("c-final", "the final context vectors" + _dims_note(d))}
{figure("c-similarity", "cosine similarity between the final context vectors" + runs)}"""


def _pooling(d: dict[str, Any]) -> str:
    p, c, n = d["pooling"], d["config"], d["n_real"]
    D, m = c["d_model"], len(p["texts"])
    how = {
        "mean": (f"<b>mean pooling</b>: the sentence vector is the average of the {n} real tokens' "
                 "context vectors ([CLS] and [SEP] included); padding is left out of the sum and "
                 "of the count, so it never changes the result"),
        "cls": ("<b>CLS pooling</b>: the sentence vector is the context vector of the first token, "
                "[CLS]; the other tokens reach it only through attention"),
        "max": (f"<b>max pooling</b>: each of the {D} dimensions takes its largest value among the "
                f"{n} real tokens (padding left out); below, the share of dimensions each token supplies"),
    }[p["mode"]]
    norm = (f"Then <b>L2 normalisation</b> divides it by its length ({p['pooled_norm']:.4f}), so every "
            "sentence vector has length 1 and the dot product of two is their cosine."
            if p["normalize"] else
            f"This model does <b>not normalise</b>: the sentence vector is the pooled vector itself "
            f"(length {p['pooled_norm']:.4f}); a cosine divides by the two lengths.")
    if p["embed_error"] is not None:
        check = (f"<code>Pipeline.embed([text])[0]</code> gives the same vector: largest difference "
                 f"<b id=\"embed-error\">{p['embed_error']:.1e}</b>.")
    else:
        check = (f"<code>--max-tokens</code> cut this trace at {n} tokens, but <code>ctxvec embed</code> "
                 f"reads {p['n_tokens'][0]}: its vector (text 1 below) is pooled over all of them, "
                 "so it differs from the one above.")
    first = ", ".join(f"{v:.4f}" for v in p["vector"][:6])
    rows = "".join(
        f'<tr><td>text {i + 1}</td><td class="text">{escape(_clip(text, 80))}</td><td>{k}'
        f'{" (cut)" if cut else ""}</td><td>{", ".join(f"{v:.4f}" for v in vec[:4])}, ...</td></tr>'
        for i, (text, k, cut, vec) in enumerate(zip(p["texts"], p["n_tokens"], p["truncated"], p["vectors"])))
    compare = (f"""{figure("c-sentences", "the texts' sentence vectors (what ctxvec embed writes)")}
{figure("c-text-similarity", "cosine similarity between the texts' sentence vectors")}""" if m > 1 else
               '<p class="hint">Give more texts (<code>ctxvec explain "one text" "another"</code>) '
               "to compare their sentence vectors.</p>")
    return f"""<p>A Transformer encoder gives one vector per token; <code>ctxvec embed</code> and
<code>Pipeline.embed</code> give one per text. This model uses {how}. {norm}</p>
<p class="shapes">context vectors {shape(n, D)} &rarr; pooled {shape(D)} &rarr; sentence vector {shape(D)}</p>
{figure("c-pool-weights", "how much each token counts in the pooled vector")}
{figure("c-pooled", "the pooled vector, before normalisation") if p["normalize"] else ""}
{figure("c-sentence", "the sentence vector" + ("" if p["normalize"] else " (the pooled vector itself)"))}
<p id="sentence-check">The sentence vector begins {first}, ... {check}</p>
<div class="scroll"><table class="stats texts" id="t-texts"><tr><th></th><th>text</th><th>tokens</th>
<th>sentence vector</th></tr>{rows}</table></div>
{compare}"""


def render(data: dict[str, Any]) -> str:
    """The whole page as one HTML string."""
    bodies = {"step-tokens": _tokens, "step-onehot": _onehot, "step-embedding": _embedding,
              "step-positions": _positions, "step-attention": _attention,
              "step-addnorm1": _addnorm1, "step-ffn": _ffn, "step-stack": _stack,
              "step-pooling": _pooling}
    sections = "\n".join(f'<section id="{sid}"><h2>{escape(title)}</h2>\n{bodies[sid](data)}\n</section>'
                         for sid, title in SECTIONS)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>ctxvec explain: {escape(_clip(data["text"], 60))}</title>
<link rel="icon" href="data:,">
<style>{_asset("page.css")}</style>
</head><body>
{_header(data)}
<main>
{sections}
</main>
<div id="tip" hidden></div>
{_json_block(data)}
<script>{_asset("page.js")}</script>
</body></html>
"""
