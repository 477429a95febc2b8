"""The model's configuration: typed dataclasses whose defaults are the seed's design (``EncoderConfig``),
and the translator's (``Seq2SeqConfig``: an encoder config and what the decoder changes)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from ctxvec.validation import is_int, is_real

Activation = Literal["relu", "gelu"]
Position = Literal["sinusoidal", "learned"]

ACTIVATION_NAMES: tuple[str, ...] = get_args(Activation)
MAX_POSITIONS = 65_536  # the longest position table a config may ask for
POSITION_KINDS: tuple[str, ...] = get_args(Position)


@dataclass(frozen=True)
class EncoderConfig:
    """Hyperparameters of a Transformer encoder.

    The defaults are the seed's assembly line: 512-wide embeddings, sinusoidal positions,
    8 heads x 64, a 512 -> 1024 -> 512 ReLU feed-forward, post-norm (Add & Norm after each
    sub-layer), 12 layers.

    The BERT family (issue "real pretrained weights") needs the variant fields marked below;
    they default to the seed's choice.
    """

    vocab_size: int = 8000
    pad_id: int = 0
    d_model: int = 512
    n_heads: int = 8
    d_ff: int = 1024
    n_layers: int = 12
    dropout: float = 0.1  # on attention probabilities, after each sub-layer, inside the FFN
    activation: Activation = "relu"
    norm_first: bool = False  # False: LayerNorm(x + sublayer(x)) as in the seed; True: pre-norm
    position: Position = "sinusoidal"
    layer_norm_eps: float = 1e-5
    max_len: int = 512  # longest sequence the position table covers, special tokens included
    # Vaswani et al. multiply the token embedding by sqrt(d_model) before adding positions;
    # BERT does not.
    scale_embeddings: bool = True
    # A LayerNorm after the last layer. None: present exactly when norm_first (pre-norm needs
    # it; PyTorch's nn.TransformerEncoder makes it optional, so from_torch sets it).
    final_norm: bool | None = None
    # BERT family: segment embeddings (0 = none) and a LayerNorm on the summed embeddings.
    type_vocab_size: int = 0
    embedding_norm: bool = False

    def __post_init__(self) -> None:
        def need(ok: bool, sentence: str) -> None:
            if not ok:
                raise ValueError(f"Invalid EncoderConfig: {sentence}")

        for name in ("vocab_size", "d_model", "n_heads", "d_ff", "n_layers", "max_len"):
            value = getattr(self, name)
            need(is_int(value) and value > 0, f"{name} must be a positive integer, got {value!r}.")
        need(self.max_len <= MAX_POSITIONS,
             f"max_len must be at most {MAX_POSITIONS:,} positions, got {self.max_len:,} (the position "
             "table has a row for each).")
        need(
            self.d_model % self.n_heads == 0,
            f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads}) so that "
            "every head gets the same width.",
        )
        need(
            is_int(self.pad_id) and 0 <= self.pad_id < self.vocab_size,
            f"pad_id ({self.pad_id!r}) must be a token id in [0, vocab_size={self.vocab_size}).",
        )
        need(
            is_real(self.dropout) and 0.0 <= self.dropout < 1.0,
            f"dropout must be a number in [0, 1), got {self.dropout!r}.",
        )
        need(
            is_real(self.layer_norm_eps) and 0 < self.layer_norm_eps < 1,
            f"layer_norm_eps must be a small positive number (0 < eps < 1), got {self.layer_norm_eps!r}.",
        )
        need(
            self.activation in ACTIVATION_NAMES,
            f"activation must be one of {ACTIVATION_NAMES}, got {self.activation!r}.",
        )
        need(
            self.position in POSITION_KINDS,
            f"position must be one of {POSITION_KINDS}, got {self.position!r}.",
        )
        for name in ("norm_first", "scale_embeddings", "embedding_norm"):
            value = getattr(self, name)
            need(isinstance(value, bool), f"{name} must be true or false, got {value!r}.")
        need(
            self.final_norm is None or isinstance(self.final_norm, bool),
            f"final_norm must be true, false or null (null: exactly when norm_first), got {self.final_norm!r}.",
        )
        need(
            is_int(self.type_vocab_size) and self.type_vocab_size >= 0,
            f"type_vocab_size must be a non-negative integer, got {self.type_vocab_size!r}.",
        )

    @property
    def d_head(self) -> int:
        """Width of one attention head (64 in the seed)."""
        return self.d_model // self.n_heads

    @property
    def has_final_norm(self) -> bool:
        return self.norm_first if self.final_norm is None else self.final_norm

    def replace(self, **changes: Any) -> EncoderConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> EncoderConfig:
        refuse_unknown_fields(cls, values)
        return cls(**values)

    def save(self, path: str | Path) -> None:
        from ctxvec.files import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> EncoderConfig:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


@dataclass(frozen=True)
class Seq2SeqConfig:
    """Hyperparameters of an encoder-decoder translator.

    The decoder copies the encoder's width, heads, feed-forward, norm placement, positions and
    dropout; only its depth and its vocabulary may differ.
    """

    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    n_decoder_layers: int | None = None  # None: as deep as the encoder
    # None: one vocabulary for both languages (a joint WordPiece), the encoder's vocab_size.
    tgt_vocab_size: int | None = None
    tgt_pad_id: int | None = None  # None: the encoder's pad_id
    # The decoder's input embedding is its output projection (Press & Wolf 2017; Vaswani et al.).
    tie_embeddings: bool = True
    # One token table for encoder and decoder; needs the shared vocabulary (tgt_vocab_size=None).
    share_embeddings: bool = False

    def __post_init__(self) -> None:
        def need(ok: bool, sentence: str) -> None:
            if not ok:
                raise ValueError(f"Invalid Seq2SeqConfig: {sentence}")

        need(isinstance(self.encoder, EncoderConfig),
             f"encoder must be an EncoderConfig, got {type(self.encoder).__name__}.")
        need(self.n_decoder_layers is None or (is_int(self.n_decoder_layers) and self.n_decoder_layers > 0),
             f"n_decoder_layers must be a positive integer or None, got {self.n_decoder_layers!r}.")
        need(self.tgt_vocab_size is None or (is_int(self.tgt_vocab_size) and self.tgt_vocab_size > 0),
             f"tgt_vocab_size must be a positive integer or None, got {self.tgt_vocab_size!r}.")
        vocab = self.target_vocab_size
        pad = self.encoder.pad_id if self.tgt_pad_id is None else self.tgt_pad_id
        need(is_int(pad) and 0 <= pad < vocab,
             f"tgt_pad_id ({pad!r}) must be a token id in [0, target vocabulary size={vocab}).")
        for name in ("tie_embeddings", "share_embeddings"):
            need(isinstance(getattr(self, name), bool), f"{name} must be True or False.")
        need(not self.share_embeddings or self.tgt_vocab_size is None,
             "share_embeddings needs one vocabulary for both languages: leave tgt_vocab_size None.")

    @property
    def target_vocab_size(self) -> int:
        return self.encoder.vocab_size if self.tgt_vocab_size is None else self.tgt_vocab_size

    @property
    def decoder(self) -> EncoderConfig:
        """The decoder's layer hyperparameters: the encoder's, with its own depth and vocabulary."""
        return self.encoder.replace(
            n_layers=self.n_decoder_layers or self.encoder.n_layers, vocab_size=self.target_vocab_size,
            pad_id=self.encoder.pad_id if self.tgt_pad_id is None else self.tgt_pad_id)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Seq2SeqConfig:
        refuse_unknown_fields(cls, values)
        values = dict(values)
        if isinstance(values.get("encoder"), dict):
            values["encoder"] = EncoderConfig.from_dict(values["encoder"])
        return cls(**values)


def refuse_unknown_fields(cls: type, values: dict[str, Any]) -> None:
    """A config read from a file must name only fields the dataclass ``cls`` has."""
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ValueError(f"Invalid {cls.__name__}: unknown field(s) {', '.join(unknown)}.")
