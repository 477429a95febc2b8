"""The commands that turn texts into vectors: encode, embed, evaluate, explain, models."""

from __future__ import annotations

import contextlib
import io
import json
import signal
import sys
from pathlib import Path

import click
import numpy as np
from tqdm import tqdm

from ctxvec.cli.app import load_pipeline, main, model_options, relaunch_under_torchrun
from ctxvec.embed_file import DEFAULT_CHUNK
from ctxvec.files import atomic_write_bytes, atomic_write_text

OUTPUT_SUFFIXES = (".npy", ".npz", ".json")


def _compact(vector: np.ndarray, n: int = 4) -> str:
    return "[" + ", ".join(f"{v:+.3f}" for v in vector[:n]) + (", ...]" if len(vector) > n else "]")


@main.command()
@click.argument("texts", nargs=-1, required=True)
@model_options
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path),
              help="Write every vector: .npy (one text), .npz (one array per text) or .json.")
@click.option("--strict", is_flag=True, help="Fail on a text over the length limit instead of truncating it.")
def encode(texts: tuple[str, ...], model: str, precision: str, threads: int | None, batch_tokens: int | None,
           output: Path | None, strict: bool) -> None:
    """Print each token of TEXTS with a compact view of its context vector.

    Example: ctxvec encode "my name is aj"
    """
    if output is not None and output.suffix not in OUTPUT_SUFFIXES:
        raise click.BadParameter(f"use one of {', '.join(OUTPUT_SUFFIXES)}", param_hint="--output")
    if output is not None and output.suffix == ".npy" and len(texts) > 1:
        raise click.BadParameter(".npy holds one text's vectors; use .npz or .json for several",
                                 param_hint="--output")
    pipeline = load_pipeline(model, precision, threads)
    results = pipeline.encode(list(texts), strict=strict, batch_tokens=batch_tokens)
    click.echo(f"model {pipeline.name}: {pipeline.description}")
    for i, result in enumerate(results):
        note = (f", TRUNCATED to {len(result.tokens)} of {result.n_tokens_full} tokens"
                if result.truncated else "")
        click.echo(f"\ntext {i}: {result.text!r} -> {len(result.tokens)} tokens "
                   f"({sum(result.special)} special){note}")
        click.echo(f"  {'#':>3}  {'token':<16} {'id':>6}  {'norm':>7}  first values")
        for j, (token, token_id, special) in enumerate(zip(result.tokens, result.ids, result.special)):
            label = f"{token} (special)" if special else token
            vec = result.vectors[j]
            click.echo(f"  {j:>3}  {label:<16} {token_id:>6}  {np.linalg.norm(vec):7.3f}  {_compact(vec)}")
        click.echo(f"  each vector: {result.vectors.shape[1]} values")
    if output is not None:
        _write_vectors(output, results, pipeline.name)
        click.echo(f"\nwrote {output}")


