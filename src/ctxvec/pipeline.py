"""Text in, context vectors out: a tokenizer, an encoder and a pooling working together.

``Pipeline.encode(texts)`` returns every token's context vector (the seed's output);
``Pipeline.embed(texts)`` returns one vector per text. Both sort the texts by length into
batches under a token budget (little padding), then put the results back in input order.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from ctxvec.engine.batching import default_batch_tokens, length_sorted_batches, padded_shape, padded_width
from ctxvec.engine.linear import repack_weights
from ctxvec.engine.route import route_for
from ctxvec.engine.runtime import native_bf16, precision_dtype, release_memory
from ctxvec.engine.streams import StreamPlan, plan_streams, run_in_streams
from ctxvec.model.config import EncoderConfig
from ctxvec.validation import is_int
from ctxvec.model.encoder import Encoder
from ctxvec.model.pooling import Pooling
from ctxvec.tokenizer import Encoded, Tokenizer, as_texts

log = logging.getLogger(__name__)
Result = TypeVar("Result")

# Seconds between heap trims at the end of calls that freed no weight copies: a trim costs ~1.5
# ms, a fifth of a single short text's call (``engine.runtime.release_memory``).
TRIM_INTERVAL = 1.0


@dataclass
class TokenVectors:
    """One text's context vectors.

    Attributes:
        text: the input text.
        tokens: its word pieces, special tokens included.
        ids: their token ids.
        special: True where the token is a special token ([CLS], [SEP], ...).
        vectors: (n_tokens, d_model) float32, one context vector per token.
        truncated: whether the text was cut to the model's length limit.
        n_tokens_full: how many tokens the whole text has (``len(tokens)`` if not truncated).
    """

    text: str
    tokens: list[str]
    ids: list[int]
    special: list[bool]
    vectors: np.ndarray
    truncated: bool
    n_tokens_full: int


@dataclass(frozen=True)
class BatchShape:
    """One forward pass: ``texts`` texts padded to (``rows``, ``width``), ``real_tokens`` of them real."""

    texts: int
    rows: int
    width: int
    real_tokens: int

    @property
    def padding(self) -> float:
        """The padded share of the (rows, width) batch."""
        return 1.0 - self.real_tokens / (self.rows * self.width)


@dataclass
class SentenceVectors:
    """Sentence vectors of several texts, in input order.

    Attributes:
        vectors: (n, d_model) float32.
        truncated: (n,) bool, whether each text was cut to the model's length limit.
        n_tokens: (n,) tokens used per text (special tokens included).
        n_tokens_full: (n,) tokens in each whole text.
    """

    vectors: np.ndarray
    truncated: np.ndarray
    n_tokens: np.ndarray
    n_tokens_full: np.ndarray


def check_compatible(tokenizer: Tokenizer, config: EncoderConfig, source: str) -> None:
    """The tokenizer and the encoder must agree on vocabulary, padding and length."""
    problems = []
    if tokenizer.vocab_size != config.vocab_size:
        problems.append(f"the tokenizer has {tokenizer.vocab_size} tokens but the encoder's "
                        f"embedding has {config.vocab_size} rows")
    if tokenizer.pad_id != config.pad_id:
        problems.append(f"the tokenizer pads with id {tokenizer.pad_id} but the encoder's pad_id "
                        f"is {config.pad_id}")
    if tokenizer.max_len > config.max_len:
        problems.append(f"the tokenizer keeps up to {tokenizer.max_len} tokens but the encoder's "
                        f"position table has only {config.max_len}")
    for special in ("[CLS]", "[SEP]"):
        if tokenizer.token_to_id(special) is None:
            problems.append(f"the tokenizer has no {special} token")
    if problems:
        raise ValueError(f"{source}: " + "; ".join(problems) + ".")


class Pipeline:
    """A tokenizer, an encoder and a pooling that agree on vocabulary and length.

    Args:
        tokenizer: turns texts into padded batches; its ``max_len`` is the pipeline's limit.
        encoder: turns batches into context vectors.
        pooling: turns a text's token vectors into its sentence vector.
        name: a label for messages ("minilm", "seed", a folder).
        description: one sentence for people (shown by the CLI).
    """

    def __init__(self, tokenizer: Tokenizer, encoder: Encoder, pooling: Pooling | None = None,
                 name: str = "", description: str = "") -> None:
        check_compatible(tokenizer, encoder.config, name or "pipeline")
        self.tokenizer = tokenizer
        self.encoder = encoder.eval()
        self.pooling = pooling or Pooling("mean")
        self.name = name
        self.description = description
        self.precision = "fp32"
        self._kept_weights: dict | None = None  # see keep_repacked_weights
        # Batches side by side on a CPU (``engine.streams``): None picks by the call's batches
        # and threads (one per thread when each gets two batches); 1 runs them one at a time.
        self.streams: int | None = None

    def set_precision(self, precision: str) -> Pipeline:
        """Run the encoder in "fp32" (exact) or "bf16" (weights and activations in bfloat16).

        Pooling and normalisation stay in fp32. Returns the pipeline itself.
        """
        dtype = precision_dtype(precision)
        device = next(self.encoder.parameters()).device
        if dtype == torch.bfloat16 and not native_bf16(device):
            log.warning("this %s has no native bf16 matrix multiply (AVX512-BF16 or AMX); bf16 will "
                        "be much slower than fp32 here.", "GPU" if device.type == "cuda" else "CPU")
        self.encoder.to(dtype)
        self.precision = precision
        if self._kept_weights is not None:
            self.keep_repacked_weights()  # again, in the new dtype
        return self

    def keep_repacked_weights(self) -> Pipeline:
        """Repack the weights for oneDNN once and keep them, for a process that only runs
        inference on fixed weights (the server): every call then takes the repacked route, even
        a batch of one text (otherwise a call repacks from three batches on). Costs a second copy
        of the weights' memory; call it again after changing the weights. Returns the pipeline."""
        self._kept_weights = repack_weights(self.encoder)
        return self

    @property
    def batch_tokens(self) -> int:
        """The token budget of a forward pass when a call names none (``engine.batching``: 2048
        for bf16 on a CPU with AMX, else 1024)."""
        weight = next(self.encoder.parameters())
        return default_batch_tokens(weight.dtype, weight.device)

    @property
    def max_len(self) -> int:
        return self.tokenizer.max_len

    @property
    def dim(self) -> int:
        return self.encoder.config.d_model

    def _forward(self, encoded: Sequence[Encoded], batch_tokens: int,
                 finish: Callable[[list[int], torch.Tensor, list[int]], Result],
                 on_batch: Callable[[BatchShape], None] | None = None, trim: bool = True,
                 ) -> Iterator[tuple[list[int], Result]]:
        """(indices, ``finish(indices, rows (N, D) fp32, lengths)``) per length-sorted batch, in
        order, ``rows`` the batch's real tokens' vectors text after text (``lengths`` of them);
        the batches run in streams (``engine.streams``) and ``finish`` with them. ``trim``: give
        freed heap memory back to the system at the end (``release_memory``)."""
        batch_tokens = self.batch_tokens if batch_tokens is None else batch_tokens
        if not is_int(batch_tokens) or batch_tokens < 1:
            raise ValueError(f"batch_tokens must be a positive integer, got {batch_tokens!r}.")
        lengths = [len(e.ids) for e in encoded]
        width_of = self.width_rule()
        batches = list(length_sorted_batches(lengths, batch_tokens, width_of))
        with torch.inference_mode():
            # Repacking the weights for oneDNN costs about a tenth of a batch and saves about
            # as much per batch: worth it from three batches on. The copies live for this call.
            repacked = (self._kept_weights if self._kept_weights is not None
                        else repack_weights(self.encoder) if len(batches) > 2 else {})

        def run(indices: list[int]) -> tuple[list[int], BatchShape, Result]:
            rows, width = padded_shape(max(lengths[i] for i in indices), len(indices), batch_tokens,
                                       self.encoder.config.max_len, width_of)
            batch = self.tokenizer.pad([encoded[i] for i in indices], length=width, rows=rows)
            mask = batch.attention_mask
            route = route_for(self.encoder, mask, repacked)
            # every real token's vector, (N, D) text after text: no padded batch to unpack
            real_rows = self.encoder(batch.input_ids, mask, positions=mask.bool(), route=route).last_hidden_state
            shape = BatchShape(len(indices), rows, width, sum(batch.n_tokens))
            return indices, shape, finish(indices, real_rows.float(), batch.n_tokens)

        try:
            for indices, shape, result in run_in_streams(run, batches, self._stream_plan(len(batches))):
                if on_batch is not None:
                    on_batch(shape)
                yield indices, result
        finally:  # also when the caller stops early or a batch fails
            copies = repacked is not self._kept_weights and bool(repacked)
            repacked = None  # this call's copies of the weights go before the heap is handed back
            if trim:  # always after freeing copies; else at most once a TRIM_INTERVAL (short calls)
                release_memory(0.0 if copies else TRIM_INTERVAL)

    def width_rule(self) -> Callable[[int], int]:
        """The width a batch whose longest text has n tokens is padded to, as a function of n:
        ``engine.batching.padded_width`` in the model's dtype, at most the model's limit. (Asked
        once per call: finding the dtype walks the modules, a few microseconds, and the rule
        runs once per text.)"""
        dtype, max_len = next(self.encoder.parameters()).dtype, self.encoder.config.max_len
        return lambda longest: min(padded_width(longest, dtype), max(max_len, longest))

    def _stream_plan(self, batches: int) -> StreamPlan:
        if next(self.encoder.parameters()).device.type != "cpu":
            return StreamPlan(1, torch.get_num_threads())
        return plan_streams(batches, torch.get_num_threads(), self.streams)

    def encode(self, texts: Iterable[str], *, batch_tokens: int | None = None,
               strict: bool = False) -> list[TokenVectors]:
        """Context vectors for every token of every text, in input order.

        Args:
            texts: the texts.
            batch_tokens: padded tokens per forward pass (None: ``self.batch_tokens``; the vectors
                move by at most 1e-6 in fp32, 3e-3 in bf16, with it: the order of floating-point
                sums, and in bf16 which attention kernel the batch's width takes).
            strict: raise instead of truncating a text over the length limit, or of encoding a
                text without a single token (``ctxvec.tokenizer.StrictError``).
        """
        texts = as_texts(texts)
        return self.token_vectors(texts, self.tokenizer.tokenize(texts, strict=strict), batch_tokens)

    def embed_with_details(self, texts: Iterable[str], *, batch_tokens: int | None = None,
                           strict: bool = False) -> SentenceVectors:
        """Sentence vectors (the model's own pooling and normalisation) and truncation facts."""
        return self.sentence_vectors(self.tokenizer.tokenize(texts, strict=strict), batch_tokens)

    def embed(self, texts: Iterable[str], *, batch_tokens: int | None = None,
              strict: bool = False) -> np.ndarray:
        """(n, d_model) float32 sentence vectors, in input order (see ``embed_with_details``)."""
        return self.embed_with_details(texts, batch_tokens=batch_tokens, strict=strict).vectors

    # ---- from texts already tokenized (``tokenizer.tokenize``): what a server batches -----------
    def sentence_vectors(self, encoded: Sequence[Encoded], batch_tokens: int | None = None,
                         on_batch: Callable[[BatchShape], None] | None = None) -> SentenceVectors:
        """``embed_with_details`` of tokenized texts; ``on_batch`` hears of every forward pass."""
        vectors = np.zeros((len(encoded), self.dim), dtype=np.float32)
        for indices, batch_vectors in self.sentence_vector_batches(encoded, batch_tokens, on_batch):
            vectors[indices] = batch_vectors
        return SentenceVectors(
            vectors=vectors,
            truncated=np.array([e.truncated for e in encoded], dtype=bool),
            n_tokens=np.array([len(e.ids) for e in encoded], dtype=np.int64),
            n_tokens_full=np.array([e.n_tokens_full for e in encoded], dtype=np.int64),
        )

    def token_vectors(self, texts: Sequence[str], encoded: Sequence[Encoded],
                      batch_tokens: int | None = None,
                      on_batch: Callable[[BatchShape], None] | None = None) -> list[TokenVectors]:
        """``encode`` of tokenized texts (``texts`` are kept on the results)."""
        results: list[TokenVectors | None] = [None] * len(encoded)
        for indices, batch_results in self.token_vector_batches(texts, encoded, batch_tokens, on_batch):
            for i, result in zip(indices, batch_results):
                results[i] = result
        return results  # type: ignore[return-value]

    # ---- batch by batch, as each forward pass ends (a server answers requests as they are done) --
    def sentence_vector_batches(self, encoded: Sequence[Encoded], batch_tokens: int | None = None,
                                on_batch: Callable[[BatchShape], None] | None = None, trim: bool = True,
                                ) -> Iterator[tuple[list[int], np.ndarray]]:
        """(indices into ``encoded``, their sentence vectors (len(indices), D)) per forward pass.

        ``on_batch`` hears of every forward pass; ``trim=False`` leaves freed memory to the
        caller (``engine.runtime.release_memory``): one that makes many small calls in a row, as
        the server does, trims when it is idle instead of after every call (~10% of a small call).
        """
        def finish(_: list[int], rows: torch.Tensor, lengths: list[int]) -> np.ndarray:
            return self.pooling.pool_rows(rows, torch.tensor(lengths)).numpy()

        yield from self._forward(encoded, batch_tokens, finish, on_batch, trim)

    def token_vector_batches(self, texts: Sequence[str], encoded: Sequence[Encoded],
                             batch_tokens: int | None = None,
                             on_batch: Callable[[BatchShape], None] | None = None, trim: bool = True,
                             ) -> Iterator[tuple[list[int], list[TokenVectors]]]:
        """(indices into ``encoded``, their ``TokenVectors``) per forward pass (the arguments as
        for ``sentence_vector_batches``)."""
        def finish(indices: list[int], rows: torch.Tensor, lengths: list[int]) -> list[TokenVectors]:
            per_text = np.split(rows.numpy(), np.cumsum(lengths)[:-1])  # views, (n_tokens, D) each
            return [TokenVectors(
                text=texts[i], tokens=encoded[i].tokens, ids=list(encoded[i].ids),
                special=[bool(s) for s in encoded[i].special_tokens_mask],
                vectors=vectors.copy(), truncated=encoded[i].truncated, n_tokens_full=encoded[i].n_tokens_full)
                for i, vectors in zip(indices, per_text)]

        yield from self._forward(encoded, batch_tokens, finish, on_batch, trim)
