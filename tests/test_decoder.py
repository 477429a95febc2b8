"""The decoder against PyTorch's nn.TransformerDecoder, its cache, and decoding."""

import itertools
import math

import pytest
import torch
from torch import nn

from ctxvec import EncoderConfig
from ctxvec.model.config import Seq2SeqConfig
from ctxvec.model.decoder import DecoderStack, KVCache
from ctxvec.model.translator import sequence_loss, Translator
from ctxvec.translate.decoding import beam_search, greedy_decode, length_penalty
from conftest import VARIANTS, random_batch, tiny_config

PAD, BOS, EOS = 0, 1, 2


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matrices gain nothing from threads and lose much on a busy machine (measured on
    2 shared cores: this file in 9 s with one thread, 60 s with two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def torch_decoder(d_model=32, nhead=4, d_ff=64, n_layers=2, norm_first=False, activation="relu",
                  final_norm=False, batch_first=True) -> nn.TransformerDecoder:
    layer = nn.TransformerDecoderLayer(d_model, nhead, d_ff, dropout=0.0, activation=activation,
                                       batch_first=batch_first, norm_first=norm_first)
    decoder = nn.TransformerDecoder(layer, n_layers, norm=nn.LayerNorm(d_model) if final_norm else None)
    for p in decoder.parameters():  # move the norms away from 1/0 so that they are really tested
        nn.init.normal_(p, std=0.1 if p.dim() > 1 else 0.5)
    return decoder




@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(f"{k}={v[k]}" for k in v))
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
@pytest.mark.parametrize("mode", ["train-dropout0", "eval"])
def test_from_torch_matches_pytorch(variant, batch_first, mode):
    ref = torch_decoder(**variant, batch_first=batch_first).train(mode != "eval")
    ours = DecoderStack.from_torch(ref).train(mode != "eval")
    x, memory = torch.randn(4, 9, 32), torch.randn(4, 7, 32)
    _, tgt_mask = random_batch(4, 9, 50, torch.Generator().manual_seed(1))
    _, memory_mask = random_batch(4, 7, 50, torch.Generator().manual_seed(2))
    causal = torch.ones(9, 9, dtype=torch.bool).triu(1)  # PyTorch: True = may NOT attend (the future)
    args = (x, memory) if batch_first else (x.transpose(0, 1), memory.transpose(0, 1))
    expected = ref(*args, tgt_mask=causal, tgt_is_causal=True, tgt_key_padding_mask=~tgt_mask.bool(),
                   memory_key_padding_mask=~memory_mask.bool())  # PyTorch: True = padding
    if not batch_first:
        expected = expected.transpose(0, 1)
    got = ours(x, memory, tgt_mask, memory_mask).last_hidden_state
    real = tgt_mask.bool()
    assert got.shape == x.shape
    assert expected[real].abs().max() > 0.1
    assert (got[real] - expected[real].detach()).abs().max() < 1e-5


def test_from_torch_reads_the_config():
    stack = DecoderStack.from_torch(torch_decoder(n_layers=3, norm_first=True, activation="gelu"))
    c = stack.config
    assert (c.d_model, c.n_heads, c.d_ff, c.n_layers, c.activation, c.norm_first, c.final_norm) == \
        (32, 4, 64, 3, "gelu", True, False)


