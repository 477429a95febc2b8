"""Text in, context vectors out: a tokenizer and an encoder working together.

``load(name)`` builds one. ``Pipeline.encode(texts)`` returns, for every text in input order,
its tokens and one context vector per token (the seed's output).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ctxvec.encoder import Encoder
from ctxvec.tokenizer import Tokenizer


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


class Pipeline:
    """A tokenizer and an encoder that agree on vocabulary and length.

    Args:
        tokenizer: turns texts into padded batches.
        encoder: turns batches into context vectors.
        name: a label for messages ("seed", a folder, ...).
        description: one sentence for people (shown by the CLI).
    """

    def __init__(self, tokenizer: Tokenizer, encoder: Encoder, name: str, description: str = "") -> None:
        config = encoder.config
        if tokenizer.vocab_size != config.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the encoder's "
                             f"embedding has {config.vocab_size} rows; they must be the same.")
        if tokenizer.pad_id != config.pad_id:
            raise ValueError(f"the tokenizer pads with id {tokenizer.pad_id} but the encoder's "
                             f"pad_id is {config.pad_id}.")
        if tokenizer.max_len > config.max_len:
            raise ValueError(f"the tokenizer keeps up to {tokenizer.max_len} tokens but the "
                             f"encoder's position table has only {config.max_len}.")
        self.tokenizer = tokenizer
        self.encoder = encoder.eval()
        self.name = name
        self.description = description

    @property
    def max_len(self) -> int:
        return self.tokenizer.max_len

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], batch_size: int = 32, strict: bool = False) -> list[TokenVectors]:
        """Context vectors for every token of every text, in input order.

        Args:
            texts: the texts.
            batch_size: texts per forward pass (results do not depend on it).
            strict: raise instead of truncating a text over the length limit.
        """
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
        texts = Tokenizer._check_texts(texts)
        results: list[TokenVectors] = []
        for start in range(0, len(texts), batch_size):
            chunk = texts[start : start + batch_size]
            batch = self.tokenizer.encode_batch(chunk, strict=strict)
            hidden = self.encoder(batch.input_ids, batch.attention_mask).last_hidden_state  # (B, T, D)
            hidden = hidden.float().numpy()
            for row, text in enumerate(chunk):
                n = batch.n_tokens[row]
                results.append(TokenVectors(
                    text=text,
                    tokens=batch.tokens[row],
                    ids=batch.input_ids[row, :n].tolist(),
                    special=[bool(s) for s in batch.special_tokens_mask[row]],
                    vectors=hidden[row, :n].copy(),
                    truncated=batch.truncated[row],
                    n_tokens_full=batch.n_tokens_full[row],
                ))
        return results
