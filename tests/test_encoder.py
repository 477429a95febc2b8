"""The encoder against PyTorch's nn.TransformerEncoder, and the behaviours its users miss."""

import pytest
import torch
from torch import nn

from ctxvec import Encoder, EncoderConfig, EncoderStack
from conftest import VARIANTS, random_batch, tiny_config


def torch_encoder(d_model=32, nhead=4, d_ff=64, n_layers=2, norm_first=False, activation="relu",
                  final_norm=False, dropout=0.0) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(d_model, nhead, d_ff, dropout=dropout, activation=activation,
                                       batch_first=True, norm_first=norm_first)
    norm = nn.LayerNorm(d_model) if final_norm else None
    # PyTorch warns that nested tensors are unused with norm_first; they only exist for post-norm.
    encoder = nn.TransformerEncoder(layer, n_layers, norm=norm, enable_nested_tensor=not norm_first)
    for p in encoder.parameters():  # move the norms away from 1/0 so that they are really tested
        nn.init.normal_(p, std=0.1 if p.dim() > 1 else 0.5)
    return encoder


# PyTorch's own fast path warns about its prototype nested tensors; that warning is the
# reference's, not ctxvec's (ctxvec's tests otherwise turn every warning into an error).
reference_warnings = pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning")


def max_real_diff(a, b, mask):
    real = mask.bool()
    return (a[real] - b[real]).abs().max().item()




@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(f"{k}={v[k]}" for k in v))
@pytest.mark.parametrize("mode", ["train-dropout0", "eval", "fast-path"])
@reference_warnings
def test_from_torch_matches_pytorch(variant, mode, monkeypatch):
    ref = torch_encoder(**variant)
    ours = EncoderStack.from_torch(ref)
    x = torch.randn(4, 10, 32)
    _, mask = random_batch(4, 10, 50)
    fast_calls = []
    if mode == "train-dropout0":
        ref.train(), ours.train()
        expected = ref(x, src_key_padding_mask=~mask.bool())
    else:
        ref.eval(), ours.eval()
        if mode == "fast-path":
            fused = torch._transformer_encoder_layer_fwd
            monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd",
                                lambda *a, **k: fast_calls.append(1) or fused(*a, **k))
            with torch.inference_mode():
                expected = ref(x, src_key_padding_mask=~mask.bool()).clone()
            assert len(fast_calls) == len(ref.layers), "PyTorch did not take its fast path"
        else:
            expected = ref(x, src_key_padding_mask=~mask.bool())
    got = ours(x, mask).last_hidden_state
    assert got.shape == x.shape
    assert max_real_diff(got, expected.detach(), mask) < 1e-5


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(f"{k}={v[k]}" for k in v))
@pytest.mark.parametrize("seq_len", [10, 260], ids=["short", "long"])
@reference_warnings
def test_inference_route_matches_pytorch(variant, seq_len):
    """At inference on a CPU: oneDNN linears on bucketed packed rows, batched attention for short
    sequences and the fused kernel for long ones (ctxvec.engine: linear, attention, route)."""
    ref = torch_encoder(**variant).eval()
    ours = EncoderStack.from_torch(ref).eval()
    x = torch.randn(5, seq_len, 32)
    _, mask = random_batch(5, seq_len, 50)
    with torch.no_grad():
        expected = ref(x, src_key_padding_mask=~mask.bool())
    with torch.inference_mode():
        got = ours(x, mask).last_hidden_state
        full = ours(x).last_hidden_state  # no padding: packed into buckets all the same
    assert max_real_diff(got, expected, mask) < 1e-5
    assert torch.all(got[~mask.bool()] == 0)
    with torch.no_grad():
        assert (full - ref(x)).abs().max().item() < 1e-5


@reference_warnings
def test_seed_config_matches_pytorch_fast_path():
    """The full seed config (512/8/1024/12, post-norm, ReLU): the figure in the closing note."""
    ref = nn.TransformerEncoder(nn.TransformerEncoderLayer(512, 8, 1024, dropout=0.1, batch_first=True),
                                num_layers=12).eval()
    ours = EncoderStack.from_torch(ref).eval()
    assert ours.config == EncoderConfig(final_norm=False).replace(vocab_size=ours.config.vocab_size)
    x = torch.randn(3, 24, 512)
    _, mask = random_batch(3, 24, 50)
    with torch.inference_mode():
        expected = ref(x, src_key_padding_mask=~mask.bool())
        got = ours(x, mask).last_hidden_state
    diff = max_real_diff(got, expected, mask)
    print(f"seed config, max abs diff to nn.TransformerEncoder fast path: {diff:.2e}")
    assert diff < 1e-5


