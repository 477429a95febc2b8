from __future__ import annotations

import gc
import os
import threading
from pathlib import Path

import pytest
import torch

from ctxvec import Encoder, EncoderConfig


# The reference libraries must never reach for a model hub: everything is local.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def tiny_config(**changes) -> EncoderConfig:
    """A small encoder with the seed's structure: fast enough for every test."""
    base = dict(vocab_size=64, d_model=32, n_heads=4, d_ff=64, n_layers=2, dropout=0.0, max_len=40)
    base.update(changes)
    return EncoderConfig(**base)


@pytest.fixture
def intra_op_threads():
    """``intra_op_threads(n)`` puts the test's thread on n intra-op threads (and returns n); the
    count it had is put back after the test."""
    before = torch.get_num_threads()

    def use(n: int) -> int:
        torch.set_num_threads(n)
        return n

    yield use
    torch.set_num_threads(before)


def threads_of_a_new_thread() -> int:
    """The intra-op thread count a thread started now gets: OpenMP's count is per thread, so a
    caller's own count cannot tell whether code that ran threads put the process default back."""
    seen = []
    thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    return seen[0]


# The layer variants PyTorch has too, for the from_torch exactness tests (encoder and decoder).
VARIANTS = [
    dict(norm_first=False, activation="relu"),
    dict(norm_first=True, activation="relu", final_norm=True),
    dict(norm_first=True, activation="gelu", final_norm=False),
    dict(norm_first=False, activation="gelu", final_norm=True),
]


def random_batch(batch: int, seq_len: int, vocab_size: int, generator: torch.Generator | None = None,
                 min_len: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids with right padding of random lengths; the first row is always full length."""
    g = generator or torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab_size, (batch, seq_len), generator=g)
    lengths = torch.randint(min_len, seq_len + 1, (batch,), generator=g)
    lengths[0] = seq_len
    mask = (torch.arange(seq_len)[None, :] < lengths[:, None]).long()
    return ids * mask, mask


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _thaw():
    """A CLI command run in this process freezes its objects out of the garbage collector's
    reach (``gc.freeze``, as it should in its own process): thaw them after each test."""
    yield
    gc.unfreeze()


@pytest.fixture
def config() -> EncoderConfig:
    return tiny_config()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A small ctxvec model folder (the shipped tokenizer, a 2-layer 32-wide encoder)."""
    from ctxvec.loading import save_pipeline, seed_tokenizer
    from ctxvec.pipeline import Pipeline

    tokenizer = seed_tokenizer(max_len=64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        encoder = Encoder(tiny_config(vocab_size=tokenizer.vocab_size, max_len=64))
    folder = tmp_path_factory.mktemp("tiny")
    save_pipeline(Pipeline(tokenizer, encoder, name="tiny"), folder, "a tiny test model")
    return folder
