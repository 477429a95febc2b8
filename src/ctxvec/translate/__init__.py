"""Translation, the seed's downstream: parallel data (``data``), training (``trainer``), decoding
(``decoding``: greedy and beam search with a cache), and a trained translator as a folder
(``translator``)."""

from ctxvec.translate.translator import TranslatorPipeline, load_translator

__all__ = ["TranslatorPipeline", "load_translator"]