def test_from_torch_refuses_what_it_cannot_copy():
    with pytest.raises(TypeError):
        EncoderStack.from_torch(nn.Linear(3, 3))
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, bias=False)
    with pytest.raises(ValueError, match="bias"):
        EncoderStack.from_torch(nn.TransformerEncoder(layer, 1, enable_nested_tensor=False))
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, activation=nn.SiLU())
    with pytest.raises(ValueError, match="activation"):
        EncoderStack.from_torch(nn.TransformerEncoder(layer, 1, enable_nested_tensor=False))


# ---- Behaviour the peers get wrong (../shared/PITFALLS.md) -----------------------------------

@pytest.fixture(params=[False, True], ids=["post-norm", "pre-norm"])
def encoder(request) -> Encoder:
    return Encoder(tiny_config(norm_first=request.param)).eval()


@pytest.mark.parametrize("attentions", [False, True], ids=["fused", "eager"])
def test_padding_never_changes_real_token_vectors(encoder, attentions):
    ids, _ = random_batch(1, 7, 64)
    alone = encoder(ids, output_attentions=attentions).last_hidden_state
    for extra in (1, 5, 20):
        padded = torch.cat([ids, torch.zeros(1, extra, dtype=torch.long)], dim=1)
        mask = torch.cat([torch.ones(1, 7), torch.zeros(1, extra)], dim=1).long()
        longer = torch.randint(1, 64, (1, 7 + extra))
        batch = encoder(torch.cat([padded, longer]), torch.cat([mask, torch.ones_like(mask)]),
                        output_attentions=attentions).last_hidden_state
        assert torch.allclose(batch[0, :7], alone[0], atol=1e-5)


@pytest.mark.parametrize("attentions", [False, True], ids=["fused", "eager"])
def test_all_padding_row_gives_finite_outputs_and_gradients(encoder, attentions):
    encoder.train()
    ids, mask = random_batch(3, 6, 64)
    mask[1] = 0
    out = encoder(ids, mask, output_attentions=attentions)
    assert torch.isfinite(out.last_hidden_state).all()
    (out.last_hidden_state * mask[..., None]).sum().backward()
    for name, p in encoder.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name
    if attentions:
        real_rows = out.attentions[0][0]
        assert torch.allclose(real_rows.sum(-1), torch.ones_like(real_rows.sum(-1)))


def test_output_shape_equals_input_shape_even_when_a_column_is_all_padding(encoder):
    ids, mask = random_batch(3, 9, 64)
    mask[:, -2:] = 0  # padding in every row (PyTorch's fast path drops these columns)
    mask[0, :] = 1
    mask[0, -2:] = 0
    out = encoder(ids, mask).last_hidden_state
    assert out.shape == (3, 9, 32)


def test_eval_no_grad_inference_and_train_without_dropout_agree(encoder):
    ids, mask = random_batch(3, 8, 64)
    reference = encoder.eval()(ids, mask).last_hidden_state.detach()
    with torch.no_grad():
        no_grad = encoder(ids, mask).last_hidden_state
    with torch.inference_mode():
        inference = encoder(ids, mask).last_hidden_state
    trained = encoder.train()(ids, mask).last_hidden_state.detach()  # dropout is 0 in tiny_config
    real = mask.bool()
    for other in (no_grad, inference, trained):
        assert torch.allclose(other[real], reference[real], atol=1e-6)


def test_hidden_states_and_attentions_only_when_asked(encoder):
    ids, mask = random_batch(2, 5, 64)
    plain = encoder(ids, mask)
    assert plain.hidden_states is None and plain.attentions is None
    full = encoder(ids, mask, output_hidden_states=True, output_attentions=True)
    assert len(full.hidden_states) == encoder.config.n_layers + 1
    assert len(full.attentions) == encoder.config.n_layers
    assert full.attentions[0].shape == (2, 4, 5, 5)
    assert torch.equal(full.hidden_states[-1], full.last_hidden_state)
    assert torch.allclose(full.last_hidden_state, plain.last_hidden_state, atol=1e-6)
    real = mask.bool()
    sums = full.attentions[1].sum(-1)  # (B, H, T)
    assert torch.allclose(sums[real[:, None, :].expand_as(sums)], torch.tensor(1.0), atol=1e-6)


