"""ctxvec.engine.native: the compiled kernels (self-attention over packed rows, the bf16 GELU table, LayerNorm)."""

import fnmatch
import importlib
import math
import platform
import shutil
import tomllib
from pathlib import Path

import pytest
import torch

from conftest import random_batch, tiny_config
from ctxvec import Encoder, MultiHeadSelfAttention
from ctxvec.engine import native
from ctxvec.engine.linear import linear, onednn_dtype, onednn_linear
from ctxvec.engine.packing import TokenPacking
from ctxvec.engine.route import PackedRoute, choose, route_for
from ctxvec.model.masks import key_mask_from
from ctxvec.model.route import Route

route_module = importlib.import_module("ctxvec.engine.route")
attention_module = importlib.import_module("ctxvec.engine.attention")

# Where a compiler is, the kernel must build: a build broken by a change fails here, not skips.
pytestmark = pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64") or not (shutil.which("c++") or shutil.which("g++")),
    reason="the native kernel is built for x86-64 with a C++ compiler")


def _qkv(lengths, heads, head_width, dtype, spare=3, seed=0):
    """Packed rows of random Q, K, V for sequences of these lengths, with spare rows after them."""
    generator = torch.Generator().manual_seed(seed)
    rows = sum(lengths) + spare
    qkv = (2 * torch.randn(rows, 3 * heads * head_width, generator=generator)).to(dtype)
    starts = torch.tensor([0, *lengths]).cumsum(0)
    return qkv, starts


def _reference(qkv, starts, heads, absolute=False):
    """softmax(Q·Kᵀ / √Dh) · V per sequence and head, in float64 from the same inputs
    (``absolute``: softmax(Q·Kᵀ / √Dh) · |V|)."""
    D = qkv.shape[1] // 3
    q, k, v = qkv.double().split(D, dim=1)
    out = torch.zeros(qkv.shape[0], D, dtype=torch.float64)
    for first, end in zip(starts[:-1].tolist(), starts[1:].tolist()):
        if end == first:
            continue
        qs, ks, vs = (t[first:end].view(end - first, heads, -1).transpose(0, 1) for t in (q, k, v))
        weights = (qs @ ks.transpose(1, 2) / math.sqrt(qs.shape[-1])).softmax(-1)
        out[first:end] = (weights @ (vs.abs() if absolute else vs)).transpose(0, 1).reshape(end - first, D)
    return out


def _rule(limits):
    return lambda dtype: limits.get(dtype, 0)


@pytest.fixture
def kernel_rule(monkeypatch):
    """The route's rule as on a CPU where the kernel is measured (the rule is per CPU kind)."""
    monkeypatch.setattr(route_module, "native_max_tokens", _rule({torch.float32: 128, torch.bfloat16: 112}))


@pytest.fixture(params=[False, True], ids=["vectors", "AMX tiles"])
def on_tiles(request):
    """The bf16 kernel on 16-lane vectors, and on AMX tiles where the CPU and system give them."""
    if request.param and not native.tiles():
        pytest.skip("no AMX tiles here (the CPU has none, or the system does not grant them)")
    return request.param


def _within_bf16(out, qkv, starts, heads, on_tiles):
    """bf16 inputs, fp32 arithmetic, one rounding to bf16 at the end: within bf16's unit
    roundoff (2^-8 relative: half a unit in the last place at the bottom of a binade) of the
    exact result, plus fp32's own error; on tiles, P·V from probabilities rounded to bf16 adds
    up to 2^-8 of the sum of |P| · |V| (a cancelling output can be small beside it)."""
    expected = _reference(qkv, starts, heads)
    bound = 2**-8 * expected.abs() + 1e-5
    if on_tiles:
        bound += 2**-8 * _reference(qkv, starts, heads, absolute=True)
    return ((out.double() - expected).abs() <= bound).all()


@pytest.fixture
def counted(monkeypatch):
    """The kernel's calls, counted."""
    calls = []
    kernel = native.packed_attention
    monkeypatch.setattr(native, "packed_attention", lambda *a: calls.append(1) or kernel(*a))
    return calls


def test_it_builds_here():
    assert native.available() is None
    assert native.max_tokens() == 256