def _write_vectors(path: Path, results: list, model: str) -> None:
    """The vectors as .npy, .npz or .json, written atomically (complete, or not at all)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".json":
        payload = {"model": model, "texts": [
            {"text": r.text, "tokens": r.tokens, "ids": r.ids, "special": r.special,
             "truncated": r.truncated, "n_tokens_full": r.n_tokens_full,
             "vectors": r.vectors.tolist()} for r in results]}
        atomic_write_text(path, json.dumps(payload) + "\n")
        return
    buffer = io.BytesIO()  # serialised in memory: the file itself is written by one checked write
    if path.suffix == ".npy":
        np.save(buffer, results[0].vectors)
    else:
        np.savez(buffer, **{f"text_{i}": r.vectors for i, r in enumerate(results)})
    atomic_write_bytes(path, buffer.getvalue())


@main.command()
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the (n_texts, dim) float32 array (.npy).")
@model_options
@click.option("--format", "fmt", type=click.Choice(["auto", "text", "jsonl"]), default="auto",
              show_default=True, help='auto: .jsonl/.ndjson files are JSON lines with a "text" field.')
@click.option("--strict", is_flag=True, help="Fail on a text over the length limit instead of truncating it.")
@click.option("--resume", is_flag=True,
              help="Continue an interrupted run (same file, model and options) from its last finished chunk.")
@click.option("--chunk-size", type=click.IntRange(min=1), default=DEFAULT_CHUNK, show_default=True,
              help="Texts per chunk: sorted by length and embedded together; the unit of --resume.")
@click.option("--nproc", type=click.IntRange(min=1), default=1, show_default=True,
              help="Processes on this machine, each embedding a range of the file (runs torchrun for you); "
                   "for several machines, run torchrun yourself with an output folder they all see.")
def embed(file: Path, output: Path, model: str, precision: str, threads: int | None, batch_tokens: int | None,
          fmt: str, strict: bool, resume: bool, chunk_size: int, nproc: int) -> None:
    """Embed FILE, one text per line, into sentence vectors written in input order.

    FILE may be - (standard input) or a pipe. The input is streamed in chunks (memory stays
    flat for any size). Vectors go to a partial file beside OUTPUT as they are made, which is
    renamed into place only when complete. If the run is stopped (Ctrl-C, a kill, a crash, a
    full disk), run the same command on the same input with --resume: the result is identical
    to an uninterrupted run.
    """
    from ctxvec.embed_file import EmbedInterrupted, embed_file
    from ctxvec.engine.distributed import setup_distributed
    from ctxvec.texts import STDIN
    from ctxvec.tokenizer import StrictError

    if output.suffix != ".npy":
        raise click.BadParameter("the output must be a .npy file", param_hint="--output")
    relaunch_under_torchrun(nproc)
    processes = setup_distributed()
    name = "standard input" if str(file) == STDIN else str(file)
    # The weights never change during the job: repacked for oneDNN once, not for every chunk
    # (bf16 on an AMX Xeon: half the page faults, ~1% faster end to end).
    pipeline = load_pipeline(model, precision, threads).keep_repacked_weights()
    bars: list[tqdm] = []  # made when the job starts: an error before it stays one line

    def progress(done: int, total: int) -> None:
        if not processes.main:
            return
        if not bars:
            bars.append(tqdm(total=total, unit="text", desc="embedding", file=sys.stderr, dynamic_ncols=True))
        bars[0].update(done - bars[0].n)

    try:
        with _signals_as_interrupt():
            try:
                result = embed_file(pipeline, file, output, fmt=fmt, batch_tokens=batch_tokens,  # type: ignore[arg-type]
                                    strict=strict, resume=resume, chunk_size=chunk_size, on_progress=progress,
                                    processes=processes)
            finally:
                for bar in bars:
                    bar.close()
    except EmbedInterrupted as err:
        click.echo(f"Error: {err}", err=True)
        raise SystemExit(130) from None
    except StrictError as err:
        raise click.ClickException(f"{name}, line {err.index + 1}: {err.problem} (--strict).") from None
    if not processes.main:
        return
    done = result.n_texts
    resumed = f", resumed after {result.resumed_from}" if result.resumed_from else ""
    click.echo(f"embedded {done} texts with {pipeline.name} ({precision}) -> {output} "
               f"({done} x {pipeline.dim}, float32{resumed})")
    if done == 0:
        click.echo(f"warning: {name} holds 0 texts; {output} holds an empty 0 x {pipeline.dim} array.", err=True)
    _report_lines(result.truncated_lines, f"were truncated to {pipeline.max_len} tokens")
    _report_lines(result.blank_lines, "had no tokens (empty, or only whitespace or control characters) and "
                                      "got the vector of an empty text; --strict refuses them")


def _report_lines(lines: list[int], what: str) -> None:
    if lines:
        listed = ", ".join(str(n) for n in lines[:10]) + (" ..." if len(lines) > 10 else "")
        click.echo(f"warning: {len(lines)} text(s) {what}: line(s) {listed}", err=True)


@contextlib.contextmanager
def _signals_as_interrupt():
    """SIGINT (Ctrl-C) and SIGTERM (a job scheduler stopping us) end the work cleanly, resumable.

    Both handlers are set explicitly: a job started in the background by a shell inherits an
    ignored SIGINT, and `kill -INT` must still stop it.
    """
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@main.command()
@click.argument("pairs", type=click.Path(dir_okay=False, path_type=Path))
@model_options
@click.option("--json", "as_json", is_flag=True, help="Print the figures as one JSON object.")
def evaluate(pairs: Path, model: str, precision: str, threads: int | None, batch_tokens: int | None, as_json: bool) -> None:
    """How well the cosine of sentence vectors follows human similarity scores.

    PAIRS is a CSV or TSV file of `sentence1, sentence2, score` rows (header optional), such as
    the STS benchmark. Prints Spearman's and Pearson's correlation (x100) between the cosine of
    each pair's two sentence vectors and its score, as sentence-transformers and MTEB report them.

    Example: ctxvec evaluate ../shared/data/stsb_en_dev.csv --model minilm
    """
    from ctxvec.evaluation import evaluate_pairs
    from ctxvec.pairs import read_scored_pairs

    scored = read_scored_pairs(pairs)  # a bad file is said before the model loads
    pipeline = load_pipeline(model, precision, threads)
    result = evaluate_pairs(pipeline, scored, batch_tokens)
    if as_json:
        click.echo(json.dumps({"pairs_file": str(pairs), "model": pipeline.name, "precision": precision,
                               **result.to_dict()}))
        return
    click.echo(f"{pairs}: {result.n_pairs} pairs, model {pipeline.name} ({precision})\n"
               f"  Spearman {result.spearman:.2f}  Pearson {result.pearson:.2f}  (cosine vs gold score, x100)\n"
               f"  {result.n_truncated} of {result.n_texts} texts truncated to the model's "
               f"{pipeline.max_len}-token limit")


@main.command()
def models() -> None:
    """List the models that --model accepts by name."""
    from ctxvec.loading import KNOWN_MODELS

    for name, description in KNOWN_MODELS.items():
        click.echo(f"{name}: {description}")


@main.command()
@click.argument("texts", nargs=-1, required=True)
@click.option("--model", "-m", default="minilm", show_default=True,
              help="Model name (see `ctxvec models`) or model folder.")
@click.option("--output", "-o", default=Path("explain.html"), show_default=True,
              type=click.Path(dir_okay=False, path_type=Path), help="The HTML page to write.")
@click.option("--png", "png_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also write the figures as PNG files into this folder.")
@click.option("--max-tokens", type=click.IntRange(min=3), default=64, show_default=True,
              help="Trace at most this many tokens (special tokens included); the page notes a cut.")
@click.option("--padding", type=click.IntRange(min=0), default=2, show_default=True,
              help="[PAD] tokens appended to show padding and the attention mask (at most what "
                   "the model's positions leave room for).")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads for PyTorch (default: PyTorch's choice).")
def explain(texts: tuple[str, ...], model: str, output: Path, png_dir: Path | None, max_tokens: int,
            padding: int, threads: int | None) -> None:
    """Write a page that shows every step of the encoder for the first of TEXTS, with the model's
    real tensors, up to its sentence vector; every text gets its sentence vector, and two or more
    their cosine similarities.

    Example: ctxvec explain "my name is aj" "what is your name" -o explain.html
    """
    from ctxvec.explain import explain as explain_page, write_pngs

    pipeline = load_pipeline(model, "fp32", threads)
    result = explain_page(pipeline, texts, output, max_tokens=max_tokens, padding=padding)
    pngs = write_pngs(result, png_dir) if png_dir is not None else []
    notes = []
    if result.truncated:  # say which limit cut the text: the user's or the model's own
        limit = (f"--max-tokens {max_tokens}" if result.cut_by == "max_tokens"
                 else f"the model's limit of {result.model_max_len} tokens")
        notes.append(f"cut to {result.n_real} of {result.n_tokens_full} tokens by {limit}")
    padded = len(result.tokens) - result.n_real
    if padded < padding:
        notes.append(f"--padding {padding} capped at {padded} (the model has {result.config.max_len} "
                     f"positions, the text takes {result.n_real})")
    click.echo(f"wrote {output}: {result.n_real} tokens through {pipeline.name} ({len(result.layers)} "
               f"layers, trace within {result.max_error:.1e} of the model)" + "".join(f"; {n}" for n in notes))
    pooled = result.pooling
    how = f"{pooled.mode} pooling" + (" + L2 normalisation" if pooled.normalize else "")
    if len(texts) == 2:
        a, b = pooled.vectors
        how += f"; cosine of the two texts {float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))):.4f}"
    elif len(texts) > 2:
        how += "; their cosine similarities are on the page"
    click.echo(f"sentence vector{'s' if len(texts) > 1 else ''} of {len(texts)} "
               f"text{'s' if len(texts) > 1 else ''}: {how}")
    if pngs:
        click.echo(f"wrote {len(pngs)} PNG figures to {png_dir}")