@pytest.mark.parametrize("make, error, words", [
    (lambda ids, m: (ids.float(), m), TypeError, "integer tensor"),
    (lambda ids, m: (ids[0], m), ValueError, r"input_ids\[None\]"),
    (lambda ids, m: (ids + 1000, m), ValueError, "outside the vocabulary"),
    (lambda ids, m: (ids - 1000, m), ValueError, "outside the vocabulary"),
    (lambda ids, m: (ids, m.float()), TypeError, "float mask is refused"),
    (lambda ids, m: (ids, m[:, :-1]), ValueError, "must match"),
    (lambda ids, m: (ids, m.T), ValueError, "must match"),
    (lambda ids, m: (ids, m * 2), ValueError, "only 0 and 1"),
    (lambda ids, m: (torch.zeros(2, 41, dtype=torch.long), None), ValueError, "exceeds max_len=40"),
    (lambda ids, m: (ids[:, :0], None), ValueError, "seq_len 0"),
])
def test_bad_inputs_are_clear_errors(encoder, make, error, words):
    ids, mask = random_batch(2, 6, 64)
    bad_ids, bad_mask = make(ids, mask)
    with pytest.raises(error, match=words):
        encoder(bad_ids, bad_mask)


@pytest.mark.parametrize("dtype", [torch.bool, torch.int32, torch.int64, torch.uint8])
def test_mask_dtypes_that_mean_the_same_give_the_same_result(encoder, dtype):
    ids, mask = random_batch(3, 8, 64)
    expected = encoder(ids, mask).last_hidden_state
    assert torch.equal(encoder(ids, mask.to(dtype)).last_hidden_state, expected)


@pytest.mark.parametrize("position", ["sinusoidal", "learned"])
def test_embeddings_are_learned_by_backprop(position):
    torch.manual_seed(1)
    config = tiny_config(position=position, n_layers=1)
    encoder = Encoder(config)
    head = nn.Linear(32, 64)
    ids, mask = random_batch(8, 6, 64)
    before = encoder.embeddings.tokens.weight.detach().clone()
    optimizer = torch.optim.Adam([*encoder.parameters(), *head.parameters()], lr=1e-2)
    losses = []
    for _ in range(20):  # predict each token's own id from its context vector
        logits = head(encoder(ids, mask).last_hidden_state)
        loss = nn.functional.cross_entropy(logits[mask.bool()], ids[mask.bool()])
        optimizer.zero_grad()
        loss.backward()
        assert encoder.embeddings.tokens.weight.grad.abs().sum() > 0
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert not torch.allclose(encoder.embeddings.tokens.weight, before)


def test_default_encoder_is_the_seed_with_no_warnings(recwarn):
    encoder = Encoder(EncoderConfig()).eval()
    n_params = sum(p.numel() for p in encoder.stack.parameters())
    assert n_params == 12 * (4 * 512 * 512 + 4 * 512 + 2 * 512 * 1024 + 1024 + 512 + 4 * 512)
    with torch.inference_mode():
        out = encoder(torch.randint(0, 8000, (2, 16)), torch.ones(2, 16, dtype=torch.long))
    assert out.last_hidden_state.shape == (2, 16, 512)
    assert len(recwarn) == 0


def test_padding_positions_are_skipped_and_zero(encoder):
    ids, mask = random_batch(3, 8, 64)
    out = encoder(ids, mask, output_hidden_states=True)
    pad = ~mask.bool()
    assert pad.any()
    assert torch.all(out.last_hidden_state[pad] == 0)
    assert all(torch.all(h[pad] == 0) for h in out.hidden_states[1:])


def test_token_packing_round_trip():
    from ctxvec.engine.packing import TokenPacking

    _, mask = random_batch(4, 6, 10)
    packing = TokenPacking.from_mask(mask.bool())
    x = torch.randn(4, 6, 3) * mask[..., None]
    packed = packing.pack(x)
    assert packed.shape == (int(mask.sum()), 3)
    assert torch.equal(packing.unpack(packed), x)


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(f"{k}={v[k]}" for k in v))
@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
@pytest.mark.parametrize("every_real", [False, True], ids=["some", "every-real-token"])
def test_positions_give_the_full_output_at_those_positions(variant, padded, every_real):
    """Some positions, or every real token (the real rows as the route holds them, nothing
    skipped: what a pipeline pools from), on the engine's route and on training's."""
    encoder = Encoder(tiny_config(**variant)).eval()
    ids, mask = random_batch(4, 9, 64, min_len=2)
    if not padded:
        mask = torch.ones_like(mask)
    positions = mask.bool() if every_real else (torch.rand(4, 9) < 0.3) & mask.bool()
    positions[0, 0] = True
    full = encoder(ids, mask).last_hidden_state
    chosen = encoder(ids, mask, positions=positions).last_hidden_state
    assert chosen.shape == (int(positions.sum()), 32)
    assert (chosen - full[positions]).abs().max().item() < 1e-6
    # gradients flow the same way too (training, dropout 0)
    encoder.train()
    encoder(ids, mask, positions=positions).last_hidden_state.sum().backward()
    grads = [p.grad.clone() for p in encoder.parameters()]
    encoder.zero_grad()
    encoder(ids, mask).last_hidden_state[positions].sum().backward()
    for a, p in zip(grads, encoder.parameters()):
        assert torch.allclose(a, p.grad, atol=1e-6)


