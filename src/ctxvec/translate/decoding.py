"""Decoding: context vectors -> a translation, one token at a time.

``greedy_decode`` takes the most probable token at every step; ``beam_search`` keeps the K
best prefixes of every sentence, ranked with GNMT's length penalty. Both run the decoder one
step per new token with its ``KVCache`` (``use_cache=False`` re-runs the whole prefix instead;
the tests hold the two equal).

Letters: B batch, S source length, V target vocabulary, K beams.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ctxvec.model.translator import Translator
from ctxvec.validation import is_int, is_real
from ctxvec.model.encoder import check_token_ids
from ctxvec.model.masks import check_attention_mask


@dataclass
class Translation:
    """What decoding returns, one entry per source sentence.

    Attributes:
        tokens: the generated ids of each sentence, without BOS, EOS and padding.
        sequences: (B, L) the generated ids, EOS included where produced, then pad_id.
        scores: (B,) greedy: the sum of the tokens' log-probabilities (EOS included); beam
            search: that sum divided by the length penalty.
        finished: (B,) True where the hypothesis ended with EOS (False: cut at max_length).
    """

    tokens: list[list[int]]
    sequences: torch.Tensor
    scores: torch.Tensor
    finished: torch.Tensor


def _translation(hypotheses: list[torch.Tensor], scores: torch.Tensor, eos_id: int,
                 pad_id: int) -> Translation:
    """hypotheses: B 1-D tensors of generated ids, each ending with EOS if finished."""
    finished = torch.tensor([h.numel() > 0 and int(h[-1]) == eos_id for h in hypotheses])
    sequences = nn.utils.rnn.pad_sequence(hypotheses, batch_first=True, padding_value=pad_id)  # (B, L)
    tokens = [h[:-1].tolist() if done else h.tolist() for h, done in zip(hypotheses, finished.tolist())]
    return Translation(tokens, sequences, scores, finished)


class _NextToken:
    """log P(next token | source, prefix) for a batch of growing prefixes.

    With the cache, each call feeds only the newest token (one step per token); without it,
    the whole prefix is run again. Both give the same numbers.
    """

    def __init__(self, model: Translator, memory: torch.Tensor, memory_mask: torch.Tensor,
                 use_cache: bool) -> None:
        self.model, self.memory, self.memory_mask = model, memory, memory_mask
        self.cache = model.decoder.stack.new_cache() if use_cache else None

    def __call__(self, prefix: torch.Tensor) -> torch.Tensor:
        """prefix: (N, t) -> (N, V) float32 log-probabilities."""
        if self.cache is None:
            new = prefix  # (N, t): the whole prefix again
        else:
            assert self.cache[0].length == prefix.shape[1] - 1, "the cache must hold all but the newest token"
            new = prefix[:, -1:]  # (N, 1): one step
        out = self.model.decoder(new, None, self.memory, self.memory_mask, self.cache)
        logits = self.model.output(out.last_hidden_state[:, -1])  # (N, V)
        return F.log_softmax(logits.float(), dim=-1)

    def reorder(self, index: torch.Tensor) -> None:
        if self.cache is not None:
            for layer_cache in self.cache:
                layer_cache.reorder(index)


def _prepare(model: Translator, src_ids: torch.Tensor, src_mask: torch.Tensor | None,
             ids: dict[str, int | None], max_length: int | None,
             ) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Check the arguments, encode the source: memory (B, S, D), mask (B, S), pad_id, max_length."""
    if not isinstance(model, Translator):
        raise TypeError(f"model must be a Translator, got {type(model).__name__}.")
    vocab = model.config.target_vocab_size
    if ids["pad_id"] is None:
        ids["pad_id"] = model.config.decoder.pad_id
    for name, value in ids.items():
        if not is_int(value) or not 0 <= value < vocab:
            raise ValueError(f"{name} must be a token id in [0, target vocabulary size={vocab}), "
                             f"got {value!r}.")
    limit = model.config.decoder.max_len
    max_length = limit if max_length is None else max_length
    if not is_int(max_length) or not 1 <= max_length <= limit:
        raise ValueError(f"max_length must be an integer in [1, max_len={limit}], got {max_length!r}.")
    check_token_ids(src_ids, model.config.encoder, "src_ids")
    mask = check_attention_mask(src_mask, tuple(src_ids.shape), src_ids.device)
    return model.encode(src_ids, mask), mask, ids["pad_id"], max_length  # type: ignore[return-value]


@torch.no_grad()
def greedy_decode(model: Translator, src_ids: torch.Tensor, src_mask: torch.Tensor | None = None, *,
                  bos_id: int, eos_id: int, pad_id: int | None = None, max_length: int | None = None,
                  use_cache: bool = True) -> Translation:
    """Translate a batch by taking the most probable token at every step.

    Args:
        src_ids, src_mask: (B, S) source ids and public mask (1 = real token).
        bos_id, eos_id: the target's start and end tokens; pad_id (default: the config's) fills
            a finished sentence's remaining steps.
        max_length: most generated tokens per sentence, EOS included (default: max_len).
        use_cache: one decoder step per token (True) or a re-run of the whole prefix.

    Call ``model.eval()`` first: decoding uses the model as it is (dropout included).
    """
    memory, mask, pad_id, max_length = _prepare(
        model, src_ids, src_mask, dict(bos_id=bos_id, eos_id=eos_id, pad_id=pad_id), max_length)
    B = src_ids.shape[0]
    next_token = _NextToken(model, memory, mask, use_cache)
    prefix = torch.full((B, 1), bos_id, dtype=torch.long, device=src_ids.device)  # (B, 1)
    scores = torch.zeros(B, device=src_ids.device)
    done = torch.zeros(B, dtype=torch.bool, device=src_ids.device)
    for _ in range(max_length):
        log_probs = next_token(prefix)  # (B, V)
        best = log_probs.argmax(dim=-1)  # (B,)
        scores += torch.where(done, 0.0, log_probs.gather(1, best[:, None]).squeeze(1))
        best = best.masked_fill(done, pad_id)
        prefix = torch.cat([prefix, best[:, None]], dim=1)  # (B, t + 1)
        done |= best == eos_id
        if bool(done.all()):
            break
    hypotheses = []
    for row in prefix[:, 1:]:
        eos = (row == eos_id).nonzero()
        hypotheses.append(row[: int(eos[0]) + 1] if eos.numel() else row)
    return _translation(hypotheses, scores, eos_id, pad_id)


