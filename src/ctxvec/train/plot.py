"""Loss curves of a training run (``metrics.jsonl``) as a PNG."""

from __future__ import annotations

import json
from pathlib import Path

from ctxvec.files import atomic_write


def read_metrics(run: Path, key: str | None = None) -> tuple[dict[int, float], dict[int, float]]:
    """(train loss by step, held-out loss by step); a step logged twice keeps its last value.

    With ``key``, the second dict is that held-out metric (for example "eval_bleu") instead.
    """
    path = run / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{run} has no metrics.jsonl: is it a training run folder?")
    train, held = {}, {}
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break  # the last line, torn by a crash in the middle of its append: skipped
            raise ValueError(f"{path}, line {number}: not JSON.") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}, line {number}: a JSON object is expected.")
        if not isinstance(record.get("step"), int):
            continue  # the run's opening record (its settings and data) has no step
        if "loss" in record:
            train[record["step"]] = record["loss"]
        if (key or "eval_loss") in record:
            held[record["step"]] = record[key or "eval_loss"]
    return train, held


def plot_run(run: Path, output: Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, held = read_metrics(run)
    if not train and not held:
        raise ValueError(f"{run / 'metrics.jsonl'} holds no losses yet.")
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    if train:
        ax.plot(list(train), list(train.values()), lw=1, alpha=0.8, label="training loss")
    if held:
        ax.plot(list(held), list(held.values()), "o-", label="held-out loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy per predicted token (nats)")
    ax.set_title(f"ctxvec training: {run.name or run}")
    ax.grid(alpha=0.3)
    handles = ax.get_legend_handles_labels()
    _, bleu = read_metrics(run, "eval_bleu")
    if bleu:  # a translation run: its held-out BLEU on a second axis
        twin = ax.twinx()
        twin.plot(list(bleu), list(bleu.values()), "s--", color="tab:green", label="held-out BLEU")
        twin.set_ylabel("BLEU (sacrebleu)")
        more = twin.get_legend_handles_labels()
        handles = (handles[0] + more[0], handles[1] + more[1])
    ax.legend(*handles, loc="center right")
    output = output or run / "loss.png"
    fig.tight_layout()
    try:
        atomic_write(output, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)
    return output