def test_from_torch_refuses_what_it_cannot_copy():
    with pytest.raises(TypeError, match="nn.TransformerDecoder"):
        DecoderStack.from_torch(nn.Linear(3, 3))
    with pytest.raises(TypeError, match="nn.TransformerDecoder"):
        DecoderStack.from_torch(nn.TransformerEncoder(
            nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 1, enable_nested_tensor=False))
    layer = nn.TransformerDecoderLayer(16, 2, 32, batch_first=True, bias=False)
    with pytest.raises(ValueError, match="bias"):
        DecoderStack.from_torch(nn.TransformerDecoder(layer, 1))
    # A function, not nn.SiLU(): deep-copying a TransformerDecoderLayer (as nn.TransformerDecoder
    # does) silently turns a module activation into ReLU, in PyTorch's forward too.
    layer = nn.TransformerDecoderLayer(16, 2, 32, batch_first=True, activation=nn.functional.silu)
    with pytest.raises(ValueError, match="activation"):
        DecoderStack.from_torch(nn.TransformerDecoder(layer, 1))
    decoder = nn.TransformerDecoder(nn.TransformerDecoderLayer(16, 2, 32, batch_first=True), 1,
                                    norm=nn.RMSNorm(16))
    with pytest.raises(ValueError, match="norm"):
        DecoderStack.from_torch(decoder)


# ---- The model -----------------------------------------------------------------------------

def tiny_seq2seq(tgt_vocab_size=None, **changes) -> Seq2SeqConfig:
    tie = changes.pop("tie_embeddings", False)
    share = changes.pop("share_embeddings", False)
    n_decoder_layers = changes.pop("n_decoder_layers", None)
    return Seq2SeqConfig(tiny_config(**changes), n_decoder_layers=n_decoder_layers,
                         tgt_vocab_size=tgt_vocab_size, tie_embeddings=tie, share_embeddings=share)


def random_model(seed=0, **changes) -> Translator:
    """An untrained model with peaked, varied next-token distributions (a sterner test of decoding
    than near-uniform ones: ties are unlikely and hypotheses differ)."""
    torch.manual_seed(seed)
    model = Translator(tiny_seq2seq(**changes)).eval()
    with torch.no_grad():
        model.output.weight.normal_(std=0.5)
    return model


@pytest.fixture(params=[dict(), dict(norm_first=True, position="learned", n_decoder_layers=3)],
                ids=["post-norm", "pre-norm-learned"])
def model(request) -> Translator:
    return random_model(**request.param)


def source(batch=4, seq_len=9, seed=3):
    ids, mask = random_batch(batch, seq_len, 64, torch.Generator().manual_seed(seed))
    return ids.clamp(min=3) * mask, mask  # no BOS/EOS in the source: real tokens 3 .. 63


def test_config_ties_and_shares_embeddings():
    model = Translator(tiny_seq2seq(tie_embeddings=True, share_embeddings=True))
    assert model.output.weight is model.decoder.embeddings.tokens.weight
    assert model.decoder.embeddings.tokens is model.encoder.embeddings.tokens
    separate = Translator(tiny_seq2seq(tgt_vocab_size=20, tie_embeddings=True))
    assert separate.output.weight is separate.decoder.embeddings.tokens.weight
    assert separate.output.weight.shape == (20, 32)
    assert separate.encoder.embeddings.tokens.weight.shape == (64, 32)
    untied = Translator(tiny_seq2seq())
    assert untied.output.weight is not untied.decoder.embeddings.tokens.weight
    config = tiny_seq2seq(tgt_vocab_size=20, n_decoder_layers=1)
    assert Seq2SeqConfig.from_dict(config.to_dict()) == config
    assert len(Translator(config).decoder.stack.layers) == 1


@pytest.mark.parametrize("changes, message", [
    (dict(tgt_vocab_size=20, share_embeddings=True), "share_embeddings"),
    (dict(tgt_vocab_size=0), "tgt_vocab_size"),
    (dict(n_decoder_layers=0), "n_decoder_layers"),
    (dict(tgt_vocab_size=5, tgt_pad_id=5), "tgt_pad_id"),
    (dict(tie_embeddings="yes"), "tie_embeddings"),
    (dict(encoder={"d_model": 32}), "EncoderConfig"),
])
def test_config_errors_are_sentences(changes, message):
    values = dict(encoder=tiny_config())
    values.update(changes)
    with pytest.raises(ValueError, match=message):
        Seq2SeqConfig(**values)
    with pytest.raises(ValueError, match="unknown field"):
        Seq2SeqConfig.from_dict({"encoder": {}, "n_layers": 2})


