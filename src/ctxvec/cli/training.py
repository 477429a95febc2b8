"""The commands that train and translate: train-tokenizer, train, finetune, train-translation, translate, plot."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import click

from ctxvec.cli.app import main, relaunch_under_torchrun
from ctxvec.engine.runtime import PRECISIONS, set_threads
from ctxvec.files import atomic_write_text


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
    relaunch_under_torchrun(nproc)
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
    ../shared/data/bible_es_en.tsv the defaults are fixed books (see `ctxvec.translate.data`).
    Rows with an empty cell are skipped; the run says what it trains on and holds out.
    """
    relaunch_under_torchrun(nproc)
    from ctxvec.translate.trainer import TranslationConfig, TranslationTrainer

    def groups(text: str | None) -> list[str] | None:
        return [g.strip() for g in text.split(",") if g.strip()] if text else None

    def make():
        cfg = TranslationConfig(**{k: v for k, v in options.items() if v is not None},
                                valid_groups=groups(valid_groups), test_groups=groups(test_groups))
        return TranslationTrainer(pairs, run, cfg, preset=preset, tokenizer=str(tokenizer) if tokenizer else None,
                                  resume=resume)

    _run_training(make, run, threads)


@main.command()
@click.argument("data", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--model", "-m", default="minilm", show_default=True,
              help="The model to start from: a name (see `ctxvec models`) or a model folder.")
@click.option("--out", "run", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Run folder: checkpoints, metrics.jsonl, and the fine-tuned model.")
@click.option("--loss", type=click.Choice(["cosent", "cosine", "mnrl"]), default="cosent", show_default=True,
              help="cosent or cosine: DATA holds scored pairs; mnrl: (anchor, positive[, negative]) rows.")
@click.option("--dev", type=click.Path(dir_okay=False, path_type=Path),
              help="Scored pairs to evaluate on (Spearman); the run then keeps the best checkpoint as its model.")
@click.option("--epochs", type=click.IntRange(min=1), help="Passes over DATA (default 1).")
@click.option("--steps", type=click.IntRange(min=1), help="Optimizer steps (default: --epochs worth).")
@click.option("--batch-size", type=click.IntRange(min=1), help="Rows per step, over all processes (default 16).")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), help="Peak learning rate (AdamW; default 2e-5).")
@click.option("--warmup", type=click.IntRange(min=0), help="Linear warm-up steps, then linear decay (default 0).")
@click.option("--weight-decay", type=click.FloatRange(min=0), help="AdamW weight decay (default 0).")
@click.option("--precision", type=click.Choice(list(PRECISIONS)), help="fp32 (default) or bf16 autocast.")
@click.option("--eval-every", type=click.IntRange(min=1), help="Steps between dev evaluations (default 100).")
@click.option("--save-every", type=click.IntRange(min=1), help="Steps between checkpoints (default 100).")
@click.option("--seed", type=int, help="Seed of the data order and dropout (default 0).")
@click.option("--dropout", type=click.FloatRange(0, 1, max_open=True), help="The encoder's dropout while training "
                                                                         "(default 0.1).")
@click.option("--scale", type=click.FloatRange(min=0, min_open=True), help="Cosines x scale in cosent and mnrl "
                                                                           "(default 20).")
@click.option("--symmetric", is_flag=True, default=None, help="mnrl: also each positive over the anchors.")
@click.option("--max-score", type=click.FloatRange(min=0, min_open=True),
              help="cosine: the score meaning identical; scores are divided by it (default 5, as STS).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads per process.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its latest checkpoint.")
@click.option("--nproc", type=click.IntRange(min=1), default=1, show_default=True,
              help="Processes on this machine (runs torchrun for you); for several machines, run torchrun yourself.")
def finetune(data, model, run, dev, threads, resume, nproc, **options) -> None:
    """Fine-tune a model's sentence vectors on DATA (CSV or TSV, header optional).

    Scored pairs `sentence1, sentence2, score` train with --loss cosent (default) or cosine;
    `anchor, positive[, negative]` rows with --loss mnrl (in-batch negatives). The whole
    encoder is trained; the run folder is a model (`--model RUN` everywhere).

    Example: ctxvec finetune stsb_en_train.csv --dev stsb_en_dev.csv --out run/ --epochs 4 --warmup 144
    """
    relaunch_under_torchrun(nproc)
    from ctxvec.train.finetune import FinetuneConfig, FinetuneTrainer

    def make():
        cfg = FinetuneConfig(**{k: v for k, v in options.items() if v is not None})
        return FinetuneTrainer(data, run, cfg, model=model, dev=dev, resume=resume)

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
    from ctxvec.texts import check_readable, iter_texts
    from ctxvec.translate import load_translator

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
    from ctxvec.train.plot import plot_run

    path = plot_run(run, output)
    click.echo(f"wrote {path}")
