"""The server's metrics, in Prometheus' text format (``GET /metrics``), on a registry of its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

from ctxvec.pipeline import BatchShape
from ctxvec.serve.worker import WorkerEvents

disable_created_metrics()  # no "_created" series beside each counter

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
PADDING_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)


class Metrics:
    """Requests by endpoint and status, their latency, the queue, the batches, the throughput."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("ctxvec_requests", "HTTP requests, by endpoint and status.",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("ctxvec_request_seconds", "Time to answer a request, by endpoint.",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("ctxvec_requests_in_flight", "Requests received and not yet answered.", registry=r)
        self.queue_texts = Gauge("ctxvec_queue_texts", "Texts not computed yet (queued, or in the worker's pool).", registry=r)
        self.queue_tokens = Gauge("ctxvec_queue_tokens", "Tokens not computed yet (the queue's bound: --max-queue-tokens).", registry=r)
        self.batch_texts = Histogram("ctxvec_batch_texts", "Texts per forward pass.", buckets=BATCH_BUCKETS,
                                     registry=r)
        self.batch_padding = Histogram("ctxvec_batch_padding", "Padded share of each forward pass.",
                                       buckets=PADDING_BUCKETS, registry=r)
        self.tokens = Counter("ctxvec_tokens", "Real tokens run through the model (rate(): tokens/s).",
                              registry=r)
        self.busy = Counter("ctxvec_worker_busy_seconds", "Seconds the inference streams computed, added up "
                            "(rate(): streams busy on average, up to the number of streams, --streams).", registry=r)
        self.tokens_per_second = Gauge("ctxvec_tokens_per_second", "Throughput of the worker's last forward pass.",
                                       registry=r)
        self.dropped = Counter("ctxvec_dropped_texts", "Texts never computed because their request gave "
                               "up, by reason.", ["reason"], registry=r)

    def events(self) -> WorkerEvents:
        """The worker's hooks, feeding these metrics."""
        def on_queue(texts: int, tokens: int) -> None:
            self.queue_texts.set(texts)
            self.queue_tokens.set(tokens)

        def on_batch(shape: BatchShape) -> None:
            self.batch_texts.observe(shape.texts)
            self.batch_padding.observe(shape.padding)

        def on_computed(tokens: int, seconds: float) -> None:
            self.tokens.inc(tokens)
            self.busy.inc(seconds)
            self.tokens_per_second.set(tokens / max(seconds, 1e-9))

        return WorkerEvents(on_queue, on_batch, on_computed, lambda reason, n: self.dropped.labels(reason).inc(n))

    def text(self) -> bytes:
        return generate_latest(self.registry)
