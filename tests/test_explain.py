"""The explain page: a faithful trace of the model, numbers found on the page, a real browser."""

import io
import json
import math
import re
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import ctxvec
from ctxvec import Encoder, EncoderConfig, Pipeline
from ctxvec.cli import main
from ctxvec.explain import explain, page_data, render_html, trace, write_pngs
from ctxvec.explain.data import plan_thinning
from ctxvec.loading import save_pipeline, seed_tokenizer
from ctxvec.model.pooling import Pooling

CHROMIUM = Path("/usr/bin/chromium")
SECTIONS = ["step-tokens", "step-onehot", "step-embedding", "step-positions", "step-attention",
            "step-addnorm1", "step-ffn", "step-stack", "step-pooling"]
TEXT = "my name is aj"
OTHERS = ["what is your name", "the cat sat on the mat"]
# a natural text well over 64 tokens (cut to 60 for the layout checks, to 300 for the size check)
LONG = ("In the beginning God created the heavens and the earth. The earth was formless and empty, "
        "and darkness was on the surface of the deep, and God's Spirit was hovering over the waters. ") * 12


@lru_cache(maxsize=None)
def load(name: str) -> Pipeline:
    """Each model loaded once for the whole file (a trace leaves the pipeline as it was)."""
    return tiny_prenorm() if name == "tiny-prenorm" else ctxvec.load(name)


