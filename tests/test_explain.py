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
from ctxvec.explain import explain, page_data, render_html, trace
from ctxvec.models import seed_tokenizer

CHROMIUM = Path("/usr/bin/chromium")
SECTIONS = ["step-tokens", "step-onehot", "step-embedding", "step-positions", "step-attention",
            "step-addnorm1", "step-ffn", "step-stack"]
TEXT = "my name is aj"


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
    np.testing.assert_allclose(shown[:n], row.numpy(), atol=2e-5)
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
        np.testing.assert_allclose(rows[..., :n].sum(-1), 1.0, atol=1e-4)
        np.testing.assert_allclose(np.array(layer["mean_attention"])[:, :n].sum(-1), 1.0, atol=1e-4)


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
@pytest.mark.parametrize("model", ["minilm", "seed"])
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
        "Error: unknown model 'nope'; known models: minilm, seed; or give a model folder."]


def test_page_data_is_json_ready(traced):
    t, _ = traced
    data = page_data(t)
    json.dumps(data, allow_nan=False)
    assert len(data["layers"]) == t.config.n_layers
    assert np.array(data["similarity"]).shape == (t.n_real, t.n_real)