def test_bad_positions_are_clear_errors(encoder):
    ids, mask = random_batch(2, 6, 64, min_len=2)
    mask[1, -1] = 0
    with pytest.raises(ValueError, match="padding position"):
        encoder(ids, mask, positions=torch.ones(2, 6, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool tensor"):
        encoder(ids, mask, positions=mask)
    with pytest.raises(ValueError, match="must match"):
        encoder(ids, mask, positions=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="cannot be combined"):
        encoder(ids, mask, positions=mask.bool(), output_hidden_states=True)


# ---- the route: the readable model and the engine, one seam -----------------------------------

@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(f"{k}={v[k]}" for k in v))
@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
def test_the_plain_route_and_the_engine_give_the_same_numbers(variant, grad):
    """The model read alone (padded tensors, nn.Linear, PyTorch's attention) and run by the engine
    (packed rows, oneDNN, the batched attention) compute the same vectors."""
    from ctxvec.model.route import Route

    encoder = Encoder(tiny_config(**variant)).eval()
    ids, mask = random_batch(4, 11, 64)
    with torch.set_grad_enabled(grad):
        fast = encoder(ids, mask)
        plain = encoder(ids, mask, route=Route(mask.bool()))
    assert fast.route != plain.route and plain.route.startswith("padded: the plain route")
    assert max_real_diff(fast.last_hidden_state, plain.last_hidden_state, mask) < 1e-5
    assert torch.all(plain.last_hidden_state[~mask.bool()] == 0)


def test_the_route_is_chosen_once_per_forward_and_says_why(caplog):
    import logging

    encoder = Encoder(tiny_config()).eval()
    ids, mask = random_batch(3, 9, 64)
    with caplog.at_level(logging.DEBUG, logger="ctxvec.model.encoder"), torch.inference_mode():
        padded = encoder(ids, mask)
    assert [r.getMessage() for r in caplog.records] == [f"encoder route: {padded.route}"]  # once, not per layer
    assert padded.route.startswith("packed: ") and f"{int(mask.sum())} of 27 tokens are real" in padded.route
    encoder.train()
    full = encoder(ids, torch.ones_like(mask))
    assert full.route.startswith("padded: ") and "gradients are wanted" in full.route


def test_autocast_without_gradients_runs_the_linear_autocast_asks_for():
    """Before: the route chose oneDNN from the fp32 input, and bf16 activations met fp32 weights
    (a masked-LM's evaluation under bf16 autocast crashed)."""
    encoder = Encoder(tiny_config()).eval()
    ids, mask = random_batch(3, 9, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = encoder(ids, mask)
    assert torch.isfinite(out.last_hidden_state).all() and "autocast to bfloat16" in out.route


def test_a_partly_frozen_encoder_still_trains_its_other_layers():
    """Before: the route looked at the first layer's weight only, and ran the later layers by
    oneDNN, which has no backward."""
    encoder = Encoder(tiny_config())
    for p in [*encoder.embeddings.parameters(), *encoder.stack.layers[0].parameters()]:
        p.requires_grad_(False)
    ids, mask = random_batch(3, 9, 64)
    out = encoder(ids, mask)
    out.last_hidden_state.sum().backward()
    grad = encoder.stack.layers[1].attention.qkv.weight.grad
    assert grad is not None and grad.abs().sum() > 0 and "gradients are wanted" in out.route


def test_a_route_made_for_another_mask_is_refused():
    from ctxvec.model.route import Route

    encoder = Encoder(tiny_config()).eval()
    ids, mask = random_batch(3, 9, 64)
    with pytest.raises(ValueError, match="route was made for another attention_mask"):
        encoder(ids, mask, route=Route())
    assert torch.equal(encoder(ids, mask, route=Route(mask.bool())).last_hidden_state,
                       encoder(ids, mask, route=Route(mask.bool())).last_hidden_state)


def test_a_layer_called_on_its_own_takes_its_key_mask():
    from ctxvec.model.masks import key_mask_from

    layer = Encoder(tiny_config()).stack.layers[0].eval()
    x = torch.randn(2, 6, 32)
    real = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    out = layer(x, key_mask_from(real)).hidden_state
    x2 = x.clone()
    x2[1, 4:] = 100.0  # padding: attended by nothing
    assert torch.allclose(layer(x2, key_mask_from(real)).hidden_state[real], out[real], atol=1e-6)