def test_every_length_up_to_the_longest_fp32():
    """Each block count has its own kernel: every sequence length from 1 to 256 against float64."""
    lengths = list(range(1, native.max_tokens() + 1))
    qkv, starts = _qkv(lengths, 1, 32, torch.float32, spare=0)
    assert (native.packed_attention(qkv, starts, 1).double() - _reference(qkv, starts, 1)).abs().max() < 1e-5


def test_every_length_up_to_the_longest_bf16(on_tiles):
    """bf16 on vectors: within half a unit in the last place of the exact value (rounded once; a
    second rounding would err by up to a whole unit), plus fp32's error; on tiles, that plus the
    probabilities' rounding (``_within_bf16``)."""
    lengths = list(range(1, native.max_tokens() + 1))
    qkv, starts = _qkv(lengths, 1, 32, torch.bfloat16, spare=0)
    out = native.packed_attention(qkv, starts, 1, on_tiles).double()
    expected = _reference(qkv, starts, 1)
    half_ulp = 2.0 ** (torch.floor(torch.log2(expected.abs().clamp_min(2**-100))) - 8)
    # (fp32's error is absolute, as the fp32 test bounds it: outputs near 0 are sums of terms of
    # either sign, |v| < 10)
    bound = half_ulp + 1e-5 + (2**-8 * _reference(qkv, starts, 1, absolute=True) if on_tiles else 0)
    assert ((out - expected).abs() <= bound).all()


@pytest.mark.parametrize("lengths", [[1], [16, 17, 15], [5, 0, 40], [100, 3], [256]], ids=str)
@pytest.mark.parametrize("head_width", [32, 64])
def test_fp32_equals_attention_per_sequence(lengths, head_width):
    qkv, starts = _qkv(lengths, 2, head_width, torch.float32)
    out = native.packed_attention(qkv, starts, 2)
    expected = _reference(qkv, starts, 2)
    assert out.dtype == torch.float32 and out.shape == expected.shape
    assert (out.double() - expected).abs().max() < 1e-5
    assert (out[sum(lengths):] == 0).all()  # rows of no sequence


@pytest.mark.parametrize("lengths", [[1], [16, 17, 15], [5, 0, 40], [31, 32, 33], [100, 3], [256]], ids=str)
@pytest.mark.parametrize("head_width", [32, 64])
def test_bf16_is_rounded_once_from_fp32_math(lengths, head_width, on_tiles):
    qkv, starts = _qkv(lengths, 2, head_width, torch.bfloat16)
    out = native.packed_attention(qkv, starts, 2, on_tiles)
    assert out.dtype == torch.bfloat16
    assert _within_bf16(out, qkv, starts, 2, on_tiles)
    assert (out[sum(lengths):] == 0).all()  # rows of no sequence


def test_tiles_run_by_default_for_bf16_where_they_are_granted(monkeypatch):
    """``use_tiles=None`` takes the tiles where ``tiles()``, the vectors elsewhere; True where
    there are none is refused; fp32 never runs on them."""
    qkv, starts = _qkv([40, 9], 2, 32, torch.bfloat16)
    default = native.packed_attention(qkv, starts, 2)
    assert torch.equal(default, native.packed_attention(qkv, starts, 2, native.tiles()))
    monkeypatch.setattr(native, "tiles", lambda: False)
    assert torch.equal(native.packed_attention(qkv, starts, 2), native.packed_attention(qkv, starts, 2, False))
    with pytest.raises(native.NativeUnavailable, match="no AMX tiles"):
        native.packed_attention(qkv, starts, 2, True)
    with pytest.raises(native.NativeUnavailable, match="no AMX tiles for torch.float32"):
        native.packed_attention(qkv.float(), starts, 2, True)


@pytest.mark.parametrize("dtype, tiles", [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)],
                         ids=["fp32", "bf16", "bf16 on tiles"])
def test_threads_give_the_same_numbers(dtype, tiles):
    if tiles and not native.tiles():
        pytest.skip("no AMX tiles here")
    qkv, starts = _qkv([30, 7, 64, 1, 12, 200], 4, 32, dtype)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native.packed_attention(qkv, starts, 4, tiles)
        torch.set_num_threads(2)
        two = native.packed_attention(qkv, starts, 4, tiles)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


