"""ctxvec: raw words -> context-packed vectors with a Transformer encoder, one named step each.

The package, bottom to top (imports only go downward):

- ``tokenizer`` (step 1) and ``model`` (steps 2-8, decoder, translator, pooling): the readable
  model, on padded (B, T, D) tensors;
- ``engine``: how the same model runs fast (packed tokens, oneDNN, batched attention, shape
  buckets, precision, threads), chosen once per forward pass through ``model.route``;
- ``files``, ``texts``, ``weights``: crash-safe files, reading texts, weights on disk;
- ``malloc``: the ``ctxvec`` command starts itself under jemalloc, first of all;
- ``train``, ``translate``, ``explain``: training, translation, the explain page;
- ``pipeline``, ``loading``, ``embed_file``: texts -> vectors, models by name, whole files;
- ``pairs``, ``evaluation``: sentence-pair files, and how well vectors follow human similarity;
- ``cli``: the ``ctxvec`` command.
"""

from ctxvec.malloc import run_command_under_jemalloc

run_command_under_jemalloc()  # the ctxvec command only, and before torch is imported (see malloc.py)

import ctxvec.engine  # noqa: F401  (registers the engine's fast route with the model)
from ctxvec.embed_file import EmbedFileResult, embed_file
from ctxvec.engine.runtime import set_threads
from ctxvec.evaluation import PairsEvaluation, evaluate_pairs
from ctxvec.loading import load, save_pipeline
from ctxvec.model.attention import AttentionOutput, MultiHeadSelfAttention, attention
from ctxvec.model.config import EncoderConfig, Seq2SeqConfig
from ctxvec.model.decoder import DecoderLayer, DecoderStack
from ctxvec.model.embedding import (
    Embeddings,
    LearnedPositionalEncoding,
    SinusoidalPositionalEncoding,
    TokenEmbedding,
    one_hot,
    sinusoid_table,
)
from ctxvec.model.encoder import Encoder, EncoderOutput, EncoderStack, NonFiniteError
from ctxvec.model.layer import EncoderLayer, FeedForward
from ctxvec.model.pooling import Pooling
from ctxvec.model.translator import Translator
from ctxvec.pipeline import Pipeline, SentenceVectors, TokenVectors
from ctxvec.tokenizer import BatchEncoding, Tokenizer
from ctxvec.translate.decoding import beam_search, greedy_decode

__version__ = "0.1.0"

__all__ = [
    "AttentionOutput", "BatchEncoding", "DecoderLayer", "DecoderStack", "EmbedFileResult",
    "Embeddings", "Encoder", "EncoderConfig", "EncoderLayer", "EncoderOutput", "EncoderStack",
    "FeedForward", "LearnedPositionalEncoding", "MultiHeadSelfAttention", "NonFiniteError",
    "PairsEvaluation", "Pipeline", "Pooling", "SentenceVectors", "Seq2SeqConfig", "SinusoidalPositionalEncoding",
    "TokenEmbedding", "TokenVectors", "Tokenizer", "Translator", "attention", "beam_search",
    "embed_file", "evaluate_pairs", "greedy_decode", "load", "one_hot", "save_pipeline", "set_threads",
    "sinusoid_table",
]