def test_forward_shapes_and_eager_equals_fused(model):
    src, src_mask = source()
    tgt, tgt_mask = random_batch(4, 6, 64, torch.Generator().manual_seed(4))
    fused = model(src, src_mask, tgt, tgt_mask)
    eager = model(src, src_mask, tgt, tgt_mask, output_attentions=True)
    assert fused.logits.shape == (4, 6, 64) and fused.self_attentions is None
    real = tgt_mask.bool()
    assert (fused.logits[real] - eager.logits[real]).abs().max() < 1e-5
    self_attention, cross_attention = eager.self_attentions[0], eager.cross_attentions[0]
    assert self_attention.shape == (4, 4, 6, 6) and cross_attention.shape == (4, 4, 6, 9)
    assert torch.all(self_attention[..., torch.ones(6, 6).triu(1).bool()] == 0)  # causal
    assert torch.all(cross_attention[1:][~src_mask[1:, None, None, :].expand(-1, 4, 6, -1).bool()] == 0)


def test_future_and_padding_never_change_earlier_positions(model):
    src, src_mask = source()
    tgt, _ = random_batch(1, 7, 64)
    full = model(src[:1], src_mask[:1], tgt).logits
    changed = tgt.clone()
    changed[0, 4:] = (changed[0, 4:] + 1) % 64  # a different future
    assert torch.allclose(model(src[:1], src_mask[:1], changed).logits[0, :4], full[0, :4], atol=1e-5)
    padded = torch.cat([tgt, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 7), torch.zeros(1, 3)], dim=1).long()
    assert torch.allclose(model(src[:1], src_mask[:1], padded, mask).logits[0, :7], full[0], atol=1e-5)


def test_loss_is_label_smoothed_cross_entropy_over_real_tokens(model):
    src, src_mask = source()
    tgt, tgt_mask = random_batch(4, 6, 64, torch.Generator().manual_seed(5))
    loss = model.loss(src, src_mask, tgt, tgt_mask, label_smoothing=0.1)
    logits = model(src, src_mask, tgt[:, :-1], tgt_mask[:, :-1]).logits
    real = tgt_mask[:, 1:].bool()
    log_probs = logits[real].log_softmax(-1)
    nll = -log_probs.gather(1, tgt[:, 1:][real][:, None]).squeeze(1)
    expected = (0.9 * nll - 0.1 * log_probs.mean(-1)).mean()
    assert torch.allclose(loss, expected, atol=1e-5)
    garbage = tgt.masked_fill(~tgt_mask.bool(), 7)  # other ids at padding: the same loss
    assert torch.allclose(model.loss(src, src_mask, garbage, tgt_mask, label_smoothing=0.1), loss, atol=1e-6)
    model.train().loss(src, src_mask, tgt, tgt_mask).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# ---- The cache -----------------------------------------------------------------------------

def test_cached_steps_equal_the_full_prefix_at_every_position(model):
    src, src_mask = source()
    memory = model.encode(src, src_mask)
    tgt, _ = random_batch(4, 8, 64, torch.Generator().manual_seed(6))
    full = model.decoder(tgt, None, memory, src_mask).last_hidden_state  # (B, T, D)
    cache = model.decoder.stack.new_cache()
    assert all(isinstance(c, KVCache) and c.length == 0 for c in cache)
    for t in range(8):
        step = model.decoder(tgt[:, t:t + 1], None, memory, src_mask, cache).last_hidden_state
        assert (step[:, 0] - full[:, t]).abs().max() < 1e-5, f"position {t}"
        assert cache[0].length == t + 1
    memory_kv = cache[0].memory_key_value
    model.decoder(tgt[:, :1], None, memory, src_mask, cache)
    assert cache[0].memory_key_value is memory_kv  # computed once, reused at every step
    # several new tokens at once after a cached prefix: the same numbers again
    cache = model.decoder.stack.new_cache()
    model.decoder(tgt[:, :3], None, memory, src_mask, cache)
    rest = model.decoder(tgt[:, 3:], None, memory, src_mask, cache).last_hidden_state
    assert (rest - full[:, 3:]).abs().max() < 1e-5