@pytest.mark.parametrize("dtype, tiles", [(torch.float32, False), (torch.bfloat16, True)], ids=["fp32", "bf16 on tiles"])
def test_rows_may_be_a_view_of_wider_rows(dtype, tiles):
    if tiles and not native.tiles():
        pytest.skip("no AMX tiles here")
    qkv, starts = _qkv([9, 20], 2, 32, dtype)
    wide = torch.zeros(qkv.shape[0], qkv.shape[1] + 40, dtype=dtype)
    wide[:, 40:] = qkv
    view = wide[:, 40:]
    assert view.stride(0) != view.shape[1]
    assert torch.equal(native.packed_attention(view, starts, 2, tiles), native.packed_attention(qkv, starts, 2, tiles))


def test_what_it_does_not_take_is_refused_in_one_line():
    qkv, starts = _qkv([5], 2, 48, torch.float32)
    with pytest.raises(ValueError, match="head widths"):
        native.packed_attention(qkv, starts, 2)
    qkv, starts = _qkv([257], 1, 32, torch.float32)
    with pytest.raises(ValueError, match="up to 256 tokens"):
        native.packed_attention(qkv, starts, 1)
    qkv, starts = _qkv([5], 1, 32, torch.float32)
    with pytest.raises(ValueError, match="from 0"):
        native.packed_attention(qkv, starts + 1, 1)
    with pytest.raises(ValueError, match="fp32/bf16"):
        native.packed_attention(qkv.double(), starts, 1)


@pytest.mark.parametrize("setting, why", [({"CTXVEC_NATIVE": "0"}, "CTXVEC_NATIVE=0"),
                                          ({"CXX": "false"}, "failed to build")])
def test_where_it_cannot_build_it_says_why_and_attention_runs_without_it(monkeypatch, tmp_path, setting, why):
    mha = MultiHeadSelfAttention(d_model=64, n_heads=2, dropout=0.0).eval()
    real = torch.arange(20)[None, :] < torch.tensor([20, 11])[:, None]
    x = torch.randn(2, 20, 64)
    for name, value in setting.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("CTXVEC_CACHE", str(tmp_path))
    monkeypatch.setattr(route_module, "native_max_tokens", _rule({torch.float32: 128}))
    native.reset()
    try:
        assert why in native.available()
        with torch.inference_mode():
            route = choose(x, mha, real)
            out = route.restore(mha(route.arrange(x), route.key_mask, route=route).output)
    finally:
        native.reset()
    assert not route.native and why in route.reason
    expected = mha(x, key_mask_from(real), return_probabilities=True).output
    assert torch.allclose(out[real], expected[real], atol=1e-5)


def test_it_shares_pytorchs_openmp_runtime():
    """The kernel's OpenMP is PyTorch's: its ``libgomp.so.1`` resolves to the copy PyTorch
    loaded, not the system's, so its threads are PyTorch's pool, not a second one whose idle
    threads would spin beside it. (Other packages' renamed copies, e.g. scikit-learn's, are
    theirs.)"""
    assert native.available() is None
    maps = Path("/proc/self/maps").read_text().splitlines()
    gomp = {line.split()[-1] for line in maps if line.endswith("/libgomp.so.1")}
    assert len(gomp) == 1 and "/torch/" in next(iter(gomp)), gomp


def test_the_library_is_built_once_per_source_and_cpu(monkeypatch, tmp_path):
    monkeypatch.setenv("CTXVEC_CACHE", str(tmp_path))
    compiler = [shutil.which("c++") or shutil.which("g++")]
    first = native._build(compiler)
    built = first.stat().st_mtime_ns
    assert native._build(compiler) == first and first.stat().st_mtime_ns == built
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no partial file left
    monkeypatch.setattr(native, "_cpu_identity", lambda: "another CPU")
    assert native._build(compiler) != first


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_the_packed_route_attends_by_it_with_the_same_output(kernel_rule, counted, dtype):
    """An encoder layer's attention at inference: ctxvec's kernel on the packed rows (called
    once), the same output as the step-by-step attention."""
    if not onednn_dtype(dtype):
        pytest.skip(f"no oneDNN {dtype} here: the route keeps PyTorch's kernels")
    mha = MultiHeadSelfAttention(d_model=64, n_heads=2, dropout=0.1).eval().to(dtype)
    real = torch.arange(40)[None, :] < torch.tensor([40, 23, 1])[:, None]
    x = torch.randn(3, 40, 64).to(dtype)
    with torch.inference_mode():
        route = choose(x, mha, real)
        assert isinstance(route, PackedRoute) and route.native and "ctxvec's kernel" in route.reason
        assert ("on AMX tiles" in route.reason) == native.on_tiles(dtype)
        out = route.restore(mha(route.arrange(x), route.key_mask, route=route).output)
        expected = mha(x, key_mask_from(real), return_probabilities=True).output
    assert counted == [1]
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(out[real].float(), expected[real].float(), atol=tolerance)