def length_penalty(length: int, alpha: float) -> float:
    """GNMT's ((5 + length) / 6) ** alpha (Wu et al., 2016); 1 when alpha = 0."""
    return ((5 + length) / 6) ** alpha


@torch.no_grad()
def beam_search(model: Translator, src_ids: torch.Tensor, src_mask: torch.Tensor | None = None, *,
                bos_id: int, eos_id: int, pad_id: int | None = None, beam_size: int = 4,
                alpha: float = 0.6, max_length: int | None = None, use_cache: bool = True) -> Translation:
    """Translate a batch keeping the ``beam_size`` (K) best prefixes of every sentence.

    Hypotheses are ranked by log P(y | x) / lp(|y|), with GNMT's length penalty
    lp(n) = ((5 + n) / 6) ** alpha, n the generated tokens with EOS (alpha = 0: the plain sum).
    At each step the 2K best extensions of a sentence's K beams are ranked; an EOS among the
    top K finishes a hypothesis, the best K others go on. A sentence is done once no live beam
    can beat its best finished hypothesis (exact for alpha >= 0: log-probabilities only fall,
    the penalty only grows); at ``max_length`` its live beams count as unfinished hypotheses.
    With ``beam_size=1`` and ``alpha=0`` this is greedy decoding. Arguments as ``greedy_decode``.
    """
    if not is_int(beam_size) or beam_size < 1:
        raise ValueError(f"beam_size must be a positive integer, got {beam_size!r}.")
    if not is_real(alpha) or alpha < 0:
        raise ValueError(f"alpha (the length penalty's exponent) must be >= 0, got {alpha!r}.")
    memory, mask, pad_id, max_length = _prepare(
        model, src_ids, src_mask, dict(bos_id=bos_id, eos_id=eos_id, pad_id=pad_id), max_length)
    B, K, device = src_ids.shape[0], beam_size, src_ids.device
    # Every sentence's memory repeated for its K beams: rows b*K .. b*K + K-1 are sentence b.
    next_token = _NextToken(model, memory.repeat_interleave(K, dim=0),  # (B*K, S, D)
                            mask.repeat_interleave(K, dim=0), use_cache)  # (B*K, S)
    prefix = torch.full((B * K, 1), bos_id, dtype=torch.long, device=device)  # (B*K, 1)
    beam_scores = torch.full((B, K), float("-inf"), device=device)
    beam_scores[:, 0] = 0.0  # one live beam at the start, so the K beams are not K copies
    best: list[tuple[float, torch.Tensor] | None] = [None] * B  # best finished: (score, ids)
    done = [False] * B
    for step in range(max_length):
        log_probs = next_token(prefix)  # (B*K, V)
        V = log_probs.shape[-1]
        candidates = (beam_scores[:, :, None] + log_probs.view(B, K, V)).view(B, K * V)  # (B, K*V)
        top_scores, top_index = candidates.topk(min(2 * K, K * V), dim=1)  # (B, 2K)
        top_beam, top_token = top_index // V, top_index % V  # (B, 2K) each
        is_eos = top_token == eos_id
        # 1) an EOS among the top K ranks finishes a hypothesis
        for b, rank in (is_eos[:, :K] & top_scores[:, :K].isfinite()).nonzero().tolist():
            score = float(top_scores[b, rank]) / length_penalty(step + 1, alpha)
            if not done[b] and (best[b] is None or score > best[b][0]):
                ids = torch.cat([prefix[b * K + int(top_beam[b, rank]), 1:], top_token[b, rank, None]])
                best[b] = (score, ids)
        # 2) the best K extensions that are not EOS go on (each beam has one EOS: K are left)
        order = (~is_eos).float().argsort(dim=1, descending=True, stable=True)[:, :K]  # (B, K), by rank
        beam_scores = top_scores.masked_fill(is_eos, float("-inf")).gather(1, order)  # (B, K)
        source = (torch.arange(B, device=device)[:, None] * K + top_beam.gather(1, order)).flatten()  # (B*K,)
        prefix = torch.cat([prefix[source], top_token.gather(1, order).reshape(B * K, 1)], dim=1)
        next_token.reorder(source)
        # 3) done when even the best live beam, at its most favourable length, cannot win
        best_possible = (beam_scores.max(dim=1).values / length_penalty(max_length, alpha)).tolist()
        done = [done[b] or (best[b] is not None and best[b][0] >= best_possible[b]) for b in range(B)]
        if all(done):
            break
    penalty = length_penalty(prefix.shape[1] - 1, alpha)
    hypotheses, scores = [], []
    for b in range(B):
        pool = [best[b]] if best[b] is not None else []
        if not done[b]:  # cut at max_length: the live beams are unfinished hypotheses
            pool += [(s / penalty, prefix[b * K + k, 1:])
                     for k, s in enumerate(beam_scores[b].tolist()) if s > float("-inf")]
        score, ids = max(pool, key=lambda h: h[0])
        hypotheses.append(ids)
        scores.append(score)
    return _translation(hypotheses, torch.tensor(scores, device=device), eos_id, pad_id)
