"""The ``ctxvec`` command group: one-line errors for every command, and the options they share.

The commands live in ``cli.vectors`` (encode, embed, evaluate, explain, models) and ``cli.training``
(train-tokenizer, train, finetune, train-translation, translate, plot)."""

from __future__ import annotations

import contextlib
import gc
import os
import sys
from pathlib import Path

import click

from ctxvec.engine.distributed import PEER_STOPPED_EXIT, PeerStopped
from ctxvec.engine.runtime import PRECISIONS, set_threads
from ctxvec.files import OutputError
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
    except PeerStopped as err:
        stopped = click.ClickException(str(err))
        stopped.exit_code = PEER_STOPPED_EXIT  # not the cause: the launcher names the process that was
        raise stopped from None
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
        click.option("--batch-tokens", type=click.IntRange(min=1), default=None,
                     help="Padded tokens per forward pass (a memory cap; default: 2048 for bf16 on a CPU with "
                          "AMX, else 1024; the vectors move by at most 1e-6 in fp32 with it, see the README)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def load_pipeline(model: str, precision: str, threads: int | None):
    from ctxvec.loading import KNOWN_MODELS, load

    set_threads(threads)
    if model in KNOWN_MODELS and Path(model).is_dir():
        click.echo(f"note: loading the built-in model {model!r}; for the folder of that name, "
                   f"give --model ./{model}", err=True)
    pipeline = load(model, precision=precision)
    # A command keeps PyTorch's modules and the model until it exits: frozen out of the
    # collector's reach, a full collection walks only the objects made since (~1 ms where it
    # walked ~200,000 in ~100 ms, a pause that every batch and request in flight waits through).
    gc.freeze()
    return pipeline


def first_cause(failures: dict) -> int:
    """The rank of the process to blame among the launcher's ``failures`` (rank -> failure, each
    with its ``exitcode`` and ``timestamp``): the first to stop for a reason of its own. The others
    stop because it did (``PEER_STOPPED_EXIT``), and may be seen to end before it."""
    causes = {rank: f for rank, f in failures.items() if f.exitcode != PEER_STOPPED_EXIT} or failures
    return min(causes, key=lambda rank: causes[rank].timestamp)


def relaunch_under_torchrun(nproc: int) -> None:
    """``--nproc N``: run this same command line in N processes on this machine, as ``torchrun
    --standalone`` would (PyTorch's elastic launcher), then exit with their outcome.

    Each process prints its own one-line error; a failure adds one line naming the process that
    stopped first for a reason of its own (``first_cause``), in place of the launcher's report
    and traceback.
    """
    if nproc <= 1 or "WORLD_SIZE" in os.environ:
        return
    import logging
    import uuid

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    args = sys.argv[1:]  # this command line, less --nproc, for each process
    if "--nproc" in args:
        del args[args.index("--nproc"):args.index("--nproc") + 2]
    args = [a for a in args if not a.startswith("--nproc=")]
    # the cores shared out between the processes (--threads still decides within each)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    logging.getLogger("torch.distributed").setLevel(logging.CRITICAL)  # the launcher's chatter
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
                          monitor_interval=0.1)
    try:
        elastic_launch(config, sys.executable)("-m", "ctxvec", *args)
    except ChildFailedError as err:
        rank = first_cause(err.failures)
        failure = err.failures[rank]
        click.echo(f"Error: process {rank} of {nproc} stopped (exit code {failure.exitcode}); "
                   "its message is above.", err=True)
        raise SystemExit(failure.exitcode if 0 < failure.exitcode < 256 else 1) from None
    except SignalException as err:
        raise SystemExit(128 + err.sigval) from None
    raise SystemExit(0)