def test_the_route_keeps_pytorch_for_long_sequences_other_heads_and_training(kernel_rule):
    mha = MultiHeadSelfAttention(d_model=64, n_heads=2, dropout=0.0)
    limit = route_module.native_max_tokens(torch.float32)
    with torch.inference_mode():
        short = choose(torch.randn(2, limit, 64), mha, torch.ones(2, limit, dtype=torch.bool))
        long = choose(torch.randn(2, limit + 1, 64), mha, torch.ones(2, limit + 1, dtype=torch.bool))
        narrow = choose(torch.randn(2, 8, 64), MultiHeadSelfAttention(64, 8, 0.0), torch.ones(2, 8, dtype=torch.bool))
    assert short.native and not long.native and f"it runs up to {limit}" in long.reason
    assert not narrow.native and "head widths [8]" in narrow.reason
    training = choose(torch.randn(2, 8, 64), mha, torch.arange(8)[None, :] < torch.tensor([8, 3])[:, None])
    assert isinstance(training, PackedRoute) and not training.native and "gradients" in training.reason


@pytest.mark.parametrize("tiles", [False, True])
def test_on_tiles_bf16_runs_up_to_the_kernels_longest(monkeypatch, tiles):
    """The rule: bf16 on AMX tiles up to the kernel's longest sequence, else the vector kernel's
    measured limit; none where the CPU kind is not measured."""
    monkeypatch.setattr(native, "tiles", lambda: tiles)
    monkeypatch.setattr(attention_module, "NATIVE_MAX_TOKENS", {torch.float32: 176, torch.bfloat16: 128})
    assert attention_module.native_max_tokens(torch.bfloat16) == (native.max_tokens() if tiles else 128)
    assert attention_module.native_max_tokens(torch.float32) == 176
    monkeypatch.setattr(attention_module, "NATIVE_MAX_TOKENS", {})
    assert attention_module.native_max_tokens(torch.bfloat16) == 0


def test_where_the_kernel_is_not_measured_pytorch_runs(monkeypatch):
    monkeypatch.setattr(route_module, "native_max_tokens", _rule({}))
    with torch.inference_mode():
        route = choose(torch.randn(2, 8, 64), MultiHeadSelfAttention(64, 2, 0.0), torch.ones(2, 8, dtype=torch.bool))
    assert not route.native and "not measured on this CPU" in route.reason


def test_a_route_reused_with_gradients_or_another_mask_does_not_take_the_kernel(kernel_rule, counted):
    """The kernel has no gradient and knows no mask but the packing's: a route made at inference
    and used again where a gradient is wanted, or handed another key mask, attends by PyTorch."""
    mha = MultiHeadSelfAttention(d_model=64, n_heads=2, dropout=0.0)
    real = torch.arange(12)[None, :] < torch.tensor([12, 7])[:, None]
    x = torch.randn(2, 12, 64)
    with torch.no_grad():
        route = choose(x, mha, real)
    assert route.native
    out = route.restore(mha(route.arrange(x), route.key_mask, route=route).output)
    out[real].sum().backward()
    assert counted == [] and mha.qkv.weight.grad is not None and mha.qkv.weight.grad.abs().sum() > 0
    causal = route.key_mask & torch.ones(12, 12, dtype=torch.bool).tril()
    with torch.no_grad():
        masked = route.restore(mha(route.arrange(x), causal, route=route).output)
        expected = mha(x, causal, return_probabilities=True).output
    assert counted == [] and torch.allclose(masked[real], expected[real], atol=1e-5)


