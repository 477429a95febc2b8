"""Explain, as PNG files: the main figures drawn with matplotlib (``ctxvec explain --png``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from ctxvec.explain.data import layer_changes, token_similarity
from ctxvec.explain.trace import Trace
from ctxvec.files import atomic_write


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