# ---- Decoding ------------------------------------------------------------------------------

def run(decode, model, src, src_mask, **kwargs):
    return decode(model, src, src_mask, bos_id=BOS, eos_id=EOS, **kwargs)


@pytest.mark.parametrize("decode, extra", [(greedy_decode, {}), (beam_search, dict(beam_size=3))],
                         ids=["greedy", "beam"])
def test_cached_and_uncached_decoding_agree(model, decode, extra):
    src, src_mask = source()
    cached = run(decode, model, src, src_mask, max_length=12, use_cache=True, **extra)
    uncached = run(decode, model, src, src_mask, max_length=12, use_cache=False, **extra)
    assert cached.tokens == uncached.tokens
    assert torch.equal(cached.sequences, uncached.sequences)
    assert torch.allclose(cached.scores, uncached.scores, atol=1e-4)


def test_beam_size_one_is_greedy(model):
    src, src_mask = source()
    greedy = run(greedy_decode, model, src, src_mask, max_length=12)
    beam = run(beam_search, model, src, src_mask, max_length=12, beam_size=1, alpha=0.0)
    assert beam.tokens == greedy.tokens
    assert torch.equal(beam.finished, greedy.finished)
    assert torch.allclose(beam.scores, greedy.scores, atol=1e-4)


@pytest.mark.parametrize("decode, extra", [(greedy_decode, {}), (beam_search, dict(beam_size=3))],
                         ids=["greedy", "beam"])
def test_batched_decoding_equals_one_sentence_at_a_time(model, decode, extra):
    src, src_mask = source(batch=5)
    batched = run(decode, model, src, src_mask, max_length=10, **extra)
    for i in range(5):
        n = int(src_mask[i].sum())
        alone = run(decode, model, src[i:i + 1, :n], None, max_length=10, **extra)
        assert alone.tokens[0] == batched.tokens[i]
        assert torch.allclose(alone.scores[0], batched.scores[i], atol=1e-4)


@torch.no_grad()
def score_of(model, src, src_mask, generated, alpha):
    """log P(generated | src) / lp(len), by one teacher-forced forward pass."""
    tgt = torch.tensor([[BOS] + generated])
    log_probs = model(src, src_mask, tgt[:, :-1]).logits.log_softmax(-1)
    total = log_probs[0].gather(1, tgt[0, 1:, None]).sum()
    return float(total) / length_penalty(len(generated), alpha)


def test_scores_are_the_length_penalised_log_probabilities(model):
    src, src_mask = source(batch=2)
    for decode, extra in ((greedy_decode, dict(alpha=0.0)), (beam_search, dict(alpha=0.6, beam_size=3))):
        kwargs = {k: v for k, v in extra.items() if decode is beam_search or k != "alpha"}
        out = run(decode, model, src, src_mask, max_length=8, **kwargs)
        for i in range(2):
            ids = out.sequences[i][: len(out.tokens[i]) + int(out.finished[i])].tolist()
            expected = score_of(model, src[i:i + 1], src_mask[i:i + 1], ids, extra["alpha"])
            assert math.isclose(float(out.scores[i]), expected, abs_tol=1e-4)