@pytest.mark.parametrize("d_model, heads", [(64, 2), (128, 2)], ids=["heads of 32", "heads of 64"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_an_encoder_by_the_kernel_equals_the_plain_route(kernel_rule, counted, d_model, heads, dtype):
    """A whole encoder at inference, padded batch, with and without ``positions``: the engine
    (the kernel in every layer) and the plain route agree."""
    if not onednn_dtype(dtype):
        pytest.skip(f"no oneDNN {dtype} here: the route keeps PyTorch's kernels")
    encoder = Encoder(tiny_config(d_model=d_model, n_heads=heads, d_ff=2 * d_model, n_layers=2)).eval().to(dtype)
    ids, mask = random_batch(5, 33, 64, min_len=1)
    positions = mask.bool() & (torch.rand(mask.shape) < 0.5)
    positions[:, 0] = True
    with torch.inference_mode():
        fast = encoder(ids, mask)
        chosen = encoder(ids, mask, positions=positions)
        plain = encoder(ids, mask, route=Route(mask.bool()))
    assert "ctxvec's kernel" in fast.route and len(counted) == 4
    real = mask.bool()
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    assert (fast.last_hidden_state[real].float() - plain.last_hidden_state[real].float()).abs().max() < tolerance
    assert (chosen.last_hidden_state.float() - plain.last_hidden_state[positions].float()).abs().max() < tolerance


def test_packing_knows_where_each_sequence_starts():
    real = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 1]], dtype=torch.bool)
    packing = TokenPacking.from_mask(real, row_multiple=8)
    assert packing.starts.tolist() == [0, 2, 2, 4]


def _every_bf16():
    """All 65,536 bf16 values, NaNs and infinities among them."""
    return torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)


def _same_bits_or_both_nan(a, b):
    return bool(((a.view(torch.int16) == b.view(torch.int16)) | (a.isnan() & b.isnan())).all())


@pytest.mark.parametrize("threads", [1, 2])
def test_gelu_of_every_bf16_value_is_correctly_rounded(threads):
    """The table's GELU of each of the 65,536 bf16 values is the exact erf GELU rounded once
    (through fp32, as PyTorch converts), in place; NaN stays NaN, GELU(-inf) is NaN as in PyTorch."""
    x = _every_bf16().clone()
    expected = torch.nn.functional.gelu(x.double()).float().bfloat16()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        out = native.gelu_(x)
    finally:
        torch.set_num_threads(before)
    assert out is x and _same_bits_or_both_nan(x, expected)
    assert torch.nn.functional.gelu(torch.tensor([-float("inf")])).isnan().all()  # PyTorch's own rule
    # never farther from the exact value than PyTorch's own bf16 GELU (an fp32 erf formula, then
    # rounding; it gives -0 below about -5.5, where the exact value is still ~1e-7)
    exact = torch.nn.functional.gelu(_every_bf16().double())
    torch_bf16 = torch.nn.functional.gelu(_every_bf16())
    finite = exact.isfinite()
    assert ((x.double() - exact)[finite].abs() <= (torch_bf16.double() - exact)[finite].abs()).all()


@pytest.mark.parametrize("n", [1, 15, 16, 17, 4096 * 3 + 5])
def test_gelu_takes_any_length(n):
    x = (3 * torch.randn(n, generator=torch.Generator().manual_seed(n))).bfloat16()
    expected = torch.nn.functional.gelu(x.double()).float().bfloat16()
    assert _same_bits_or_both_nan(native.gelu_(x), expected)


def test_gelu_refuses_what_it_does_not_take_in_one_line():
    with pytest.raises(ValueError, match="contiguous bf16 CPU tensor"):
        native.gelu_(torch.randn(8))
    with pytest.raises(ValueError, match="contiguous bf16 CPU tensor"):
        native.gelu_(torch.randn(8, 8).bfloat16().t())


def test_the_feed_forwards_bf16_gelu_is_the_table_after_the_bare_projection():
    """In bf16 on the oneDNN route, ``linear(..., "gelu")`` is the projection rounded to bf16, then
    the table: PyTorch's own bf16 steps (a linear, then GELU), each rounded once."""
    if not onednn_dtype(torch.bfloat16):
        pytest.skip("no oneDNN bf16 here: the fused post-op never runs in bf16")
    layer = torch.nn.Linear(64, 256).bfloat16()
    x = torch.randn(32, 64).bfloat16()
    with torch.inference_mode():
        out = linear(x, layer, "gelu")
        projection = onednn_linear(x, layer)
    expected = torch.nn.functional.gelu(projection.double()).float().bfloat16()
    assert _same_bits_or_both_nan(out, expected)
    with torch.inference_mode():
        route = choose(torch.randn(2, 8, 64).bfloat16(), layer, torch.ones(2, 8, dtype=torch.bool))
    assert "GELU by ctxvec's bf16 table" in route.reason


