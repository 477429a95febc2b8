"""The explain page's HTML, CSS and JavaScript (see ``ctxvec.explain``).

``render(data)`` turns ``explain.page_data(...)`` into one self-contained HTML string: the
prose and the tables are written here (every piece of text from the input goes through
``html.escape``), the numbers travel as a JSON block, and the inline script draws the pictures
on <canvas> from them. Nothing is fetched: no external script, style, font or image.

The script sizes every picture to the width its figure has (and redraws on resize), so nothing
overflows into a scrollbar; every text it draws on a canvas goes through one ``label`` function
that keeps a record of its box, which the tests read to check that no two labels overlap.
"""

from __future__ import annotations

import json
from html import escape
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
<style>{CSS}</style>
</head><body>
{_header(data)}
<main>
{sections}
</main>
<div id="tip" hidden></div>
{_json_block(data)}
<script>{JS}</script>
</body></html>
"""


CSS = """
:root { --ink: #1d2330; --muted: #5b6475; --line: #d9dde5; --bg: #f6f7f9; --accent: #3b5bdb; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
  color: var(--ink); background: var(--bg); }
header, main { max-width: 1040px; margin: 0 auto; padding: 0 20px; }
header { padding-top: 18px; }
h1 { font-size: 24px; margin: 8px 0; } h1 q { color: var(--accent); }
h2 { font-size: 19px; margin: 0 0 8px; }
#arch { margin: 4px 0; padding-left: 20px; columns: 2; font-size: 14px; }
.check { color: var(--muted); font-size: 13px; }
.note { background: #fff3bf; border: 1px solid #f0c36d; padding: 8px 12px; border-radius: 6px; margin: 8px 0; }
.note ul { margin: 4px 0 0; padding-left: 20px; }
nav { display: flex; flex-wrap: wrap; gap: 6px 14px; font-size: 13px; margin: 8px 0; }
nav a { color: var(--accent); text-decoration: none; }
#controls { position: sticky; top: 0; z-index: 5; background: #fff; border-bottom: 1px solid var(--line);
  padding: 8px 20px; display: flex; gap: 18px; align-items: center; justify-content: center;
  box-shadow: 0 1px 4px rgba(0,0,0,.06); }
#controls select { font: inherit; padding: 2px 4px; }
.hint { color: var(--muted); font-size: 13px; }
section { background: #fff; border: 1px solid var(--line); border-radius: 10px; margin: 18px 0;
  padding: 16px 20px; }
