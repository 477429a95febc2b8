"""The ``ctxvec`` command line (click). Prints for people; the library itself only logs."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import sys
from pathlib import Path

import click
import numpy as np
from tqdm import tqdm

from ctxvec.checkpoint import OutputError, atomic_write_bytes, atomic_write_text
from ctxvec.embedfile import DEFAULT_CHUNK
from ctxvec.pipeline import DEFAULT_BATCH_TOKENS
from ctxvec.runtime import PRECISIONS, set_threads

OUTPUT_SUFFIXES = (".npy", ".npz", ".json")
# click 8.2+ raises it for a bare `ctxvec`, to print the help (not an error to flatten)
NoArgsIsHelpError = getattr(click.exceptions, "NoArgsIsHelpError", ())


class UsageError(click.ClickException):
    """A usage error shown as one line (click's own takes three), with where to find help."""

    exit_code = 2


def _one_line(message: str) -> str:
    return " ".join(message.split())


@contextlib.contextmanager
def _errors_as_one_line():
    """Every error a user can cause ends as one line on stderr and a non-zero exit.

    Usage errors (exit 2) name the command's --help. The library's errors are ``ValueError``
    (bad input, bad files, bad options: the message is a sentence that names the problem) and
    ``OSError`` (the file system). Running out of memory is said so, with what to lower.
    Anything else is a bug and keeps its traceback.
    """
    try:
        yield
    except NoArgsIsHelpError:
        raise  # bare `ctxvec`: click prints the help
    except click.UsageError as err:
        where = err.ctx.command_path if err.ctx is not None else "ctxvec"
        raise UsageError(_one_line(f"{err.format_message()} (see `{where} --help`)")) from None
    except click.ClickException:
        raise
    except (ValueError, OSError) as err:
        if isinstance(err, OSError) and not isinstance(err, OutputError) and err.filename:
            raise click.ClickException(_one_line(f"{err.filename}: {(err.strerror or str(err)).lower()}.")) from None
        raise click.ClickException(_one_line(str(err))) from None
    except (MemoryError, RuntimeError) as err:
        if isinstance(err, RuntimeError) and "alloc" not in str(err).lower():
            raise
        detail = _one_line(str(err))[-160:]
        raise click.ClickException(f"out of memory ({detail or 'MemoryError'}); a smaller job, or a "
                                   "smaller --batch-tokens where the command has one, needs less.") from None


class Commands(click.Group):
    """The ``ctxvec`` group: one-line errors for every command (see ``_errors_as_one_line``)."""

    def make_context(self, *args, **kwargs):
        with _errors_as_one_line():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx):
        with _errors_as_one_line():
            return super().invoke(ctx)