def _norm(width, dtype, seed=0):
    """A LayerNorm with a weight and a bias that are not 1 and 0."""
    generator = torch.Generator().manual_seed(seed)
    norm = torch.nn.LayerNorm(width, eps=1e-12)
    with torch.no_grad():
        norm.weight.copy_(0.5 + torch.rand(width, generator=generator))
        norm.bias.copy_(0.1 * torch.randn(width, generator=generator))
    return norm.to(dtype)


def _rows(rows, width, dtype, seed=1):
    """Rows as a residual stream holds them: an offset and a spread of their own, a few outliers."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, width, generator=generator) * (0.5 + 3 * torch.rand(rows, 1, generator=generator))
    x += torch.randn(rows, 1, generator=generator)
    x[:, :2] *= 20
    return x.to(dtype)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("rows", [1, 15, 16, 17, 100])
@pytest.mark.parametrize("width", [16, 384])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_layer_norm_is_the_exact_one_within_fp32_rounding(dtype, width, rows, threads):
    """Mean and variance in fp32, the result within fp32's rounding of the exact LayerNorm (bf16:
    that rounded once, so within half a unit in the last place, 2^-8 relative at the bottom of a
    binade, plus fp32's error);
    PyTorch's own bf16 LayerNorm differs from it by one unit in the last place at most, rarely."""
    norm, x = _norm(width, dtype), _rows(rows, width, dtype)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        out = native.layer_norm(x, norm.weight, norm.bias, norm.eps)
    finally:
        torch.set_num_threads(before)
    exact = torch.nn.functional.layer_norm(x.double(), (width,), norm.weight.double(), norm.bias.double(), norm.eps)
    fp32_error = 2e-6 * (1 + exact.abs())
    bound = fp32_error if dtype == torch.float32 else 2**-8 * exact.abs() + fp32_error
    assert out.dtype == dtype and out.shape == x.shape
    assert ((out.double() - exact).abs() <= bound).all()
    with torch.no_grad():
        pytorch = norm(x)
    if dtype == torch.bfloat16:
        apart = out.view(torch.int16).int() - pytorch.view(torch.int16).int()
        assert apart.abs().max() <= 1 and (apart != 0).float().mean() < 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_layer_norm_of_extreme_rows_is_exact_or_nan_row_by_row(dtype):
    """A row of one huge value is its bias, exactly (x - mean is 0; PyTorch's form cancels to NaN);
    a row whose variance overflows fp32, or holding NaN or inf, gives NaN (the encoder's finite
    check then names it), and no other row of its block of 16 is touched."""
    norm, x = _norm(64, dtype), _rows(20, 64, dtype)
    x[2] = 1e30
    x[5, ::2], x[5, 1::2] = 1e30, -1e30
    x[7, 3], x[9, 0] = float("nan"), float("inf")
    out = native.layer_norm(x, norm.weight, norm.bias, norm.eps)
    assert torch.equal(out[2], norm.bias.detach())
    assert out[[5, 7, 9]].isnan().all(1).all()
    others = [r for r in range(20) if r not in (2, 5, 7, 9)]
    expected = torch.nn.functional.layer_norm(x[others].double(), (64,), norm.weight.double(), norm.bias.double(),
                                              norm.eps)
    bound = 2e-6 * (1 + expected.abs()) + (2**-8 * expected.abs() if dtype == torch.bfloat16 else 0)
    assert ((out[others].double() - expected).abs() <= bound).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_layer_norm_writes_over_its_input_when_asked(dtype):
    norm, x = _norm(64, dtype), _rows(40, 64, dtype).view(5, 8, 64)
    expected = native.layer_norm(x, norm.weight, norm.bias, norm.eps)
    out = native.layer_norm(x, norm.weight, norm.bias, norm.eps, out=x)
    assert out.data_ptr() == x.data_ptr() and torch.equal(out, expected)