@pytest.mark.parametrize("alpha", [0.0, 0.6, 2.0])
def test_a_beam_wide_enough_to_keep_everything_finds_the_exhaustive_best(alpha):
    """Target vocabulary {PAD, BOS, EOS, 3}, 3 steps: 40 hypotheses; K = 36 keeps all of them."""
    model = random_model(seed=1, tgt_vocab_size=4)
    with torch.no_grad():
        model.output.weight.normal_(std=2.0)
    src, src_mask = source(batch=1, seq_len=5)
    hypotheses = [list(h) + [EOS] for n in range(3) for h in itertools.product([0, 1, 3], repeat=n)]
    hypotheses += [list(h) for h in itertools.product([0, 1, 3], repeat=3)]
    best = max(hypotheses, key=lambda h: score_of(model, src, src_mask, h, alpha))
    out = run(beam_search, model, src, src_mask, max_length=3, beam_size=36, alpha=alpha)
    assert out.sequences[0][: len(best)].tolist() == best
    assert math.isclose(float(out.scores[0]), score_of(model, src, src_mask, best, alpha), abs_tol=1e-4)


class ForceToken(nn.Module):
    """Wraps the output projection: adds ``bias`` to one token's logit."""

    def __init__(self, output: nn.Module, token: int, bias: float) -> None:
        super().__init__()
        self.output, self.token, self.bias, self.calls = output, token, bias, 0

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        logits = self.output(hidden)
        logits[..., self.token] += self.bias
        return logits


@pytest.mark.parametrize("decode, extra", [(greedy_decode, {}), (beam_search, dict(beam_size=3))],
                         ids=["greedy", "beam"])
@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no-cache"])
def test_max_length_is_respected(model, decode, extra, use_cache):
    model.output = ForceToken(model.output, EOS, float("-inf"))  # never ends
    src, src_mask = source()
    out = run(decode, model, src, src_mask, max_length=5, use_cache=use_cache, **extra)
    assert out.sequences.shape == (4, 5)
    assert all(len(t) == 5 for t in out.tokens) and not out.finished.any()


@pytest.mark.parametrize("decode, extra", [(greedy_decode, {}), (beam_search, dict(beam_size=3))],
                         ids=["greedy", "beam"])
def test_eos_ends_a_hypothesis(model, decode, extra):
    src, src_mask = source()
    model.output = ForceToken(model.output, EOS, 100.0)  # EOS at once, for every sentence
    out = run(decode, model, src, src_mask, max_length=10, **extra)
    assert out.tokens == [[]] * 4 and out.finished.all()
    assert out.sequences.tolist() == [[EOS]] * 4
    assert model.output.calls == 1  # decoding stopped as soon as every sentence was done
    model.output.bias = 0.0
    out = run(decode, model, src, src_mask, max_length=10, **extra)
    for tokens, sequence, finished in zip(out.tokens, out.sequences.tolist(), out.finished.tolist()):
        assert EOS not in tokens
        n = len(tokens)
        assert sequence[:n] == tokens
        assert sequence[n:] == ([EOS] if finished else []) + [PAD] * (len(sequence) - n - finished)


# ---- A model that really learns ------------------------------------------------------------

def reverse_task(n, generator, vocab=10):
    """Sources of 2..5 tokens (ids 3..vocab-1); targets BOS + the source reversed + EOS."""
    lengths = torch.randint(2, 6, (n,), generator=generator)
    S = int(lengths.max())
    src_mask = (torch.arange(S)[None] < lengths[:, None]).long()  # (n, S)
    src = torch.randint(3, vocab, (n, S), generator=generator) * src_mask
    tgt = torch.zeros(n, S + 2, dtype=torch.long)
    for i, n_i in enumerate(lengths.tolist()):
        tgt[i, 0], tgt[i, 1:n_i + 1], tgt[i, n_i + 1] = BOS, src[i, :n_i].flip(0), EOS
    tgt_mask = (torch.arange(S + 2)[None] < (lengths + 2)[:, None]).long()
    return src, src_mask, tgt, tgt_mask