code { background: #eef1f6; padding: 0 4px; border-radius: 4px; font-size: 13px; }
code.shape { background: #e7ecff; color: #243a9b; font-weight: 600; }
.shapes { font-size: 14px; }
.scroll { overflow-x: auto; }
.tokens { display: flex; flex-wrap: wrap; gap: 3px; font-size: 13px; }
.tokens > div { text-align: center; border-radius: 6px; padding: 3px 6px; min-width: 40px; max-width: 100%; }
.tokens .tok { font-weight: 600; white-space: pre-wrap; overflow-wrap: anywhere; }
.tokens .pos, .tokens .id, .tokens .m { color: var(--muted); font-size: 12px; }
.word { background: #e7f5ff; } .special { background: #fff0f6; } .pad { background: #eceff3; }
.key span { padding: 1px 6px; border-radius: 4px; font-size: 12px; }
figure { margin: 10px 0; }
figcaption { font-size: 13px; color: var(--muted); margin-bottom: 4px; }
canvas.map { display: block; }
.legend { font-size: 12px; color: var(--muted); display: flex; align-items: center; gap: 6px; }
.legend i { display: inline-block; width: 120px; height: 10px; border-radius: 2px; }
.pair { display: flex; flex-wrap: wrap; gap: 24px; }
.pair figure { flex: 1 1 420px; min-width: 0; }
#heads-grid { display: flex; flex-wrap: wrap; gap: 10px; }
#heads-grid figure { margin: 0; cursor: pointer; padding: 4px; border: 2px solid transparent;
  border-radius: 6px; text-align: center; }
#heads-grid figure.on { border-color: var(--accent); }
#heads-grid figcaption { margin: 2px 0 0; }
.concat { display: flex; max-width: 760px; border: 1px solid #9aa5b8; border-radius: 4px; overflow: hidden;
  font-size: 12px; text-align: center; }
.concat span { padding: 4px 0; border-right: 1px solid #fff; background: hsl(calc(var(--h, 0) * 1deg), 60%, 80%); }
table.stats { border-collapse: collapse; font-size: 13px; }
table.stats th, table.stats td { padding: 2px 10px; border-bottom: 1px solid var(--line); text-align: right;
  white-space: pre; }
table.stats th:first-child, table.stats td:first-child { text-align: left; }
table.texts td.text, table.texts th:nth-child(2) { text-align: left; white-space: normal; overflow-wrap: anywhere; }
#tip { position: fixed; pointer-events: none; background: rgba(20,24,33,.92); color: #fff; font-size: 12px;
  padding: 3px 7px; border-radius: 4px; z-index: 10; white-space: pre; }
"""

JS = r"""
(function () {
"use strict";
const D = JSON.parse(document.getElementById("ctxvec-data").textContent);
const $ = (id) => document.getElementById(id);
const C = D.config, n = D.n_real, T = D.tokens.length, H = C.n_heads;
const short = (s) => (s.length > 12 ? s.slice(0, 11) + "\u2026" : s);
const tokens = D.tokens.map(short), real = tokens.slice(0, n);
const dims = (k) => Array.from({length: k}, (_, i) => `dim ${i}`);
const fmt = (v) => (v === null ? "masked / not computed" : Math.abs(v) >= 100 ? v.toFixed(1) : String(+v.toFixed(4)));
const FONT = 11, GAP = 2, PITCH = FONT + GAP;  // label font (px); labels closer than PITCH would touch

const VIRIDIS = [[68,1,84],[72,40,120],[62,74,137],[49,104,142],[38,130,142],[31,158,137],
                 [53,183,121],[109,205,89],[180,222,44],[253,231,37]];
const DIVERGING = [[33,102,172],[103,169,207],[209,229,240],[247,247,247],[253,219,199],
                   [239,138,98],[178,24,43]];
function ramp(stops, t) {
  t = Math.min(1, Math.max(0, t));
  const x = t * (stops.length - 1), i = Math.min(stops.length - 2, Math.floor(x)), f = x - i;
  return stops[i].map((a, j) => Math.round(a + f * (stops[i + 1][j] - a)));
}
const css = (c) => `rgb(${c[0]},${c[1]},${c[2]})`;

function range(m, opt) {
  let lo = Infinity, hi = -Infinity, sum = 0, clipped = false;
  // sum: a position-weighted checksum of what is drawn (tests compare it across selections)
  m.forEach((row, r) => row.forEach((v, c) => {
    if (v !== null) { lo = Math.min(lo, v); hi = Math.max(hi, v); sum += v * (1 + (r * 31 + c * 17) % 101); }
  }));
  if (!isFinite(lo)) { lo = 0; hi = 1; }
  if (opt.diverging && opt.robust && opt.vmax === undefined) {
    // wide maps: a few outliers would wash out every other cell, so clip at the 99th percentile
    const abs = m.flat().filter((v) => v !== null).map(Math.abs).sort((a, b) => a - b);
    const a = abs[Math.floor(0.99 * (abs.length - 1))] || 1;
    clipped = a < abs[abs.length - 1]; lo = -a; hi = a;
  } else if (opt.diverging) { const a = opt.vmax ?? (Math.max(Math.abs(lo), Math.abs(hi)) || 1); lo = -a; hi = a; }
  else { lo = opt.vmin ?? lo; hi = opt.vmax ?? hi; if (hi <= lo) hi = lo + 1; }
  return {lo, hi, sum, clipped};
}

// The width a figure has: pictures fit it (and are redrawn on resize) instead of overflowing.
const room = (canvas, max) => Math.max(120, Math.min(canvas.parentElement.clientWidth, max || Infinity));
const probe = document.createElement("canvas").getContext("2d");
probe.font = `${FONT}px system-ui, sans-serif`;
const measure = (s) => probe.measureText(s).width;
const widest = (labels) => Math.ceil(Math.max(0, ...labels.map(measure)));

function setup(canvas, w, h) {
  const dpr = window.devicePixelRatio || 1;
  canvas.width = Math.ceil(w * dpr); canvas.height = Math.ceil(h * dpr);
  canvas.style.width = w + "px"; canvas.style.height = h + "px";
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.font = `${FONT}px system-ui, sans-serif`;
  canvas._labels = [];
  return ctx;
}

// Every text on a canvas is drawn here, and its box kept in canvas._labels (in the label's own
// rotated frame: anchor x, y, angle, and the extent [x0, x0 + w] x [-h/2, h/2] around it), so
// that tests can check that labels neither overlap nor leave the canvas.
function label(ctx, s, x, y, opt = {}) {
  const angle = opt.angle || 0, align = opt.align || "left", w = ctx.measureText(s).width;
  ctx.save(); ctx.translate(x, y); ctx.rotate(angle);
  ctx.textAlign = align; ctx.textBaseline = "middle"; ctx.fillText(s, 0, 0);
  ctx.restore();
  const x0 = align === "right" ? -w : align === "center" ? -w / 2 : 0;
  ctx.canvas._labels.push({s, x, y, angle, x0, w, h: FONT, role: opt.role || "note"});
}

// Draw one label in `every` (1: all) when they are too close for all; 0: none.
const thinning = (pitch, need, thin) => (pitch >= need ? 1 : thin ? Math.ceil(need / pitch) : 0);

// A matrix (rows of numbers, null = masked or not computed) as coloured cells with labels.
// Token axes (opt.thinRows, opt.thinCols) keep every k-th name when the cells are too small for
// all of them; other axes (dimensions, units) show names only when every one fits.
function heatmap(canvas, m, opt) {
  const rows = m.length, cols = m[0].length, maxW = room(canvas, opt.maxWidth);
  const {lo, hi, sum, clipped} = range(m, opt);
  const colour = (v) => (v === null ? [215, 218, 224]
    : ramp(opt.diverging ? DIVERGING : VIRIDIS, (v - lo) / (hi - lo)));
  const left = opt.rowLabels ? widest(opt.rowLabels) + 8 : 0;
  const colW = opt.colLabels ? widest(opt.colLabels) : 0;
  const fit = (right) => opt.cw || Math.max(0.2, Math.min(opt.maxCell || 44, (maxW - left - right) / cols));
  // column names slant at 45 degrees when the cells are wide enough, else stand upright; the
  // last one needs room on the right
  const slant = Boolean(opt.colLabels) && fit(colW * Math.SQRT1_2) * Math.SQRT1_2 >= PITCH;
  const right = !opt.colLabels ? 0 : slant ? Math.ceil(colW * Math.SQRT1_2) : FONT;
  const cw = fit(right);
  let ch = opt.ch || Math.max(opt.square ? cw : 4, Math.min(opt.square ? cw : 18, 420 / rows));
  if (opt.square) ch = cw;
  const rowEvery = opt.rowLabels ? thinning(ch, PITCH, opt.thinRows) : 0;
  const colPitch = slant ? cw * Math.SQRT1_2 : cw;
  const colEvery = opt.colLabels ? thinning(colPitch, PITCH, opt.thinCols) : 0;
  // a row name taller than its row needs room above the first row and below the last
  const edge = rowEvery && ch < FONT ? Math.ceil((FONT - ch) / 2) : 0;
  const top = colEvery ? Math.ceil(slant ? (colW + FONT) * Math.SQRT1_2 : colW) + 6 : edge;
  const w = Math.ceil(left + cols * cw + right), h = Math.ceil(top + rows * ch + edge);
  const ctx = setup(canvas, w, h);
  const off = document.createElement("canvas"); off.width = cols; off.height = rows;
  const octx = off.getContext("2d"), img = octx.createImageData(cols, rows);
  for (let r = 0; r < rows; r++) for (let c = 0; c < cols; c++) {
    const k = 4 * (r * cols + c), col = colour(m[r][c]);
    img.data[k] = col[0]; img.data[k + 1] = col[1]; img.data[k + 2] = col[2]; img.data[k + 3] = 255;
  }
  octx.putImageData(img, 0, 0);
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(off, left, top, cols * cw, rows * ch);
  ctx.fillStyle = "#1d2330";
  if (rowEvery) opt.rowLabels.forEach((s, r) => {
    if (r % rowEvery === 0) label(ctx, s, left - 4, top + (r + 0.5) * ch, {align: "right", role: "row"});
  });
  if (colEvery) opt.colLabels.forEach((s, c) => {
    if (c % colEvery === 0) label(ctx, s, left + (c + 0.5) * cw, top - 4,
                                  {angle: slant ? -Math.PI / 4 : -Math.PI / 2, role: "col"});
  });
  if (opt.numbers && cw >= 30 && ch >= 15) {
    for (let r = 0; r < rows; r++) for (let c = 0; c < cols; c++) {
      const v = m[r][c]; if (v === null) continue;
      const s = v.toFixed(opt.decimals ?? (Math.abs(v) >= 10 ? 1 : 2));
      if (ctx.measureText(s).width > cw - 4) continue;  // a number wider than its cell is left to the tooltip
      const col = colour(v); ctx.fillStyle = col[0] * 0.3 + col[1] * 0.59 + col[2] * 0.11 > 140 ? "#111" : "#fff";
      label(ctx, s, left + (c + 0.5) * cw, top + (r + 0.5) * ch, {align: "center", role: "value"});
    }
  }
  canvas._map = {m, left, top, cw, ch, rowLabels: opt.rowLabels, colLabels: opt.colLabels};
  canvas.dataset.checksum = `${rows}x${cols}:${sum.toFixed(5)}`;
  canvas.dataset.drawn = "1";
  legend(canvas, lo, hi, opt.diverging ? DIVERGING : VIRIDIS, clipped ? "(the largest 1% of |values| clipped)" : "");
}

function legend(canvas, lo, hi, stops, unit) {
  const el = canvas.closest("figure") && canvas.closest("figure").querySelector(".legend");
  if (!el) return;
  const grad = stops.map((s, i) => `${css(s)} ${(100 * i / (stops.length - 1)).toFixed(0)}%`).join(",");
  el.textContent = "";
  const a = document.createElement("span"); a.textContent = lo.toPrecision(3);
  const bar = document.createElement("i"); bar.style.background = `linear-gradient(90deg,${grad})`;
  const b = document.createElement("span"); b.textContent = hi.toPrecision(3) + (unit ? " " + unit : "");
  el.append(a, bar, b);
}

// Hover: the value under the pointer.
const tip = $("tip");
document.addEventListener("mousemove", (e) => {
  const c = e.target, info = c && c._map;
  if (!info) { tip.hidden = true; return; }
  const rect = c.getBoundingClientRect();
  const col = Math.floor((e.clientX - rect.left - info.left) / info.cw);
  const row = Math.floor((e.clientY - rect.top - info.top) / info.ch);
  if (row < 0 || col < 0 || row >= info.m.length || col >= info.m[0].length) { tip.hidden = true; return; }
  const rl = info.rowLabels ? info.rowLabels[row] : `row ${row}`;
  const cl = info.colLabels ? info.colLabels[col] : `column ${col}`;
  tip.textContent = `${rl} \u00b7 ${cl}: ${fmt(info.m[row][col])}`;
  tip.style.left = e.clientX + 12 + "px"; tip.style.top = e.clientY + 12 + "px"; tip.hidden = false;
});

// About `count` round steps from lo to hi (0 among them when the range crosses it).
function ticks(lo, hi, count, integer) {
  const raw = (hi - lo) / count, mag = 10 ** Math.floor(Math.log10(raw));
  let step = [1, 2, 2.5, 5, 10].map((f) => f * mag).find((s) => s >= raw);
  if (integer) step = Math.max(1, Math.round(step));
  const decimals = Math.max(0, Math.ceil(-Math.log10(step) + 1e-9) + (String(step).includes("25") ? 1 : 0));
  const from = Math.floor(lo / step + 1e-9), to = Math.ceil(hi / step - 1e-9);
  return Array.from({length: to - from + 1}, (_, i) => {
    const v = (from + i) * step;
    return {v, s: v.toFixed(decimals)};
  });
}

// Bars: one group per label, one bar per series (values may be negative). The axis ends on
// round ticks; category names stand upright under their group, one in k when too close for all.
function bars(canvas, labels, series, opt = {}) {
  const width = room(canvas, opt.maxWidth), plotH = 150;
  const all = series.flatMap((s) => s.values);
  const axis = ticks(Math.min(0, ...all), Math.max(0, ...all) || 1, 4, opt.integer);
  const lo = axis[0].v, hi = axis[axis.length - 1].v;
  const left = widest(axis.map((t) => t.s)) + 10, plotW = width - left - 8;
  // the key: series names in rows that wrap at the canvas's width
  let kx = left, ky = 0; const keys = series.map((s) => {
    const w = measure(s.name) + 14;
    if (kx > left && kx + w > width) { kx = left; ky += 16; }
    const at = {x: kx, y: ky}; kx += w + 16; return at;
  });
  const top = ky + 16 + 10, group = plotW / labels.length;
  const named = labels.map((s, i) => [s, i]).filter(([s]) => s !== "");
  // sparse names (a histogram's every 5th bin) lie flat when they fit side by side
  const flat = named.every(([s, i], j) => j === 0
    || (i - named[j - 1][1]) * group >= (measure(s) + measure(named[j - 1][0])) / 2 + 6);
  const every = flat ? 1 : thinning(group, PITCH, true);
  const bottom = flat ? FONT + 12 : widest(labels) + 12;
  const ctx = setup(canvas, width, top + plotH + bottom);
  const y = (v) => top + plotH * (hi - v) / (hi - lo);
  ctx.strokeStyle = "#e3e6ec"; ctx.fillStyle = "#5b6475";
  axis.forEach((t) => {
    ctx.beginPath(); ctx.moveTo(left, y(t.v)); ctx.lineTo(left + plotW, y(t.v)); ctx.stroke();
    label(ctx, t.s, left - 4, y(t.v), {align: "right", role: "tick"});
  });
  ctx.strokeStyle = "#8a93a5"; ctx.beginPath(); ctx.moveTo(left, y(0)); ctx.lineTo(left + plotW, y(0)); ctx.stroke();
  const bw = Math.max(0.5, (group * 0.85) / series.length);
  series.forEach((s, k) => {
    ctx.fillStyle = s.colour;
    s.values.forEach((v, i) => {
      ctx.fillRect(left + i * group + group * 0.075 + k * bw, Math.min(y(v), y(0)),
                   Math.max(0.5, bw - 0.5), Math.abs(y(v) - y(0)));
    });
  });
  ctx.fillStyle = "#1d2330";
  named.forEach(([s, i]) => {
    if (i % every !== 0) return;
    const x = left + (i + 0.5) * group;
    // below the bottom tick's name, which reaches FONT / 2 under the axis
    if (flat) label(ctx, s, x, top + plotH + 7 + FONT / 2, {align: "center", role: "col"});
    else label(ctx, s, x, top + plotH + 7, {angle: -Math.PI / 2, align: "right", role: "col"});
  });
  series.forEach((s, k) => {
    ctx.fillStyle = s.colour; ctx.fillRect(keys[k].x, keys[k].y + 3, 10, 10);
    ctx.fillStyle = "#1d2330"; label(ctx, s.name, keys[k].x + 14, keys[k].y + 8, {role: "key"});
  });
  canvas.dataset.checksum = `${labels.length}:${all.reduce((a, v) => a + Math.abs(v), 0).toFixed(5)}`;
  canvas.dataset.drawn = "1";
}

function table(el, head, rows) {
  el.textContent = "";
  const tr = el.insertRow();
  head.forEach((h) => { const th = document.createElement("th"); th.textContent = h; tr.append(th); });
  rows.forEach((r) => { const row = el.insertRow(); r.forEach((v) => { row.insertCell().textContent = v; }); });
}

// Every row of the one-hot tensor, named, up to 128 tokens; past that the picture stays
// 1,664 px tall and one row in k is named.
function onehot(canvas) {
  const V = C.vocab_size, names = D.ids.map((id, r) => `${tokens[r]} ${id}`);
  const rowH = Math.max(Math.min(18, 400 / T), Math.min(PITCH, 128 * PITCH / T));
  const every = thinning(rowH, PITCH, true), left = widest(names) + 10;
  const width = room(canvas), plot = width - left - 4;
  const ctx = setup(canvas, width, T * rowH + 24);
  D.ids.forEach((id, r) => {
    ctx.fillStyle = r % 2 ? "#f1f3f7" : "#e8ebf1"; ctx.fillRect(left, r * rowH, plot, rowH - (rowH > 4 ? 1 : 0));
    ctx.fillStyle = D.kinds[r] === "pad" ? "#868e96" : "#c2255c";
    ctx.fillRect(left + Math.floor(id / V * plot) - 1, r * rowH, 3, Math.max(1, rowH - 1));
    ctx.fillStyle = "#1d2330";
    if (r % every === 0) label(ctx, names[r], left - 4, (r + 0.5) * rowH, {align: "right", role: "row"});
  });
  ctx.fillStyle = "#5b6475";
  label(ctx, "column 0", left, T * rowH + 12, {role: "tick"});
  label(ctx, `column ${V - 1}`, left + plot, T * rowH + 12, {align: "right", role: "tick"});
  canvas.dataset.checksum = `${T}:${D.ids.reduce((a, b) => a + b, 0)}`; canvas.dataset.drawn = "1";
}

// ---- the fixed pictures (steps 1-4, 8 and 9) ----
const layerNames = ["emb"].concat(D.layers.map((_, i) => String(i + 1)));
const transpose = (m) => m[0].map((_, j) => m.map((row) => row[j]));  // (layer, token) -> (token, layer)
const shownDims = D.dims.map((i) => `dim ${i}`), P = D.pooling;
const textNames = P.texts.map((_, i) => `text ${i + 1}`);

function drawFixed() {
  heatmap($("c-mask"), [D.mask], {colLabels: tokens, vmin: 0, vmax: 1, numbers: true, decimals: 0, thinCols: true,
                                   cw: Math.max(1, Math.min(44, (room($("c-mask")) - FONT) / T)), ch: 24});
  onehot($("c-onehot"));
  const wide = {rowLabels: tokens, colLabels: shownDims, diverging: true, robust: true, thinRows: true};
  heatmap($("c-embedding"), D.token_embedding, wide);
  heatmap($("c-positions"), D.positions, {...wide, rowLabels: tokens.map((_, i) => `pos ${i}`)});
  heatmap($("c-sum"), D.embedding_sum, wide);
  if ($("c-embeddings")) heatmap($("c-embeddings"), D.embeddings, wide);

  const perLayer = {rowLabels: real, numbers: true, maxWidth: 480, ch: Math.max(PITCH, Math.min(22, 1400 / n)),
                    thinRows: true};
  heatmap($("c-norms"), transpose(D.norms), {...perLayer, colLabels: layerNames});
  heatmap($("c-cosines"), transpose(D.cosines), {...perLayer, colLabels: layerNames.slice(1)});
  heatmap($("c-final"), D.final, {...wide, rowLabels: real});
  const simLabels = D.similarity_labels.map(short);
  heatmap($("c-similarity"), D.similarity, {rowLabels: simLabels, colLabels: simLabels, diverging: true, vmax: 1,
                                           numbers: true, square: true, maxWidth: 560, thinRows: true, thinCols: true});

  const weight = P.mode === "max" ? "share of the dimensions where this token holds the maximum"
                                  : "weight of this token in the pooled vector";
  bars($("c-pool-weights"), real, [{name: weight, values: P.weights, colour: "#3b5bdb"}]);
  const vector = {colLabels: dims(C.d_model), diverging: true, ch: 24};
  if ($("c-pooled")) heatmap($("c-pooled"), [P.pooled], {...vector, rowLabels: ["pooled"]});
  heatmap($("c-sentence"), [P.vector], {...vector, rowLabels: ["sentence vector"]});
  if ($("c-sentences")) {
    heatmap($("c-sentences"), P.vectors, {...vector, rowLabels: textNames, ch: undefined, thinRows: true});
    heatmap($("c-text-similarity"), P.similarity, {rowLabels: textNames, colLabels: textNames, diverging: true,
                                                   vmax: 1, numbers: true, square: true, maxWidth: 560,
                                                   thinRows: true, thinCols: true});
  }
}

// ---- steps 5-7 follow the layer and head selects ----
const layerSel = $("layer-select"), headSel = $("head-select");
// attention maps: one row and column per token, or per run of tokens on a thinned page
const runs = D.attention_labels.map(short), G = runs.length;
const padRows = (rows) => rows.concat(Array.from({length: G - D.attention_real}, () => Array(G).fill(null)));
function headMatrix(layer, head, key) {
  const hs = layer[key];
  if (head !== "avg") return hs[Number(head)];
  return hs[0].map((row, q) => row.map((v, k) => (v === null ? null : hs.reduce((a, h) => a + h[q][k], 0) / hs.length)));
}

function drawHeadsGrid(layer) {
  const grid = $("heads-grid"); grid.textContent = "";
  const cell = Math.max(2, Math.min(10, Math.floor(96 / G)));
  ["avg"].concat(Array.from({length: H}, (_, i) => String(i))).forEach((h) => {
    const fig = document.createElement("figure"), cv = document.createElement("canvas");
    const cap = document.createElement("figcaption");
    cv.className = "map tile";
    cap.textContent = h === "avg" ? "average" : `head ${Number(h) + 1}`;
    fig.dataset.head = h; fig.append(cv, cap); grid.append(fig);
    heatmap(cv, padRows(headMatrix(layer, h, "attention")), {cw: cell, ch: cell, vmin: 0});
    fig.addEventListener("click", () => { headSel.value = h; update(); });
  });
}

function update() {
  const li = Number(layerSel.value), head = headSel.value, layer = D.layers[li];
  const what = `layer ${li + 1}, ${head === "avg" ? "average over heads" : "head " + (Number(head) + 1)}`;
  document.querySelectorAll("#step-attention .sel").forEach((el) => { el.textContent = "\u2014 " + what; });
  const sq = {rowLabels: runs, colLabels: runs, numbers: true, square: true, maxWidth: 480, maxCell: 44,
              thinRows: true, thinCols: true};
  heatmap($("c-scores"), padRows(headMatrix(layer, head, "scores")), {...sq, diverging: true});
  heatmap($("c-attention"), padRows(headMatrix(layer, head, "attention")), {...sq, vmin: 0});
  for (const id of ["c-scores", "c-attention"]) { $(id).dataset.layer = li; $(id).dataset.head = head; }
  if ($("heads-grid").dataset.layer !== String(li)) { drawHeadsGrid(layer); $("heads-grid").dataset.layer = li; }
  document.querySelectorAll("#heads-grid figure").forEach((f) => f.classList.toggle("on", f.dataset.head === head));

  const n1 = layer.norm1, n2 = layer.norm2;
  const statSeries = (s) => [
    {name: "mean before", values: s.before.mean, colour: "#a5b4fc"},
    {name: "std before", values: s.before.std, colour: "#3b5bdb"},
    {name: "mean after", values: s.after.mean, colour: "#fcc2d7"},
    {name: "std after", values: s.after.std, colour: "#c2255c"}];
  const stats = (s, i) => [s.before.mean[i], s.before.std[i], s.after.mean[i], s.after.std[i]].map((v) => v.toFixed(4));
  bars($("c-norm1"), real, statSeries(n1));
  table($("t-norm1"), [`layer ${li + 1}`, "mean before", "std before", "mean after", "std after"],
        real.map((t, i) => [t, ...stats(n1, i)]));

  heatmap($("c-ffn"), layer.ffn_hidden, {rowLabels: real, colLabels: D.ffn_units.map((u) => `unit ${u}`),
                                         diverging: true, robust: true, thinRows: true});
  const hist = layer.ffn_histogram;
  bars($("c-ffn-hist"), hist.counts.map((_, i) => (i % 5 ? "" : hist.edges[i].toFixed(1))),
       [{name: "how many (token, unit) inputs fall in each bin", values: hist.counts, colour: "#3b5bdb"}],
       {integer: true, maxWidth: 640});
  bars($("c-norm2"), real, statSeries(n2));
  const share = layer.ffn_active.reduce((a, v) => a + v, 0) / n;
  table($("t-ffn"), [`layer ${li + 1}`, "FFN units active", "mean before #2", "std before #2", "mean after #2", "std after #2"],
        real.map((t, i) => [t, (100 * layer.ffn_active[i]).toFixed(1) + " %", ...stats(n2, i)])
          .concat([["all tokens", (100 * share).toFixed(1) + " %", "", "", "", ""]]));
}
layerSel.addEventListener("change", update);
headSel.addEventListener("change", update);
drawFixed();
update();
// a new width redraws every picture to fit it
let resizing = 0;
window.addEventListener("resize", () => {
  clearTimeout(resizing);
  resizing = setTimeout(() => { drawFixed(); update(); }, 100);
});
document.body.dataset.ready = "1";
})();
"""