def test_layer_norm_refuses_what_it_does_not_take_in_one_line():
    norm = _norm(24, torch.float32)
    with pytest.raises(ValueError, match="multiple of 16"):
        native.layer_norm(torch.randn(4, 24), norm.weight, norm.bias, 1e-5)
    with pytest.raises(ValueError, match="multiple of 16"):
        native.layer_norm(torch.randn(4, 32).double(), torch.ones(32).double(), torch.zeros(32).double(), 1e-5)
    with pytest.raises(ValueError, match="out must be"):
        native.layer_norm(torch.randn(4, 32), torch.ones(32), torch.zeros(32), 1e-5, out=torch.empty(32, 4).t())
    assert not native.norm_takes(torch.randn(4, 24), norm)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_the_route_normalises_by_it_at_inference_only(monkeypatch, dtype):
    """An encoder at inference on a pipeline's route: every LayerNorm by the kernel (the
    embeddings' and two a layer), the sums written over where nothing reads them again; where
    gradients are wanted, PyTorch's; the same numbers either way."""
    if not onednn_dtype(dtype):
        pytest.skip(f"no oneDNN {dtype} here: the route keeps PyTorch's kernels")
    calls = []
    kernel = native.layer_norm_unchecked
    monkeypatch.setattr(native, "layer_norm_unchecked",
                        lambda *a, **k: calls.append(a[4] is not None) or kernel(*a, **k))  # a[4]: out
    encoder = Encoder(tiny_config(d_model=64, n_heads=2, d_ff=128, n_layers=2, embedding_norm=True)).eval().to(dtype)
    ids, mask = random_batch(4, 20, 64, min_len=1)
    with torch.inference_mode():
        fast = encoder(ids, mask, route=route_for(encoder, mask))
        plain = encoder(ids, mask, route=Route(mask.bool()))
    assert "LayerNorm by ctxvec's kernel" in fast.route and calls == [True] * 5  # post-norm: every sum
    real = mask.bool()
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    assert (fast.last_hidden_state[real].float() - plain.last_hidden_state[real].float()).abs().max() < tolerance
    with torch.inference_mode():  # a sum written over is never a state the caller is handed
        states = encoder(ids, mask, output_hidden_states=True, route=route_for(encoder, mask)).hidden_states
        plain_states = encoder(ids, mask, output_hidden_states=True, route=Route(mask.bool())).hidden_states
    assert len(states) == 3
    for state, expected in zip(states, plain_states):
        assert (state[real].float() - expected[real].float()).abs().max() < tolerance
    calls.clear()
    encoder.train()
    encoder(ids, mask).last_hidden_state.float().sum().backward()
    assert calls == [] and encoder.stack.layers[0].norm1.weight.grad is not None


def test_built_without_avx512_the_route_keeps_pytorchs_layer_norm(monkeypatch):
    """Built for AVX2 alone, the kernel's 16-lane vectors are slow (GCC's code for them, at any
    block size), and PyTorch's LayerNorm is faster."""
    monkeypatch.setattr(native, "norm_fast", lambda: False)
    calls = []
    monkeypatch.setattr(native, "layer_norm_unchecked", lambda *a, **k: calls.append(1))
    encoder = Encoder(tiny_config(d_model=64, n_heads=2, d_ff=128, n_layers=2)).eval()
    ids, mask = random_batch(3, 12, 64, min_len=1)
    with torch.inference_mode():
        out = encoder(ids, mask, route=route_for(encoder, mask))
    assert calls == [] and "LayerNorm by ctxvec's kernel" not in out.route
    assert native.norm_fast() is False and not native.norm_takes(torch.randn(4, 64), encoder.stack.layers[0].norm1)


def test_the_kernel_is_built_with_avx512_where_the_cpu_has_it():
    if "avx512f" not in Path("/proc/cpuinfo").read_text(encoding="utf-8"):
        pytest.skip("no AVX-512 on this CPU")
    assert native.norm_fast()


def test_every_file_the_build_reads_is_shipped_in_the_package():
    """A wheel carries the kernels' sources and headers (pyproject's package data), not only a checkout."""
    package = Path(native.__file__).parents[2]  # src/ctxvec
    config = tomllib.loads((package.parents[1] / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = config["tool"]["setuptools"]["package-data"]["ctxvec"]
    for path in native.SOURCES + native.HEADERS:
        relative = path.relative_to(package).as_posix()
        assert any(fnmatch.fnmatch(relative, pattern) for pattern in patterns), relative
