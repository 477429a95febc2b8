"""``ctxvec serve``: the embedding server."""

from __future__ import annotations

import logging
import sys
from concurrent.futures import ThreadPoolExecutor

import click

from ctxvec.cli.app import load_pipeline, main
from ctxvec.engine.runtime import PRECISIONS, set_threads

WARM_UP = ["warm up", "the kernels for a few batch shapes " * 4, "and the tokenizer"]


@main.command()
@click.option("--model", "-m", default="minilm", show_default=True,
              help="Model name (see `ctxvec models`) or model folder.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (127.0.0.1: this machine only).")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True,
              help="Port (0: a free one; the URL printed says which).")
@click.option("--precision", type=click.Choice(list(PRECISIONS)), default="fp32", show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads for PyTorch.")
@click.option("--batch-tokens", type=click.IntRange(min=1), default=None,
              help="Padded tokens per forward pass (default: 2048 for bf16 on a CPU with AMX, else 1024).")
@click.option("--streams", type=click.IntRange(min=1), default=None,
              help="Batches computed side by side under load (default: one per thread; 1: one at a time).")
@click.option("--max-queue-tokens", type=click.IntRange(min=1), default=262_144, show_default=True,
              help="Tokens that may wait for the model; past it, 429 with Retry-After.")
@click.option("--max-inputs", type=click.IntRange(min=1), default=2048, show_default=True,
              help="Texts in one request; past it, 413.")
@click.option("--max-request-bytes", type=click.IntRange(min=1), default=16 * 2**20, show_default=True,
              help="Bytes of one request body; past it, 413.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=60.0, show_default=True,
              help="Seconds a request may wait for its vectors; past it, 503.")
@click.option("--drain-timeout", type=click.FloatRange(min=0), default=30.0, show_default=True,
              help="On SIGTERM/SIGINT, seconds to let requests in flight finish.")
@click.option("--api-key", envvar="CTXVEC_API_KEY", default=None, show_envvar=True,
              help="Require 'Authorization: Bearer KEY' on every endpoint but /health.")
def serve(model: str, host: str, port: int, precision: str, threads: int | None, batch_tokens: int | None,
          streams: int | None, max_queue_tokens: int, max_inputs: int, max_request_bytes: int, timeout: float, drain_timeout: float,
          api_key: str | None) -> None:
    """Serve MODEL over HTTP: OpenAI's POST /v1/embeddings, POST /v1/encode, GET /v1/models,
    GET /health, GET /metrics. One line per request goes to stderr.

    Example: ctxvec serve --port 8080, then
    curl -s localhost:8080/v1/embeddings -H 'Content-Type: application/json' -d '{"input": "my name is aj"}'
    """
    from ctxvec.serve import ServeSettings, serve as run_server

    settings = ServeSettings(batch_tokens=batch_tokens, max_queue_tokens=max_queue_tokens, max_inputs=max_inputs,
                             max_request_bytes=max_request_bytes, timeout=timeout, api_key=api_key,
                             streams=streams)
    def prepare():
        pipeline = load_pipeline(model, precision, threads)
        pipeline.keep_repacked_weights()  # the weights never change while serving
        pipeline.embed(WARM_UP, batch_tokens=batch_tokens)  # first-call costs before the first request
        return pipeline

    # In a thread that ends with its OpenMP threads: the worker's lead stream must be the only
    # thread with a team of them (see ctxvec.serve.worker), and this one serves HTTP.
    set_threads(threads)  # the count the worker reads
    with ThreadPoolExecutor(1, thread_name_prefix="ctxvec-load") as loader:
        pipeline = loader.submit(prepare).result()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    server_log = logging.getLogger("ctxvec.serve")
    server_log.addHandler(handler)
    server_log.setLevel(logging.INFO)

    def ready(url: str) -> None:
        auth = ", API key required" if api_key else ""
        click.echo(f"ctxvec serve: {url} model {pipeline.name} ({precision}, {pipeline.dim} dimensions){auth}; "
                   "ready", err=False)
        sys.stdout.flush()

    run_server(pipeline, settings, host, port, drain_timeout, on_ready=ready)
