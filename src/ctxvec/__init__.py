"""ctxvec: raw words -> context-packed vectors with a Transformer encoder, one named step each.

tokenizer -> embedding (one-hot, token embedding, positions) -> attention -> layer
(Add & Norm, feed-forward) -> encoder (stack).
"""

from ctxvec.attention import AttentionOutput, MultiHeadSelfAttention, attention
from ctxvec.config import EncoderConfig
from ctxvec.embedding import (
    Embeddings,
    LearnedPositionalEncoding,
    SinusoidalPositionalEncoding,
    TokenEmbedding,
    one_hot,
    sinusoid_table,
)
from ctxvec.embedfile import EmbedFileResult, embed_file
from ctxvec.encoder import Encoder, EncoderOutput, EncoderStack, NonFiniteError
from ctxvec.layer import EncoderLayer, FeedForward
from ctxvec.models import load, save_pipeline
from ctxvec.pipeline import Pipeline, SentenceVectors, TokenVectors
from ctxvec.pooling import Pooling
from ctxvec.runtime import set_threads
from ctxvec.tokenizer import BatchEncoding, Tokenizer

__version__ = "0.1.0"

__all__ = [
    "AttentionOutput", "BatchEncoding", "EmbedFileResult", "Embeddings", "Encoder", "EncoderConfig", "EncoderLayer",
    "EncoderOutput", "EncoderStack", "FeedForward", "LearnedPositionalEncoding",
    "MultiHeadSelfAttention", "NonFiniteError", "Pipeline", "Pooling", "SentenceVectors", "SinusoidalPositionalEncoding",
    "TokenEmbedding", "TokenVectors", "Tokenizer", "attention", "embed_file", "load", "one_hot",
    "save_pipeline", "set_threads", "sinusoid_table",
]