@click.group(cls=Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ctxvec")
def main() -> None:
    """ctxvec: raw words -> context vectors, with a Transformer encoder built step by step.

    Errors are one line on stderr with a non-zero exit code (2 for a wrong command line).
    """


def model_options(command):
    """--model, --precision, --threads and --batch-tokens, shared by the commands that encode."""
    options = [
        click.option("--model", "-m", default="minilm", show_default=True,
                     help="Model name (see `ctxvec models`) or model folder."),
        click.option("--precision", type=click.Choice(list(PRECISIONS)), default="fp32", show_default=True,
                     help="fp32 gives the reference libraries' numbers; bf16 is faster on CPUs with "
                          "AVX512-BF16/AMX and on GPUs."),
        click.option("--threads", type=click.IntRange(min=1), default=None,
                     help="CPU threads for PyTorch (default: PyTorch's choice)."),
        click.option("--batch-tokens", type=click.IntRange(min=1), default=DEFAULT_BATCH_TOKENS,
                     show_default=True, help="Padded tokens per forward pass (a memory cap; the vectors move by "
                                                "at most 1e-6 in fp32 with it, see the README)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _load(model: str, precision: str, threads: int | None):
    from ctxvec.models import KNOWN_MODELS, load

    set_threads(threads)
    if model in KNOWN_MODELS and Path(model).is_dir():
        click.echo(f"note: loading the built-in model {model!r}; for the folder of that name, "
                   f"give --model ./{model}", err=True)
    return load(model, precision=precision)


def _compact(vector: np.ndarray, n: int = 4) -> str:
    return "[" + ", ".join(f"{v:+.3f}" for v in vector[:n]) + (", ...]" if len(vector) > n else "]")


@main.command()
@click.argument("texts", nargs=-1, required=True)
@model_options
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path),
              help="Write every vector: .npy (one text), .npz (one array per text) or .json.")
@click.option("--strict", is_flag=True, help="Fail on a text over the length limit instead of truncating it.")
def encode(texts: tuple[str, ...], model: str, precision: str, threads: int | None, batch_tokens: int,
           output: Path | None, strict: bool) -> None:
    """Print each token of TEXTS with a compact view of its context vector.

    Example: ctxvec encode "my name is aj"
    """
    if output is not None and output.suffix not in OUTPUT_SUFFIXES:
        raise click.BadParameter(f"use one of {', '.join(OUTPUT_SUFFIXES)}", param_hint="--output")
    if output is not None and output.suffix == ".npy" and len(texts) > 1:
        raise click.BadParameter(".npy holds one text's vectors; use .npz or .json for several",
                                 param_hint="--output")
    pipeline = _load(model, precision, threads)
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
def embed(file: Path, output: Path, model: str, precision: str, threads: int | None, batch_tokens: int,
          fmt: str, strict: bool, resume: bool, chunk_size: int) -> None:
    """Embed FILE, one text per line, into sentence vectors written in input order.

    FILE may be - (standard input) or a pipe. The input is streamed in chunks (memory stays
    flat for any size). Vectors go to a partial file beside OUTPUT as they are made, which is
    renamed into place only when complete. If the run is stopped (Ctrl-C, a kill, a crash, a
    full disk), run the same command on the same input with --resume: the result is identical
    to an uninterrupted run.
    """
    from ctxvec.embedfile import EmbedInterrupted, embed_file
    from ctxvec.textfile import STDIN
    from ctxvec.tokenizer import StrictError

    if output.suffix != ".npy":
        raise click.BadParameter("the output must be a .npy file", param_hint="--output")
    name = "standard input" if str(file) == STDIN else str(file)
    pipeline = _load(model, precision, threads)
    bars: list[tqdm] = []  # made when the job starts: an error before it stays one line

    def progress(done: int, total: int) -> None:
        if not bars:
            bars.append(tqdm(total=total, unit="text", desc="embedding", file=sys.stderr, dynamic_ncols=True))
        bars[0].update(done - bars[0].n)

    try:
        with _signals_as_interrupt():
            try:
                result = embed_file(pipeline, file, output, fmt=fmt, batch_tokens=batch_tokens,  # type: ignore[arg-type]
                                    strict=strict, resume=resume, chunk_size=chunk_size, on_progress=progress)
            finally:
                for bar in bars:
                    bar.close()
    except EmbedInterrupted as err:
        click.echo(f"Error: {err}", err=True)
        raise SystemExit(130) from None
    except StrictError as err:
        raise click.ClickException(f"{name}, line {err.index + 1}: {err.problem} (--strict).") from None
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
def models() -> None:
    """List the models that --model accepts by name."""
    from ctxvec.models import KNOWN_MODELS

    for name, description in KNOWN_MODELS.items():
        click.echo(f"{name}: {description}")


@main.command("train-tokenizer")
@click.argument("corpus", nargs=-1, required=True,
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--output", "-o", required=True, type=click.Path(path_type=Path),
              help="Folder (or .json file) to write tokenizer.json to.")
@click.option("--vocab-size", default=8000, show_default=True, type=click.IntRange(min=16))
@click.option("--min-frequency", default=2, show_default=True, type=click.IntRange(min=1))
@click.option("--cased", is_flag=True, help="Keep upper case (default: lower-case, like uncased BERT).")
def train_tokenizer(corpus: tuple[Path, ...], output: Path, vocab_size: int, min_frequency: int,
                    cased: bool) -> None:
    """Train a WordPiece tokenizer on CORPUS text files (one or more)."""
    from ctxvec.tokenizer import Tokenizer

    tokenizer = Tokenizer.train(list(corpus), vocab_size=vocab_size, min_frequency=min_frequency,
                                lowercase=not cased)
    if output.suffix != ".json":
        output.mkdir(parents=True, exist_ok=True)
    tokenizer.save(output)  # the same corpus and options give the same file, byte for byte
    click.echo(f"trained a WordPiece vocabulary of {tokenizer.vocab_size} tokens -> {output}")


def training_options(command):
    """Options every training command shares; unset ones take the task's config defaults."""
    options = [
        click.option("--out", "run", required=True, type=click.Path(file_okay=False, path_type=Path),
                     help="Run folder: checkpoints, metrics.jsonl, and the trained model."),
        click.option("--tokenizer", type=click.Path(exists=True, path_type=Path),
                     help="A tokenizer.json to use (default: train one on the training split)."),
        click.option("--steps", type=click.IntRange(min=1), help="Optimizer steps."),
        click.option("--batch-tokens", type=click.IntRange(min=1), help="Tokens per optimizer step, over all processes."),
        click.option("--seq-len", type=click.IntRange(min=8), help="Longest sequence, in tokens."),
        click.option("--grad-accum", type=click.IntRange(min=1), help="Micro-batches per step and process."),
        click.option("--lr", type=click.FloatRange(min=0, min_open=True), help="Peak learning rate (AdamW)."),
        click.option("--warmup", type=click.IntRange(min=0), help="Linear warm-up steps, then linear decay."),
        click.option("--precision", type=click.Choice(list(PRECISIONS)), help="fp32 (default) or bf16 autocast."),
        click.option("--eval-every", type=click.IntRange(min=1), help="Steps between held-out evaluations."),
        click.option("--save-every", type=click.IntRange(min=1), help="Steps between checkpoints."),
        click.option("--seed", type=int, help="Seed of the data order, masks, initial weights, dropout."),
        click.option("--vocab-size", type=click.IntRange(min=16),
                     help="Vocabulary of the tokenizer trained here when there is none (WordPiece for masked-LM, "
                          "default 8000; a joint BPE for translation, default 10000)."),
        click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads per process."),
        click.option("--resume", is_flag=True, help="Continue the run in --out from its latest checkpoint."),
        click.option("--nproc", type=click.IntRange(min=1), default=1, show_default=True,
                     help="Processes on this machine (runs torchrun for you); for several machines, run "
                          "torchrun yourself (see the README)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


TRAINING_FIELDS = ("steps", "batch_tokens", "seq_len", "grad_accum", "lr", "warmup", "precision", "eval_every",
                   "save_every", "seed")


def _relaunch_under_torchrun(nproc: int) -> None:
    """``--nproc N``: run this same command line in N processes with torchrun (standalone)."""
    if nproc <= 1 or "WORLD_SIZE" in os.environ:
        return
    import subprocess

    args = sys.argv[1:]  # this command line, less --nproc, for each process
    if "--nproc" in args:
        del args[args.index("--nproc"):args.index("--nproc") + 2]
    args = [a for a in args if not a.startswith("--nproc=")]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "ctxvec", *args]
    raise SystemExit(subprocess.call(command))


def _run_training(make_trainer, run: Path, threads: int | None) -> None:
    """Build the trainer and train, with the run folder locked against a second job (process 0
    holds the lock; the others follow it)."""
    from ctxvec.train import lock_run

    set_threads(threads)
    main_process = int(os.environ.get("RANK", "0")) == 0
    if main_process:
        run.mkdir(parents=True, exist_ok=True)
    with lock_run(run) if main_process else contextlib.nullcontext():
        trainer = make_trainer()
        if trainer.d.main:
            for note in trainer.notes:
                click.echo(note, err=True)
        start = trainer.step
        result = trainer.run()
    if not trainer.d.main:
        return
    if trainer.step == start:
        click.echo(f"the run in {trainer.run_dir}/ is already at step {trainer.step} (--steps "
                   f"{trainer.cfg.steps}); nothing was done. Raise --steps to train further.")
        return
    summary = ", ".join(f"{k.replace('eval_', 'held-out ')} {v:.4g}" for k, v in result.items() if k != "step")
    click.echo(f"trained to step {trainer.step}: {summary}; model in {trainer.run_dir}/")


@main.command()
@click.argument("corpus", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--config", "preset", default="small", show_default=True,
              help="small (4 x 256), seed (12 x 512), or an EncoderConfig JSON file.")
@training_options
def train(corpus, preset, run, tokenizer, threads, resume, nproc, **options) -> None:
    """Masked-LM pretraining of an encoder on CORPUS text files."""
    _relaunch_under_torchrun(nproc)
    from ctxvec.train import Trainer, TrainConfig

    def make():
        cfg = TrainConfig(**{k: v for k, v in options.items() if v is not None})
        return Trainer(list(corpus), run, cfg, preset=preset, tokenizer=str(tokenizer) if tokenizer else None,
                       resume=resume)

    _run_training(make, run, threads)


@main.command("train-translation")
@click.argument("pairs", type=click.Path(path_type=Path))
@click.option("--config", "preset", default="small", show_default=True,
              help="small (3 + 3 layers x 256, pre-norm), seed (12 + 12 x 512), or an EncoderConfig JSON file.")
@training_options
@click.option("--source-column", help="Header name of the source column (default: the second-to-last).")
@click.option("--target-column", help="Header name of the target column (default: the last).")
@click.option("--valid-groups", help="Comma-separated groups held out for validation: Bible books of a "
                                     "\"ref\" column, or ranges of lines (\"lines 2-101\").")
@click.option("--test-groups", help="Comma-separated groups held out for the test (never trained or tuned on).")
@click.option("--label-smoothing", type=click.FloatRange(0, 1, max_open=True), help="Default 0.1.")
@click.option("--eval-sentences", type=click.IntRange(min=0), help="Held-out sentences translated for BLEU/chrF.")
def train_translation(pairs, preset, run, tokenizer, threads, resume, nproc, valid_groups, test_groups,
                      **options) -> None:
    """Train a Transformer translator on PAIRS, a TSV file with a header (source and target columns).

    Held out: about 3% each for validation and test, in whole groups (the books of a
    Bible-style "ref" column, else blocks of consecutive lines); on
    ../shared/data/bible_es_en.tsv the defaults are fixed books (see `ctxvec.translation`).
    Rows with an empty cell are skipped; the run says what it trains on and holds out.
    """
    _relaunch_under_torchrun(nproc)
    from ctxvec.translation import TranslationConfig, TranslationTrainer

    def groups(text: str | None) -> list[str] | None:
        return [g.strip() for g in text.split(",") if g.strip()] if text else None

    def make():
        cfg = TranslationConfig(**{k: v for k, v in options.items() if v is not None},
                                valid_groups=groups(valid_groups), test_groups=groups(test_groups))
        return TranslationTrainer(pairs, run, cfg, preset=preset, tokenizer=str(tokenizer) if tokenizer else None,
                                  resume=resume)

    _run_training(make, run, threads)


@main.command()
@click.argument("texts", nargs=-1)
@click.option("--model", "-m", required=True, type=click.Path(path_type=Path),
              help="A folder written by `ctxvec train-translation`.")
@click.option("--file", "-f", "file", type=click.Path(path_type=Path), help="Translate every line of this file.")
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path),
              help="With --file: write the translations here, one per line (default: print them).")
