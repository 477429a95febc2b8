"""Model folders: the one format ctxvec writes, and reads back exactly.

A folder holds ``model.safetensors``, ``tokenizer.json`` and a JSON file that says what the
model is: ``ctxvec.json`` for an encoder with its pooling (``ctxvec.load(folder)``; written by
``save_pipeline`` and at the top of a masked-LM run), or ``translator.json`` for a translator
(``ctxvec.translate.load_translator``; written at the top of a translation run). Every file is
written atomically; weights in the dtype they are given (the trainers give float32).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ctxvec.files import atomic_write_text, read_json
from ctxvec.model.config import EncoderConfig, Seq2SeqConfig
from ctxvec.model.pooling import Pooling
from ctxvec.tokenizer import Tokenizer
from ctxvec.weights.tensorfile import WEIGHTS_FILE, atomic_save_tensors

CTXVEC_CONFIG = "ctxvec.json"
TRANSLATOR_CONFIG = "translator.json"


def write_model_folder(folder: str | Path, state: dict[str, torch.Tensor], tokenizer: Tokenizer | None,
                       meta_file: str, meta: dict[str, Any]) -> None:
    """Weights, tokenizer (None: the folder already holds it) and the JSON file ``meta_file``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_save_tensors(folder / WEIGHTS_FILE, state)
    if tokenizer is not None:
        tokenizer.save(folder / "tokenizer.json")
    atomic_write_text(folder / meta_file, json.dumps(meta, indent=2) + "\n")


def write_encoder_folder(folder: str | Path, state: dict[str, torch.Tensor], config: EncoderConfig,
                         tokenizer: Tokenizer | None, pooling: Pooling, max_len: int, description: str) -> None:
    """An encoder's folder (``ctxvec.json``): its config, length limit and pooling."""
    meta = {"encoder": config.to_dict(), "max_len": max_len,
            "pooling": {"mode": pooling.mode, "normalize": pooling.normalize}, "description": description}
    write_model_folder(folder, state, tokenizer, CTXVEC_CONFIG, meta)


def read_encoder_meta(folder: Path) -> tuple[EncoderConfig, Pooling, int, str]:
    """(config, pooling, max_len, description) of an encoder folder; errors name the file."""
    path = folder / CTXVEC_CONFIG
    meta = read_json(path)
    try:
        config = EncoderConfig.from_dict(meta["encoder"])
        pooling = Pooling(meta["pooling"]["mode"], bool(meta["pooling"]["normalize"]))
        max_len = int(meta["max_len"])
    except (KeyError, TypeError) as err:
        raise ValueError(f"{path} lacks {err}.") from None
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    return config, pooling, max_len, str(meta.get("description", f"ctxvec model from {folder}"))


def read_translator_meta(folder: Path) -> tuple[Seq2SeqConfig, int, str]:
    """(config, max_len, description) of a translation folder; errors name the file."""
    path = folder / TRANSLATOR_CONFIG
    if not path.is_file():
        raise ValueError(f"{folder} is not a translation model (no {TRANSLATOR_CONFIG}); train one with "
                         "`ctxvec train-translation`.")
    meta = read_json(path)
    try:
        return Seq2SeqConfig.from_dict(meta["seq2seq"]), int(meta["max_len"]), str(meta.get("description", ""))
    except (KeyError, TypeError) as err:
        raise ValueError(f"{path} lacks {err}.") from None
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
