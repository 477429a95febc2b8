"""ctxvec: raw words -> context-packed vectors with a Transformer encoder, one named step each.

tokenizer -> embedding (one-hot, token embedding, positions) -> attention -> layer
(Add & Norm, feed-forward) -> encoder (stack); and downstream, decoder -> decoding -> translation.
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
from ctxvec.decoder import DecoderLayer, DecoderStack, Seq2SeqConfig, Translator
from ctxvec.decoding import beam_search, greedy_decode
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
    "AttentionOutput", "BatchEncoding", "DecoderLayer", "DecoderStack", "EmbedFileResult",
    "Embeddings", "Encoder", "EncoderConfig", "EncoderLayer", "EncoderOutput", "EncoderStack",
    "FeedForward", "LearnedPositionalEncoding", "MultiHeadSelfAttention", "NonFiniteError",
    "Pipeline", "Pooling", "SentenceVectors", "Seq2SeqConfig", "SinusoidalPositionalEncoding",
    "TokenEmbedding", "TokenVectors", "Tokenizer", "Translator", "attention", "beam_search",
    "embed_file", "greedy_decode", "load", "one_hot", "save_pipeline", "set_threads",
    "sinusoid_table",
]
