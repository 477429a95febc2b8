"""Translation, the seed's downstream: parallel data (``data``), training (``trainer``), decoding
(``decoding``: greedy and beam search with a cache), a trained translator and its folder
(``pipeline``), and BLEU/chrF (``scores``)."""

from ctxvec.translate.pipeline import TranslatorPipeline, load_translator

__all__ = ["TranslatorPipeline", "load_translator"]