@click.option("--beam", type=click.IntRange(min=1), default=4, show_default=True, help="Beam size (1: greedy).")
@click.option("--alpha", type=click.FloatRange(min=0), default=0.6, show_default=True,
              help="Length penalty exponent ((5 + n) / 6) ** alpha.")
@click.option("--threads", type=click.IntRange(min=1), default=None)
def translate(texts, model, file, output, beam, alpha, threads) -> None:
    """Translate TEXTS (or the lines of --file) with a trained translator.

    Example: ctxvec translate "En el principio creó Dios los cielos y la tierra." --model run/
    """
    from ctxvec.textfile import check_readable, iter_texts
    from ctxvec.translation import load_translator

    if bool(texts) == bool(file):
        raise click.UsageError("give TEXTS or --file (one of them).")
    set_threads(threads)
    translator = load_translator(model)
    if file is not None:
        check_readable(file)
        texts = list(iter_texts(file, "text"))
    results = translator.translate(list(texts), beam_size=beam, alpha=alpha)
    if output is not None:
        atomic_write_text(output, "".join(r + "\n" for r in results))
        click.echo(f"translated {len(results)} lines -> {output}")
        return
    for text, result in zip(texts, results):
        click.echo(result if file is not None else f"{text}\n  -> {result}")


@main.command()
@click.argument("run", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path),
              help="PNG file (default: RUN/loss.png).")
def plot(run: Path, output: Path | None) -> None:
    """Draw a run's training and held-out loss curves to a PNG."""
    from ctxvec.plotting import plot_run

    path = plot_run(run, output)
    click.echo(f"wrote {path}")


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

    pipeline = _load(model, "fp32", threads)
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