def tiny_prenorm() -> Pipeline:
    """Pre-norm, learned positions, GELU, final LayerNorm: the variants the two real models lack."""
    config = EncoderConfig(vocab_size=8000, d_model=32, n_heads=4, d_ff=64, n_layers=2, dropout=0.0,
                           max_len=64, norm_first=True, position="learned", activation="gelu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        encoder = Encoder(config)
    return Pipeline(seed_tokenizer(max_len=64), encoder, name="tiny-prenorm", description="a tiny test model")


@pytest.fixture(scope="module", params=["seed", "minilm", "tiny-prenorm"])
def pipeline(request) -> Pipeline:
    return load(request.param)


@pytest.fixture(scope="module")
def traced(pipeline):
    t = trace(pipeline, TEXT)
    return t, render_html(t)


def embedded_data(page: str) -> dict:
    block = re.search(r'<script type="application/json" id="ctxvec-data">(.*?)</script>', page, re.S)
    assert block, "the page embeds its data as a JSON block"
    return json.loads(block.group(1))


def test_trace_equals_the_models_forward(pipeline, traced):
    t, _ = traced
    assert t.max_error <= 1e-5
    real = t.attention_mask[0].bool()
    with torch.inference_mode():
        expected = pipeline.encoder(t.input_ids, t.attention_mask).last_hidden_state
    torch.testing.assert_close(t.final[0, real], expected[0, real], atol=1e-5, rtol=0)
    assert t.n_real == real.sum() and len(t.tokens) == t.n_real + 2 and t.kinds[-1] == "pad"
    assert t.lookup_error == 0.0  # one_hot @ E is exactly the lookup E[ids]


def test_each_layers_steps_are_what_their_names_say(pipeline, traced):
    """The attention's output is the projection alone (the layer adds the residual after it):
    post-norm's LayerNorm #1 receives input + attention_output, #2 its output + ffn_output."""
    t, _ = traced
    for i, (layer, step) in enumerate(zip(pipeline.encoder.stack.layers, t.layers)):
        with torch.inference_mode():
            projected = layer.attention.out(step.concat)
        torch.testing.assert_close(step.attention_output, projected, atol=1e-6, rtol=0, msg=f"layer {i}")
        if not layer.norm_first:
            torch.testing.assert_close(step.norm1_input, step.input + step.attention_output, atol=1e-5, rtol=0)
            torch.testing.assert_close(step.norm2_input, step.norm1_output + step.ffn_output, atol=1e-5, rtol=0)


def test_an_attention_row_recomputed_from_the_weights_is_on_the_page(pipeline, traced):
    t, page = traced
    data, n, config = embedded_data(page), t.n_real, pipeline.encoder.config
    layer_index, head, query = len(t.layers) - 1, config.n_heads - 1, 1
    layer = pipeline.encoder.stack.layers[layer_index]
    with torch.inference_mode():
        states = pipeline.encoder(t.input_ids, t.attention_mask, output_hidden_states=True).hidden_states
        x = states[layer_index][0, :n]  # (n, D) the layer's input, real tokens
        if config.norm_first:
            x = layer.norm1(x)
        q, k, _ = (x @ layer.attention.qkv.weight.T + layer.attention.qkv.bias).chunk(3, dim=-1)
        dh = config.d_head
        q_h, k_h = q[:, head * dh:(head + 1) * dh], k[:, head * dh:(head + 1) * dh]  # (n, Dh)
        row = torch.softmax(q_h[query] @ k_h.T / math.sqrt(dh), dim=-1)  # (n,)
    shown = data["layers"][layer_index]["attention"][head][query]
    np.testing.assert_allclose(shown[:n], row.numpy(), atol=6e-5)  # the page rounds to 4 decimals
    assert shown[n:] == [0.0] * (len(t.tokens) - n)  # padding keys get nothing


def test_a_positional_encoding_value_is_on_the_page(pipeline, traced):
    t, page = traced
    data, config = embedded_data(page), pipeline.encoder.config
    pos, i = 3, 5
    if config.position == "sinusoidal":
        angle = pos / 10000 ** (2 * i / config.d_model)
        expected = [math.sin(angle), math.cos(angle)]
    else:
        expected = pipeline.encoder.embeddings.positions.weight[pos, 2 * i:2 * i + 2].tolist()
    np.testing.assert_allclose(data["positions"][pos][2 * i:2 * i + 2], expected, atol=1e-5)


def test_every_attention_row_sums_to_one_over_real_tokens(traced):
    t, page = traced
    n = t.n_real
    for layer in t.layers:
        probs = layer.probabilities[0, :, :n]  # (H, n, T): real queries
        torch.testing.assert_close(probs[..., :n].sum(-1), torch.ones(probs.shape[:2]))
        assert (probs[..., n:] == 0).all()
    for layer in embedded_data(page)["layers"]:
        rows = np.array(layer["attention"])  # (H, n, T)
        np.testing.assert_allclose(rows[..., :n].sum(-1), 1.0, atol=1e-3)


def test_the_page_states_the_models_actual_choices(pipeline, traced):
    t, page = traced
    config = pipeline.encoder.config
    choices = dict(re.findall(r'<li data-choice="(\w+)">(.*?)</li>', page))
    assert choices["norm"].startswith("pre-norm" if config.norm_first else "post-norm")
    assert choices["position"].startswith(config.position)
    assert ("ReLU" if config.activation == "relu" else "GELU") in choices["activation"]
    assert ("a final LayerNorm" in choices["final_norm"]) == config.has_final_norm
    positions = page[page.index('id="step-positions"'):page.index('id="step-attention"')]
    assert f"<b>{config.position}</b> positions" in positions
    ffn = page[page.index('id="step-ffn"'):page.index('id="step-stack"')]
    assert ("<b>ReLU</b>" if config.activation == "relu" else "<b>GELU</b>") in ffn
    addnorm = page[page.index('id="step-addnorm1"'):page.index('id="step-ffn"')]
    assert ("<b>pre-norm</b>" if config.norm_first else "<b>post-norm</b>") in addnorm
    for sid in SECTIONS:
        assert f'<section id="{sid}">' in page
    assert f"({len(t.tokens)}, {config.d_model})" in page  # the positions' shape
    assert f"(1, {config.n_heads}, {len(t.tokens)}, {config.d_head})" in page  # Q, K, V


def test_the_page_requests_nothing_from_the_network(traced):
    _, page = traced
    assert not re.search(r"""(src|href|action)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    assert "http://" not in page and "https://" not in page
    assert "@import" not in page and "url(" not in page


def test_long_texts_are_capped_with_a_note():
    pipeline = load("minilm")
    t = trace(pipeline, "word " * 100, max_tokens=16)
    assert t.truncated and t.n_real == 16 and t.n_tokens_full == 102
    page = render_html(t)
    assert 'id="cap-note"' in page and "This text has 102 tokens" in page and "the first 16" in page
    assert 'id="cap-note"' not in render_html(trace(pipeline, TEXT))
    with pytest.raises(ValueError, match="max_tokens"):
        trace(pipeline, TEXT, max_tokens=2)
    with pytest.raises(ValueError, match="padding"):
        trace(pipeline, TEXT, padding=-1)


def test_token_text_is_escaped():
    text = 'my <b>&"x" </script><script>alert(1)</script>'
    t = trace(load("minilm"), text)
    assert "<" in t.tokens and "&" in t.tokens
    page = render_html(t)
    assert "<b>&" not in page and page.count("<script") == 2 and page.count("</script>") == 2
    assert "&lt;b&gt;&amp;&quot;x&quot;" in page  # the heading
    assert '<div class="tok">&lt;</div>' in page and '<div class="tok">&amp;</div>' in page
    data = embedded_data(page)
    assert data["text"] == text and data["tokens"] == t.tokens


@pytest.mark.slow
@pytest.mark.parametrize("model", ["minilm", "seed", "seed-trained"])
def test_the_page_in_a_real_browser(tmp_path, model):
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed at /usr/bin/chromium (scripts/setup.sh test installs it)")
    from PIL import Image
    from playwright.sync_api import sync_playwright

    text = "my name is <b>aj</b> & co"
    path = tmp_path / "explain.html"
    explain(load(model), text, path)
    url = path.resolve().as_uri()
    errors, requests = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: requests.append(r.url))
            page.goto(url)
            page.wait_for_selector('body[data-ready="1"]', timeout=15_000)

            assert page.text_content("#text") == text and page.locator("h1 b").count() == 0
            for sid in SECTIONS:
                section = page.locator(f"#{sid}")
                assert section.is_visible(), sid
                drawn = section.locator('canvas[data-drawn="1"]')
                assert drawn.count() >= 1, f"{sid} draws nothing"
                assert all(b["width"] > 0 and b["height"] > 0
                           for b in (drawn.nth(i).bounding_box() for i in range(drawn.count()))), sid

            def attention() -> tuple[str, str, str]:
                return (page.get_attribute("#c-attention", "data-checksum"),
                        page.evaluate("document.getElementById('c-attention').toDataURL()"),
                        page.get_attribute("#c-ffn", "data-checksum"))

            first = attention()
            page.select_option("#layer-select", "1")
            second = attention()
            assert page.get_attribute("#c-attention", "data-layer") == "1"
            assert all(a != b for a, b in zip(first, second))
            page.select_option("#head-select", "0")
            third = attention()
            assert page.get_attribute("#c-attention", "data-head") == "0"
            assert third[:2] != second[:2] and third[2] == second[2]  # the FFN has no heads
            page.click('#heads-grid figure[data-head="2"]')
            assert page.input_value("#head-select") == "2"

            page.locator("#step-attention").scroll_into_view_if_needed()
            shot = page.screenshot()
        finally:
            browser.close()
    assert errors == []
    assert all(r == url or r.startswith("data:") for r in requests), requests
    pixels = np.asarray(Image.open(io.BytesIO(shot)).convert("RGB")).astype(np.uint32)  # (900, 1200, 3)
    colours = np.unique(pixels[..., 0] << 16 | pixels[..., 1] << 8 | pixels[..., 2])
    assert pixels.shape[:2] == (900, 1200) and pixels.std() > 20
    assert len(colours) > 300, len(colours)  # heatmaps, not a blank page


def test_cli_explain_writes_the_page_and_the_pngs(tmp_path):
    out, pngs = tmp_path / "explain.html", tmp_path / "figures"
    result = CliRunner().invoke(main, ["explain", TEXT, "-o", str(out), "--png", str(pngs)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "minilm" in result.output and f"wrote {out}" in result.output
    data = embedded_data(out.read_text(encoding="utf-8"))
    assert data["tokens"][:6] == ["[CLS]", "my", "name", "is", "aj", "[SEP]"]
    names = {p.name for p in pngs.iterdir()}
    assert {"positions.png", "similarity.png", "layers.png"} <= names
    assert {f"attention_layer_{i}.png" for i in range(1, 7)} <= names
    assert all((pngs / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for name in names)


def test_cli_explain_has_help():
    result = CliRunner().invoke(main, ["explain", "--help"])
    assert result.exit_code == 0 and "--max-tokens" in result.output and "--png" in result.output


def test_cli_explain_errors_are_one_line(tmp_path):
    result = CliRunner().invoke(main, ["explain", TEXT, "--model", "nope", "-o", str(tmp_path / "x.html")])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "Error: unknown model 'nope'; known models: minilm, seed, seed-trained; or give a model folder."]


def test_page_data_is_json_ready(traced):
    t, _ = traced
    data = page_data(t)
    json.dumps(data, allow_nan=False)
    assert len(data["layers"]) == t.config.n_layers
    assert np.array(data["similarity"]).shape == (t.n_real, t.n_real)


# ---- step 9: pooling into the sentence vector ------------------------------------------

def test_the_sentence_vector_on_the_page_is_pipeline_embed(pipeline):
    t = trace(pipeline, TEXT, others=OTHERS)
    pooling = embedded_data(render_html(t))["pooling"]
    expected = pipeline.embed([TEXT, *OTHERS])
    np.testing.assert_allclose(pooling["vector"], pipeline.embed([TEXT])[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(pooling["vectors"], expected, atol=1e-5, rtol=0)
    unit = expected / np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(pooling["similarity"], unit @ unit.T, atol=1e-4)
    assert pooling["texts"] == [TEXT, *OTHERS] and pooling["embed_error"] <= 1e-5
    assert pooling["mode"] == pipeline.pooling.mode and pooling["normalize"] == pipeline.pooling.normalize


@pytest.mark.parametrize("mode", ["mean", "cls", "max"])
@pytest.mark.parametrize("normalize", [False, True])
def test_the_page_pools_with_the_pipelines_own_pooling(mode, normalize):
    tiny = load("tiny-prenorm")
    pipeline = Pipeline(tiny.tokenizer, tiny.encoder, Pooling(mode, normalize), name="tiny", description="tiny")
    t = trace(pipeline, TEXT, others=OTHERS[:1])
    page = render_html(t)
    pooling = embedded_data(page)["pooling"]
    np.testing.assert_allclose(pooling["vector"], pipeline.embed([TEXT])[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(pooling["vector"]), 1.0 if normalize else pooling["pooled_norm"],
                               rtol=1e-5)
    section = page[page.index('id="step-pooling"'):]
    assert f"<b>{mode if mode != 'cls' else 'CLS'} pooling</b>" in section
    assert ("<b>L2 normalisation</b>" in section) == normalize
    weights = np.array(pooling["weights"])  # how much each real token counts
    assert weights.shape == (t.n_real,) and weights.sum() == pytest.approx(1.0, abs=1e-3)
    assert mode != "cls" or weights[0] == 1.0


def test_a_trace_cut_by_max_tokens_says_its_vector_differs_from_embed():
    pipeline = load("tiny-prenorm")
    t = trace(pipeline, LONG, max_tokens=16)
    page = render_html(t)
    pooling = embedded_data(page)["pooling"]
    assert t.cut_by == "max_tokens" and pooling["embed_error"] is None
    np.testing.assert_allclose(pooling["vectors"][0], pipeline.embed([LONG])[0], atol=1e-5, rtol=0)
    assert "<code>--max-tokens</code> cut this trace at 16 tokens" in page


# ---- which limit cut the text; padding capped ---------------------------------------------

@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    """The tiny model as a model folder, for the CLI (64 positions, 64-token limit)."""
    folder = tmp_path_factory.mktemp("tiny-model")
    save_pipeline(load("tiny-prenorm"), folder)
    return folder


def run_explain(*args: str) -> str:
    result = CliRunner().invoke(main, ["explain", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_cli_says_which_limit_cut_the_text(tmp_path, tiny_folder):
    out = tmp_path / "page.html"
    said = run_explain(LONG, "--model", str(tiny_folder), "--max-tokens", "100", "-o", str(out))
    assert "cut to 64 of" in said and "by the model's limit of 64 tokens" in said
    assert "--max-tokens" not in said.splitlines()[0]
    note = re.search(r'<p class="note" id="cap-note">(.*?)</p>', out.read_text(encoding="utf-8"), re.S).group(1)
    assert "the model's own limit of 64 tokens cut it" in note and "--max-tokens 100</code> would allow more" in note

    said = run_explain(LONG, "--model", str(tiny_folder), "--max-tokens", "10", "-o", str(out))
    assert "cut to 10 of" in said and "by --max-tokens 10" in said
    note = re.search(r'<p class="note" id="cap-note">(.*?)</p>', out.read_text(encoding="utf-8"), re.S).group(1)
    assert "<code>--max-tokens 10</code> cut it" in note


def test_cli_says_when_padding_is_capped(tmp_path, tiny_folder):
    out = tmp_path / "page.html"
    said = run_explain(TEXT, "--model", str(tiny_folder), "--padding", "1000", "-o", str(out))
    page = out.read_text(encoding="utf-8")
    n = embedded_data(page)["n_real"]
    assert f"--padding 1000 capped at {64 - n} (the model has 64 positions" in said.splitlines()[0]
    assert len(embedded_data(page)["tokens"]) == 64
    assert 'id="padding-note"' in page and f"so the page shows {64 - n}" in page
    said = run_explain(TEXT, "--model", str(tiny_folder), "--padding", "3", "-o", str(out))
    assert "capped" not in said and 'id="padding-note"' not in out.read_text(encoding="utf-8")


def test_cli_explain_takes_several_texts(tmp_path, tiny_folder):
    out = tmp_path / "page.html"
    said = run_explain(TEXT, OTHERS[0], "--model", str(tiny_folder), "-o", str(out))
    data = embedded_data(out.read_text(encoding="utf-8"))
    assert data["text"] == TEXT and data["pooling"]["texts"] == [TEXT, OTHERS[0]]
    cosine = data["pooling"]["similarity"][0][1]
    assert "sentence vectors of 2 texts: mean pooling" in said
    said_cosine = float(re.search(r"cosine of the two texts (-?[\d.]+)", said).group(1))
    assert said_cosine == pytest.approx(cosine, abs=2e-4)  # both rounded to 4 decimals
    result = CliRunner().invoke(main, ["explain", "-o", str(out)])
    assert result.exit_code == 2 and "Missing argument" in result.output


# ---- size: the heavy views are thinned past a budget ---------------------------------------

def test_the_default_length_keeps_every_token_and_dimension():
    for name in ("seed", "minilm"):
        thin = plan_thinning(64, 66, load(name).encoder.config)  # --max-tokens 64, --padding 2
        assert (thin.group, thin.dim_step, thin.similarity_group) == (1, 1, 1), name
    assert not plan_thinning(9, 11, load("seed").encoder.config).any


@pytest.mark.slow
def test_a_300_token_page_stays_under_10_mb(tmp_path):
    out = tmp_path / "page.html"
    said = run_explain(LONG * 2, "--model", "seed", "--max-tokens", "300", "-o", str(out))
    size = out.stat().st_size
    assert size < 10_000_000, f"{size / 1e6:.1f} MB"
    assert "cut to 300 of" in said and "by --max-tokens 300" in said
    page = out.read_text(encoding="utf-8")
    data = embedded_data(page)
    thin = data["thinning"]
    assert thin["group"] > 1 and thin["ffn_step"] > 1 and thin["dim_step"] > 1
    note = re.search(r'<div class="note" id="thin-note">(.*?)</div>', page, re.S).group(1)
    assert "tokens pooled in runs of" in note and "hidden units" in note and "dimensions" in note
    rows = np.array(data["layers"][0]["attention"])  # (H, G, G'): runs of tokens, rows still sum to 1
    assert rows.shape[1] == data["attention_real"] == math.ceil(300 / thin["group"])
    np.testing.assert_allclose(rows.sum(-1), 1.0, atol=5e-3)
    assert len(data["layers"][0]["ffn_hidden"][0]) == len(data["ffn_units"]) < 1024


# ---- files are written atomically -----------------------------------------------------------

def test_a_failed_page_write_leaves_the_old_page(tmp_path, monkeypatch):
    out = tmp_path / "explain.html"
    out.write_text("the old page", encoding="utf-8")
    real_write_text = Path.write_text

    def full_disk(self, text, *args, **kwargs):
        if self.name.endswith((".html", ".tmp")):
            real_write_text(self, text[:100], *args, **kwargs)  # half a page, then the disk is full
            raise OSError(28, "No space left on device")
        return real_write_text(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(OSError):
        explain(load("tiny-prenorm"), TEXT, out)
    monkeypatch.undo()
    assert out.read_text(encoding="utf-8") == "the old page"
    assert [p.name for p in tmp_path.iterdir()] == ["explain.html"]  # no temporary file left


def test_a_failed_png_write_leaves_no_half_file(tmp_path, monkeypatch):
    import matplotlib.figure

    t = trace(load("tiny-prenorm"), TEXT)
    folder = tmp_path / "figures"

    def full_disk(self, target, *args, **kwargs):
        Path(target).write_bytes(b"\x89PNG\r\n\x1a\n half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full_disk)
    with pytest.raises(OSError):
        write_pngs(t, folder)
    assert list(folder.iterdir()) == []


# ---- the tolerance of the check --------------------------------------------------------------

def test_a_64_token_text_through_minilm_passes_the_check():
    # MiniLM's hidden states reach ~10, where the step-by-step and the fused routes differ by
    # ~1.3e-5 in float32: the check scales its 1e-5 by the values' size
    t = trace(load("minilm"), " ".join(f"word{i}" for i in range(400)), max_tokens=64)
    assert t.n_real == 64 and t.max_error <= 1e-5


# ---- layout in a real browser ----------------------------------------------------------------

LAYOUT = """() => {
  const box = (el) => el.getBoundingClientRect();
  const overflow = [];
  const doc = document.documentElement;
  if (doc.scrollWidth > doc.clientWidth) overflow.push(`page: ${doc.scrollWidth} > ${doc.clientWidth}`);
  document.querySelectorAll("section, section figure, section .scroll, section .pair, section table, section .tokens")
    .forEach((el) => { if (el.scrollWidth > el.clientWidth)
      overflow.push(`${el.closest("section").id} ${el.tagName}.${el.className}: ${el.scrollWidth} > ${el.clientWidth}`);
    });
  document.querySelectorAll("section canvas").forEach((c) => {
    const s = box(c.closest("section")), r = box(c);
    if (r.right > s.right || r.left < s.left) overflow.push(`${c.id} leaves its section`);
  });
  const canvases = Array.from(document.querySelectorAll("canvas")).filter((c) => c._labels)
    .map((c) => ({id: c.id, w: c.clientWidth, h: c.clientHeight, labels: c._labels}));
  return {overflow, canvases};
}"""


def label_problems(canvas: dict) -> list[str]:
    """Labels that leave their canvas, or overlap another label drawn at the same angle."""
    problems, boxes = [], []
    for lab in canvas["labels"]:
        cos, sin = math.cos(lab["angle"]), math.sin(lab["angle"])
        u0, u1, half = lab["x0"], lab["x0"] + lab["w"], lab["h"] / 2
        for du in (u0, u1):
            for dv in (-half, half):
                x, y = lab["x"] + du * cos - dv * sin, lab["y"] + du * sin + dv * cos
                if not (-0.5 <= x <= canvas["w"] + 0.5 and -0.5 <= y <= canvas["h"] + 0.5):
                    problems.append(f"{canvas['id']}: {lab['s']!r} leaves the canvas at ({x:.0f}, {y:.0f})")
                    break
        u, v = lab["x"] * cos + lab["y"] * sin, -lab["x"] * sin + lab["y"] * cos  # in its own frame
        boxes.append((round(lab["angle"], 3), u + u0, u + u1, v - half, v + half, lab["s"]))
    boxes.sort(key=lambda b: (b[0], b[3]))
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            if b[0] != a[0] or b[3] >= a[4] - 0.5:
                break
            if min(a[2], b[2]) - max(a[1], b[1]) > 0.5:
                problems.append(f"{canvas['id']}: {a[5]!r} overlaps {b[5]!r}")
    return problems


@pytest.mark.slow
@pytest.mark.parametrize("model, text, max_tokens", [("minilm", TEXT, 64), ("seed", LONG, 60)],
                         ids=["minilm-6-tokens", "seed-60-tokens"])
def test_labels_do_not_overlap_and_charts_fit_at_1400_and_1000_px(tmp_path, model, text, max_tokens):
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed at /usr/bin/chromium (scripts/setup.sh test installs it)")
    from playwright.sync_api import sync_playwright

    path = tmp_path / "explain.html"
    t = explain(load(model), [text, *OTHERS], path, max_tokens=max_tokens)
    n, T = t.n_real, len(t.tokens)
    assert n == min(max_tokens, t.n_tokens_full)
    errors, problems = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"])
        try:
            for width in (1400, 1000):
                page = browser.new_page(viewport={"width": width, "height": 900})
                page.on("pageerror", lambda e: errors.append(str(e)))
                page.goto(path.resolve().as_uri())
                page.wait_for_selector('body[data-ready="1"]', timeout=30_000)
                layout = page.evaluate(LAYOUT)
                problems += [f"{width} px: {o}" for o in layout["overflow"]]
                canvases = {c["id"]: c for c in layout["canvases"]}
                for canvas in layout["canvases"]:
                    problems += [f"{width} px: {p}" for p in label_problems(canvas)]

                def named(cid: str, role: str) -> int:
                    return sum(lab["role"] == role for lab in canvases[cid]["labels"])

                # every token keeps its name in the one-hot rows, the mask and the bar charts
                assert named("c-onehot", "row") == T and named("c-mask", "col") == T, width
                for cid in ("c-norm1", "c-norm2", "c-pool-weights"):
                    assert named(cid, "col") == n, (width, cid)
                assert named("c-norm1", "tick") >= 3, width
                for sid in SECTIONS:  # for a person to look at
                    page.locator(f"#{sid}").screenshot(path=str(tmp_path / f"{model}-{n}-{width}-{sid}.png"),
                                                       style="#controls { visibility: hidden; }")
                page.close()
        finally:
            browser.close()
    assert errors == []
    assert problems == []
