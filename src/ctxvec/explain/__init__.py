"""Explain: every step of the encoder for your own sentence, as one self-contained page.

``trace`` records what the model computes (``explain.trace``), ``page_data`` turns it into the
page's numbers (``explain.data``), ``render`` writes the HTML around them (``explain.page``, with
its CSS and JavaScript in ``explain/assets``), ``write_pngs`` draws the main figures as PNG
files (``explain.pngs``). Every file is written atomically: a failed write leaves no half file.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ctxvec.explain.data import page_data
from ctxvec.explain.page import render
from ctxvec.explain.pngs import write_pngs
from ctxvec.explain.trace import DEFAULT_MAX_TOKENS, DEFAULT_PADDING, Trace, trace
from ctxvec.files import atomic_write
from ctxvec.pipeline import Pipeline

__all__ = ["Trace", "explain", "page_data", "render_html", "trace", "write_pngs"]


def render_html(t: Trace) -> str:
    """The page: one self-contained HTML string (inline CSS and JS, data as embedded JSON)."""
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
