"""A trained translator: its folder, and the pipeline that turns texts into texts with it.

``export_translator`` writes the folder (``translator.json``, ``model.safetensors``,
``tokenizer.json``; ``weights.folders``), ``load_translator`` reads it back, and
``TranslatorPipeline.translate`` turns texts into texts (greedy or beam search, batched by length).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ctxvec.engine.batching import length_sorted_batches
from ctxvec.model.translator import Translator
from ctxvec.tokenizer import CLS, SEP, Tokenizer
from ctxvec.translate.decoding import beam_search, greedy_decode
from ctxvec.weights.checkpoint import unique_state, with_aliases
from ctxvec.weights.folders import TRANSLATOR_CONFIG, read_translator_meta, write_model_folder
from ctxvec.weights.tensorfile import WEIGHTS_FILE, load_model


def export_translator(folder: str | Path, model: Translator, tokenizer: Tokenizer, max_len: int,
                      description: str) -> None:
    """Write ``model`` as a translation folder that ``load_translator`` reads back exactly."""
    meta = {"seq2seq": model.config.to_dict(), "max_len": max_len, "bos": CLS, "eos": SEP,
            "description": description}
    write_model_folder(folder, {k: v.float() for k, v in unique_state(model).items()}, tokenizer,
                       TRANSLATOR_CONFIG, meta)


@dataclass
class TranslatorPipeline:
    """A trained translator with its tokenizer: ``translate(texts)`` -> texts."""

    model: Translator
    tokenizer: Tokenizer
    max_len: int
    description: str = ""

    def translate(self, texts: Sequence[str], *, beam_size: int = 4, alpha: float = 0.6,
                  max_length: int | None = None, batch_tokens: int = 2048) -> list[str]:
        return translate_texts(self.model, self.tokenizer, texts, max_len=self.max_len, beam_size=beam_size,
                               alpha=alpha, max_length=max_length, batch_tokens=batch_tokens)


def load_translator(folder: str | Path) -> TranslatorPipeline:
    """A folder written by ``ctxvec train-translation`` (or ``export_translator``)."""
    folder = Path(folder)
    config, max_len, description = read_translator_meta(folder)
    tokenizer = Tokenizer.load(folder / "tokenizer.json", max_len=max_len)
    if tokenizer.vocab_size != config.encoder.vocab_size:
        raise ValueError(f"{folder}: the tokenizer has {tokenizer.vocab_size} tokens but the model's "
                         f"embedding has {config.encoder.vocab_size} rows.")
    n_layers = config.encoder.n_layers + (config.n_decoder_layers or config.encoder.n_layers)
    model = load_model(lambda: Translator(config), folder / WEIGHTS_FILE, n_layers, with_aliases)
    return TranslatorPipeline(model.eval(), tokenizer, max_len, description)


@torch.no_grad()
def translate_texts(model: Translator, tokenizer: Tokenizer, texts: Sequence[str], *, max_len: int,
                    beam_size: int = 1, alpha: float = 0.6, max_length: int | None = None,
                    batch_tokens: int = 2048) -> list[str]:
    """Translate ``texts`` in length-sorted batches (greedy when ``beam_size`` is 1)."""
    was_training = model.training
    model.eval()
    encoded = tokenizer.tokenize(list(texts))
    bos, eos = tokenizer.token_to_id(CLS), tokenizer.token_to_id(SEP)
    limit = max_length or max_len
    out: list[str] = [""] * len(encoded)
    lengths = [len(e.ids) for e in encoded]
    for indices in length_sorted_batches(lengths, max(batch_tokens // max(beam_size, 1), max(lengths, default=1))):
        batch = tokenizer.pad([encoded[i] for i in indices])
        kwargs = dict(bos_id=bos, eos_id=eos, pad_id=tokenizer.pad_id, max_length=limit)
        if beam_size == 1:
            result = greedy_decode(model, batch.input_ids, batch.attention_mask, **kwargs)
        else:
            result = beam_search(model, batch.input_ids, batch.attention_mask, beam_size=beam_size,
                                 alpha=alpha, **kwargs)
        for i, ids in zip(indices, result.tokens):
            out[i] = tokenizer.decode(ids)
    model.train(was_training)
    return out