@pytest.mark.slow
def test_a_tiny_translator_learns_to_reverse():
    """200 steps of Adam on a 2 + 2 layer, 32-wide model (about 8 s): the decoder really reads
    the source. Measured: 195 of 200 held-out sentences exactly right with greedy decoding."""
    torch.manual_seed(0)
    config = Seq2SeqConfig(EncoderConfig(vocab_size=10, d_model=32, n_heads=4, d_ff=64, n_layers=2,
                                         dropout=0.0, max_len=16, norm_first=True))
    model = Translator(config)
    steps = 200
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(  # 10 steps of warm-up, then linear decay
        optimizer, lambda step: min(1.0, (step + 1) / 10) * (1 - step / steps))
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        loss = model.loss(*reverse_task(64, generator), label_smoothing=0.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    src, src_mask, tgt, tgt_mask = reverse_task(200, torch.Generator().manual_seed(99))
    expected = [row[1:int(n) - 1].tolist() for row, n in zip(tgt, tgt_mask.sum(1))]
    greedy = run(greedy_decode, model, src, src_mask, max_length=10)
    beam = run(beam_search, model, src, src_mask, max_length=10, beam_size=3)
    greedy_right = sum(a == b for a, b in zip(greedy.tokens, expected))
    beam_right = sum(a == b for a, b in zip(beam.tokens, expected))
    print(f"reverse task, exact sentences of 200: greedy {greedy_right}, beam {beam_right}")
    assert greedy_right >= 180 and beam_right >= 180
    assert greedy.finished.all()


# ---- Errors --------------------------------------------------------------------------------

def test_bad_inputs_give_clear_errors(model):
    src, src_mask = source()
    tgt = torch.tensor([[BOS, 5, 6]] * 4)
    with pytest.raises(TypeError, match="attention_mask"):
        model(src, src_mask, tgt, torch.ones(4, 3))  # a float mask is refused
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model(src, src_mask, tgt, torch.ones(4, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="only 0 and 1"):
        model(src, src_mask, tgt, torch.full((4, 3), 2))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(src, src_mask, torch.tensor([[BOS, 64, 6]] * 4))
    with pytest.raises(TypeError, match="integer"):
        model(src, src_mask, tgt.float())
    with pytest.raises(ValueError, match="batch"):
        model(src, src_mask, tgt[:2])
    with pytest.raises(ValueError, match="max_len"):
        model(src, src_mask, torch.full((4, 41), 5))
    with pytest.raises(ValueError, match="seq_len >= 2"):
        model.loss(src, src_mask, tgt[:, :1])
    with pytest.raises(ValueError, match="no real token"):
        nothing = torch.zeros(1, 2, dtype=torch.long)
        sequence_loss(torch.randn(1, 2, 5), nothing, nothing)
    with pytest.raises(ValueError, match="d_model"):
        model.decoder.stack(torch.randn(4, 3, 16), torch.randn(4, 9, 32))
    with pytest.raises(ValueError, match="cache has"):
        model.decoder.stack(torch.randn(4, 3, 32), torch.randn(4, 9, 32), cache=[KVCache()])


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(bos_id=64), ValueError, "bos_id"),
    (dict(eos_id=-1), ValueError, "eos_id"),
    (dict(pad_id=1.5), ValueError, "pad_id"),
    (dict(max_length=0), ValueError, "max_length"),
    (dict(max_length=41), ValueError, "max_length"),
    (dict(beam_size=0), ValueError, "beam_size"),
    (dict(alpha=-1.0), ValueError, "alpha"),
])
def test_bad_decoding_arguments_give_clear_errors(model, kwargs, error, message):
    src, src_mask = source()
    arguments = dict(bos_id=BOS, eos_id=EOS)
    arguments.update(kwargs)
    with pytest.raises(error, match=message):
        beam_search(model, src, src_mask, **arguments)
    if "beam_size" not in kwargs and "alpha" not in kwargs:
        with pytest.raises(error, match=message):
            greedy_decode(model, src, src_mask, **arguments)
    with pytest.raises(TypeError, match="Translator"):
        greedy_decode(nn.Linear(2, 2), src, src_mask, bos_id=BOS, eos_id=EOS)
    with pytest.raises(ValueError, match="attention_mask has shape"):
        greedy_decode(model, src, src_mask[:, :3], bos_id=BOS, eos_id=EOS)
