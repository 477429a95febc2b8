"""Step 1 of the assembly line: text -> word pieces -> ids, padded into a batch.

Built on Hugging Face ``tokenizers`` (Rust): the WordPiece model, normalizer, pre-tokenizer and
special-token template all come from it. ctxvec adds what its users need on top: truncation
that is reported per text (or refused, in strict mode), padding to the longest text or to a
fixed length, and the ``attention_mask`` (1 = real token) that the encoder expects.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import tokenizers
import torch
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from ctxvec.files import atomic_write_text
from ctxvec.validation import is_int
from ctxvec.texts import check_utf8, lone_surrogate

log = logging.getLogger(__name__)

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
SPECIAL_TOKENS = (PAD, UNK, CLS, SEP, MASK)  # ids 0..4 in tokenizers that ctxvec trains


class StrictError(ValueError):
    """Strict mode refused a text; ``index`` is its position in the input, ``problem`` says why."""

    def __init__(self, index: int, problem: str) -> None:
        self.index, self.problem = index, problem
        super().__init__(f"text {index} {problem}; fix it or turn strict mode off.")

    def at(self, index: int) -> StrictError:
        """The same refusal for the text at another position (a chunk's offset added)."""
        error = type(self).__new__(type(self))
        error.__dict__.update(self.__dict__)
        StrictError.__init__(error, index, self.problem)
        return error


class TruncationError(StrictError):
    """A text is longer than ``max_len`` tokens and the tokenizer was asked to be strict."""

    def __init__(self, index: int, n_tokens: int, max_len: int) -> None:
        self.n_tokens, self.max_len = n_tokens, max_len
        super().__init__(index, f"has {n_tokens} tokens, more than max_len={max_len} (special tokens included)")


class EmptyTextError(StrictError):
    """A text without a single token (empty, blank, or control characters only), in strict mode."""

    def __init__(self, index: int) -> None:
        super().__init__(index, "has no tokens (it is empty, or only whitespace or control characters)")


@dataclass(slots=True)
class Encoded:
    """One text, tokenized and truncated but not padded."""

    ids: list[int]
    special_tokens_mask: list[int]  # 1 where the token is a special token
    n_tokens_full: int  # tokens in the whole text, special tokens included
    truncated: bool
    vocabulary: Sequence[str] = field(repr=False, compare=False)  # the tokenizer's, id -> token

    @property
    def tokens(self) -> list[str]:
        """The word pieces, as strings: read from the vocabulary when asked (a sentence vector
        never asks)."""
        return [self.vocabulary[i] for i in self.ids]


@dataclass
class BatchEncoding:
    """A tokenized, padded batch. Tensors are (B, T); lists have one entry per text.

    Attributes:
        input_ids: token ids, padded with the pad id.
        attention_mask: 1 for real tokens (special tokens included), 0 for padding.
        tokens: each text's tokens as strings, without padding.
        special_tokens_mask: per text, 1 where the token is a special token ([CLS], [SEP]).
        n_tokens: per text, how many tokens were kept (special tokens included).
        n_tokens_full: per text, how many tokens the whole text has (special tokens included).
        truncated: per text, whether it was cut to ``max_len``.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    tokens: list[list[str]]
    special_tokens_mask: list[list[int]]
    n_tokens: list[int]
    n_tokens_full: list[int]
    truncated: list[bool]

    def __len__(self) -> int:
        return len(self.tokens)


class Tokenizer:
    """A WordPiece tokenizer: ``train``, ``encode_batch``, ``decode``, ``save`` / ``load``.

    Args:
        backend: a ``tokenizers.Tokenizer`` (its own padding and truncation settings are
            switched off: this class pads and truncates, so that it can report what it cut).
        max_len: the longest encoding, special tokens included (the model's position table).

    Example:
        >>> tok = Tokenizer.load("tokenizer.json")  # doctest: +SKIP
        >>> batch = tok.encode_batch(["my name is aj", "hello"])  # doctest: +SKIP
        >>> batch.input_ids.shape, batch.attention_mask[1]  # doctest: +SKIP
        (torch.Size([2, 6]), tensor([1, 1, 1, 0, 0, 0]))
    """

    def __init__(self, backend: tokenizers.Tokenizer, max_len: int = 512) -> None:
        pad_token = (backend.padding or {}).get("pad_token", PAD)
        backend.no_padding()
        backend.no_truncation()
        self.backend = backend
        self.pad_token = pad_token
        self.pad_id = self._required_id(pad_token)
        self.n_special = backend.num_special_tokens_to_add(False)
        if max_len <= self.n_special:
            raise ValueError(f"max_len must exceed the {self.n_special} special tokens, got {max_len}.")
        self.max_len = max_len
        self._vocabulary: list[str] | None = None

    @property
    def vocabulary(self) -> list[str]:
        """Every token by its id (made once, when first asked)."""
        if self._vocabulary is None:
            by_token = self.backend.get_vocab(with_added_tokens=True)  # token -> id
            self._vocabulary = [""] * (max(by_token.values(), default=-1) + 1)
            for token, token_id in by_token.items():
                self._vocabulary[token_id] = token
        return self._vocabulary

    def _required_id(self, token: str) -> int:
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise ValueError(f"the tokenizer has no {token} token.")
        return token_id

    # ---- building -----------------------------------------------------------------------
    @classmethod
    def train(cls, files: Sequence[str | Path] | None = None, *, texts: Iterable[str] | None = None,
              vocab_size: int = 8000, min_frequency: int = 2, lowercase: bool = True,
              max_len: int = 512, kind: Literal["wordpiece", "bpe"] = "wordpiece") -> Tokenizer:
        """Learn a subword vocabulary from text. Special tokens come first: [PAD]=0, [UNK]=1,
        [CLS]=2, [SEP]=3, [MASK]=4.

        kind:
            "wordpiece": BERT's normalisation, pre-tokenisation and ``##`` continuation pieces
                (what an encoder reads; decoding puts spaces around punctuation).
            "bpe": byte-pair merges over words marked with a leading ``▁`` (SentencePiece's
                Metaspace): decoding gives back the exact spacing, which generated text needs.
        """
        if vocab_size <= len(SPECIAL_TOKENS):
            raise ValueError(f"vocab_size must exceed the {len(SPECIAL_TOKENS)} special tokens.")
        if kind == "wordpiece":
            backend = tokenizers.Tokenizer(models.WordPiece(unk_token=UNK, max_input_chars_per_word=100))
            backend.normalizer = normalizers.BertNormalizer(
                clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase)
            backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
            backend.decoder = decoders.WordPiece(prefix="##")
            trainer = trainers.WordPieceTrainer(
                vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS),
                continuing_subword_prefix="##", show_progress=False)
        elif kind == "bpe":
            backend = tokenizers.Tokenizer(models.BPE(unk_token=UNK))
            steps = [normalizers.NFC()] + ([normalizers.Lowercase()] if lowercase else [])
            backend.normalizer = normalizers.Sequence(steps)
            backend.pre_tokenizer = pre_tokenizers.Metaspace()
            backend.decoder = decoders.Metaspace()
            trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                          special_tokens=list(SPECIAL_TOKENS), show_progress=False)
        else:
            raise ValueError(f"kind must be 'wordpiece' or 'bpe', got {kind!r}.")
        if files is not None:
            missing = [str(f) for f in files if not Path(f).is_file()]
            if missing:
                raise FileNotFoundError(f"training file(s) not found: {', '.join(missing)}")
            for f in files:
                check_utf8(f)  # the library's own error names neither the file nor the line
            files = [str(f) for f in files]
        elif texts is not None:
            texts = list(texts)  # read twice for a WordPiece vocabulary (below)
        else:
            raise ValueError("give training files or texts.")

        def fit(backend: tokenizers.Tokenizer, trainer) -> None:
            backend.train(files, trainer) if files is not None else backend.train_from_iterator(texts, trainer)

        if kind == "wordpiece":
            backend = _deterministic_wordpiece(backend, trainer, fit)
        else:
            fit(backend, trainer)
        if backend.get_vocab_size() <= len(SPECIAL_TOKENS):
            raise ValueError("the training text holds no words: a vocabulary cannot be learned from it.")
        backend.post_processor = processors.TemplateProcessing(
            single=f"{CLS} $A {SEP}", pair=f"{CLS} $A {SEP} $B:1 {SEP}:1",
            special_tokens=[(CLS, backend.token_to_id(CLS)), (SEP, backend.token_to_id(SEP))])
        return cls(backend, max_len=max_len)

    @classmethod
    def load(cls, path: str | Path, max_len: int = 512) -> Tokenizer:
        """Load a ``tokenizer.json`` (a file, or a folder that holds one)."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise ValueError(f"{path}: no such file (a model needs the tokenizer.json its weights were "
                             "trained with).")
        try:
            backend = tokenizers.Tokenizer.from_file(str(path))
        except Exception as err:  # the Rust side raises plain Exception
            raise ValueError(f"{path} is not a valid tokenizer.json: {err}") from None
        return cls(backend, max_len=max_len)

    def save(self, path: str | Path) -> None:
        """Write ``tokenizer.json`` (to a file, or into a folder), atomically."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        atomic_write_text(path, self.backend.to_str(pretty=True))

    # ---- facts ----------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    # ---- encoding -------------------------------------------------------------------------
    def tokenize(self, texts: Iterable[str], *, max_len: int | None = None,
                 strict: bool = False) -> list[Encoded]:
        """Tokenize without padding: word pieces, [CLS]/[SEP], truncation to ``max_len``.

        Args:
            texts: any iterable of strings (a list, a generator, a numpy array of strings); a
                single string is refused, to avoid encoding its characters one by one.
            max_len: the longest encoding kept, special tokens included; default ``self.max_len``.
            strict: raise ``TruncationError`` instead of cutting a text that is too long, and
                ``EmptyTextError`` for a text without a single token.
        """
        max_len = self.max_len if max_len is None else max_len
        if not is_int(max_len) or max_len <= self.n_special:
            raise ValueError(f"max_len must be an integer above {self.n_special}, got {max_len!r}.")
        texts = as_texts(texts)
        budget = max_len - self.n_special
        encoded, vocabulary = [], self.vocabulary
        # The library's own template adds [CLS]/[SEP], in one batched call without the character
        # offsets (nothing here reads them; the tokens come from the ids); a text over the limit
        # is encoded again without them, cut to the budget and given them after (post_process).
        for i, enc in enumerate(self.backend.encode_batch_fast(texts, add_special_tokens=True)):
            ids = enc.ids
            n_full = len(ids)
            truncated = n_full > max_len
            if truncated:
                if strict:
                    raise TruncationError(i, n_full, max_len)
                enc = self.backend.encode(texts[i], add_special_tokens=False)
                enc.truncate(budget)
                enc = self.backend.post_process(enc)
                ids = enc.ids
            if strict and n_full == self.n_special:
                raise EmptyTextError(i)
            encoded.append(Encoded(ids, enc.special_tokens_mask, n_full, truncated, vocabulary))
        return encoded

    def pad(self, encoded: Sequence[Encoded], length: int | None = None, rows: int | None = None
            ) -> BatchEncoding:
        """Stack encodings into (B, T) tensors, right-padded to ``length`` (default: the longest).

        ``rows``: make the tensors this many rows (at least one per encoding), the extra rows
        all padding (attention mask 0); the per-text lists keep one entry per encoding.
        """
        lengths = [len(e.ids) for e in encoded]
        width = max(lengths, default=0) if length is None else length
        if lengths and width < max(lengths):
            raise ValueError(f"cannot pad to {width}: the longest encoding has {max(lengths)} tokens.")
        if rows is not None and rows < len(encoded):
            raise ValueError(f"cannot pad {len(encoded)} encodings to {rows} rows.")
        n_rows = len(encoded) if rows is None else rows
        ids = np.full((n_rows, width), self.pad_id, dtype=np.int64)
        mask = np.zeros((n_rows, width), dtype=np.int64)
        for row, e in enumerate(encoded):
            ids[row, : lengths[row]] = e.ids
            mask[row, : lengths[row]] = 1
        return BatchEncoding(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            tokens=[e.tokens for e in encoded],
            special_tokens_mask=[e.special_tokens_mask for e in encoded],
            n_tokens=lengths,
            n_tokens_full=[e.n_tokens_full for e in encoded],
            truncated=[e.truncated for e in encoded],
        )

    def encode_batch(self, texts: Iterable[str], *, max_len: int | None = None,
                     padding: Literal["longest", "max_length"] = "longest",
                     strict: bool = False) -> BatchEncoding:
        """Tokenize, add [CLS]/[SEP], truncate to ``max_len``, pad to a rectangle.

        Args:
            texts, max_len, strict: as in ``tokenize``.
            padding: "longest" pads to the longest text in this batch; "max_length" pads
                every row to ``max_len``.
        """
        if padding not in ("longest", "max_length"):
            raise ValueError(f"padding must be 'longest' or 'max_length', got {padding!r}.")
        encoded = self.tokenize(texts, max_len=max_len, strict=strict)
        length = None if padding == "longest" else (self.max_len if max_len is None else max_len)
        return self.pad(encoded, length)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)


def as_texts(texts: Iterable[str]) -> list[str]:
    """``texts`` as a list of strings, each valid Unicode, or a ``TypeError``/``ValueError`` naming
    the first bad one."""
    if isinstance(texts, (str, bytes)):
        raise TypeError("texts must be a list (or another iterable) of strings, not a single "
                        f"{type(texts).__name__}: wrap a single text in a list.")
    try:
        texts = list(texts)
    except TypeError:
        raise TypeError(f"texts must be a list (or another iterable) of strings, got a "
                        f"{type(texts).__name__}.") from None
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"text {i} is a {type(text).__name__}, not a str.")
        if (at := lone_surrogate(text)) is not None:
            raise ValueError(f"text {i} is not valid Unicode (a lone surrogate at character {at}); it "
                             "cannot be tokenized.")
    return texts


def _deterministic_wordpiece(backend: tokenizers.Tokenizer, trainer, fit) -> tokenizers.Tokenizer:
    """Train ``backend`` with ``trainer`` so that the same text always gives the same file.

    The library's trainer numbers the continuation pieces ("##a", "##b", ...) in the order of a
    hash map, which changes from process to process, and those numbers break ties between
    merges of equal counts: the same corpus gave a different vocabulary each run
    (huggingface/tokenizers#1794). A first, cheap pass (no merges) finds the continuation
    pieces; the real pass receives them, sorted, ahead of the alphabet, so every id is fixed.
    They are passed as the trainer's special tokens, which makes them added tokens of the
    result; the WordPiece vocabulary is then rebuilt without that mark.
    """
    specials = [token.content for token in trainer.special_tokens]
    pieces, size = tokenizers.Tokenizer.from_str(backend.to_str()), trainer.vocab_size
    trainer.vocab_size = 0  # no merges: the vocabulary is the specials, the alphabet, the pieces
    fit(pieces, trainer)
    prefix = trainer.continuing_subword_prefix
    continuation = sorted(t for t in pieces.get_vocab() if t.startswith(prefix) and t not in specials)
    trainer.vocab_size, trainer.special_tokens = size, specials + continuation
    fit(backend, trainer)
    vocab = backend.get_vocab(with_added_tokens=False)
    model = models.WordPiece(vocab, unk_token=UNK, max_input_chars_per_word=100, continuing_subword_prefix=prefix)
    result = tokenizers.Tokenizer(model)
    result.normalizer, result.pre_tokenizer, result.decoder = backend.normalizer, backend.pre_tokenizer, backend.decoder
    result.add_special_tokens(specials)
    return result
