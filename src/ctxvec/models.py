"""Named models: ``load("seed")`` and, later, pretrained weights and trained run folders."""

from __future__ import annotations

from importlib import resources

import torch

from ctxvec.config import EncoderConfig
from ctxvec.encoder import Encoder
from ctxvec.pipeline import Pipeline
from ctxvec.tokenizer import Tokenizer

SEED_WEIGHTS_SEED = 0  # torch.manual_seed for the seed model's random weights

KNOWN_MODELS: dict[str, str] = {
    "seed": "the seed architecture (512/8x64/1024/12, post-norm, sinusoidal) with UNTRAINED, "
            "seeded random weights and a WordPiece tokenizer trained on the World English Bible",
}


def seed_tokenizer(max_len: int = 512) -> Tokenizer:
    """The WordPiece tokenizer shipped with ctxvec (see ``assets/README.md`` for provenance)."""
    path = resources.files("ctxvec") / "assets" / "seed_tokenizer.json"
    with resources.as_file(path) as file:
        return Tokenizer.load(file, max_len=max_len)


def load_seed() -> Pipeline:
    """The seed architecture with seeded random weights: deterministic, and untrained."""
    tokenizer = seed_tokenizer()
    config = EncoderConfig(vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id)
    with torch.random.fork_rng(devices=[]):  # leave the caller's random state alone
        torch.manual_seed(SEED_WEIGHTS_SEED)
        encoder = Encoder(config)
    return Pipeline(tokenizer, encoder, name="seed", description=KNOWN_MODELS["seed"])


def load(name: str = "seed") -> Pipeline:
    """A ready pipeline by name. Known names: see ``KNOWN_MODELS``."""
    if name == "seed":
        return load_seed()
    known = ", ".join(sorted(KNOWN_MODELS))
    raise ValueError(f"unknown model {name!r}; known models: {known}.")
