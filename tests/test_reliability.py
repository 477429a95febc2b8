"""Reliability: odd input works, bad input is a clear error, interrupted work loses nothing.

Complements the per-module error tests (test_encoder, test_tokenizer, test_cli, test_pretrained,
test_train) with the cross-cutting matrix: texts, files, tensors and options through the public
API and the CLI, hostile model files, property-based fuzzing, memory over 1,000 calls,
concurrent use from threads, and the bound on how much a text's vector depends on its batch.
(``embed`` jobs: tests/test_embedfile.py.)
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ctxvec
from ctxvec import Encoder
from ctxvec.cli import main
from ctxvec.model.encoder import EncoderStack, NonFiniteError
from ctxvec.weights.huggingface import minilm_dir
from ctxvec.weights.tensorfile import WeightsError

from conftest import tiny_config

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def minilm():
    return ctxvec.load("minilm")


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ctxvec", *args], capture_output=True, text=True)


def one_line_error(proc) -> str:
    """The CLI's error contract: non-zero exit, no traceback, the message on one stderr line."""
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


# ---- texts: odd but valid input gets a correct result ---------------------------------------

ODD_TEXTS = {
    "empty": "",
    "whitespace": " \t \u3000 \u00a0 ",
    "punctuation": "?!... ,;:--",
    "control characters": "a\x01b\x07c\x1bd\x7f",
    "NUL bytes": "before\x00after\x00",
    "combining": "e\u0301te\u0301 cafe\u0301 n\u0303",
    "right-to-left": "\u0645\u0631\u062d\u0628\u0627 \u05e9\u05dc\u05d5\u05dd \u202eabc\u202c",
    "zero-width": "a\u200bb\u200dc\ufeffd",
    "emoji": "\U0001f600\U0001f469\u200d\U0001f4bb",
    "1 MB line": "word " * 200_000,
}


@pytest.mark.parametrize("name", list(ODD_TEXTS))
def test_odd_texts_give_finite_vectors_independent_of_the_batch(minilm, name):
    text = ODD_TEXTS[name]
    [alone] = minilm.encode([text])
    assert alone.vectors.shape == (len(alone.tokens), 384) and np.isfinite(alone.vectors).all()
    assert alone.tokens[0] == "[CLS]" and alone.tokens[-1] == "[SEP]"
    assert alone.truncated == (name == "1 MB line")
    together = minilm.embed(["my name is aj", text, "a third text"])
    assert np.isfinite(together).all()
    assert np.abs(together[1] - minilm.embed([text])[0]).max() < 1e-5


@pytest.mark.parametrize("bad, error, words", [
    (["ok", "lone \ud800 surrogate"], ValueError, "text 1 is not valid Unicode"),
    ("a single string", TypeError, "wrap a single text in a list"),
    (["ok", None], TypeError, "text 1 is a NoneType"),
    (["ok", b"bytes"], TypeError, "text 1 is a bytes"),
])
def test_bad_texts_are_specific_errors(minilm, bad, error, words):
    with pytest.raises(error, match=words):
        minilm.embed(bad)


def test_cli_lone_surrogate_argument_is_one_line(tmp_path):
    # What Linux hands Python for an argument that is not UTF-8 (surrogateescape).
    result = CliRunner().invoke(main, ["encode", "ok \udcff", "--model", "seed"])
    assert result.exit_code == 1
    assert "not valid Unicode" in result.output and "Traceback" not in result.output


# ---- files --------------------------------------------------------------------------------

@pytest.mark.parametrize("content, name, words", [
    (b"\xef\xbb\xbfhello\nw\xe9rld\n", "in.txt", "line 2: not valid UTF-8"),
    (b'{"text": "ok"}\n{"txt": "typo"}\n', "in.jsonl", 'line 2: a JSON object with a "text" field'),
    (b'{"text": ["a"]}\n', "in.jsonl", '"text" is a list, not a string'),
    (b'["text"]\n', "in.jsonl", 'line 1: a JSON object with a "text" field'),
])
def test_bad_file_contents_name_the_line(tmp_path, tiny_model, content, name, words):
    src = tmp_path / name
    src.write_bytes(content)
    proc = cli("embed", str(src), "-o", str(tmp_path / "v.npy"), "--model", str(tiny_model))
    assert words in one_line_error(proc)
    assert list(tmp_path.glob("*v.npy*")) == []  # no output, no partial files left behind


@pytest.mark.parametrize("content, texts", [
    (b"", []),
    (b"one\r\ntwo\r\n", ["one", "two"]),
    (b"one\ntwo", ["one", "two"]),  # no final newline
    (b"\n\n", ["", ""]),
    (b"\xef\xbb\xbfbom\n", ["bom"]),
])
def test_valid_file_shapes(tmp_path, tiny_model, content, texts):
    src, out = tmp_path / "in.txt", tmp_path / "v.npy"
    src.write_bytes(content)
    result = CliRunner().invoke(main, ["embed", str(src), "-o", str(out), "--model", str(tiny_model)])
    assert result.exit_code == 0, result.output
    vectors = np.load(out)
    assert vectors.shape == (len(texts), 32)
    if texts:
        assert np.array_equal(vectors, ctxvec.load(tiny_model).embed(texts))


def test_unreadable_and_missing_files(tmp_path, tiny_model, monkeypatch):
    import ctxvec.texts as textfile

    src = tmp_path / "secret.txt"
    src.write_text("hello\n")
    if os.geteuid() != 0:  # root reads anything: there, simulate what the kernel would say
        src.chmod(0)
    else:
        def refuse(path, *args, **kwargs):
            raise PermissionError(13, "Permission denied", str(path))
        monkeypatch.setattr(textfile, "open", refuse, raising=False)
    result = CliRunner().invoke(main, ["embed", str(src), "-o", str(tmp_path / "v.npy"), "--model", str(tiny_model)])
    assert result.exit_code == 1 and "cannot be read (Permission denied)" in result.output
    monkeypatch.undo()
    for path, words in [(tmp_path / "nope.txt", "no such file"), (tmp_path, "is a directory")]:
        proc = cli("embed", str(path), "-o", str(tmp_path / "v.npy"), "--model", str(tiny_model))
        assert words in one_line_error(proc)


# ---- tensors ------------------------------------------------------------------------------

@pytest.fixture
def tiny_encoder():
    return Encoder(tiny_config()).eval()


@pytest.mark.parametrize("make, error, words", [
    (lambda: (torch.ones(2, 5), None), TypeError, "integer tensor"),
    (lambda: (torch.ones(5, dtype=torch.long), None), ValueError, "input_ids[None]"),
    (lambda: (torch.ones(1, 2, 5, dtype=torch.long), None), ValueError, "(batch, seq_len)"),
    (lambda: (torch.full((1, 5), 64), None), ValueError, "token id 64 is outside"),
    (lambda: (torch.full((1, 5), -1), None), ValueError, "token id -1 is outside"),
    (lambda: (torch.ones(1, 5, dtype=torch.long), torch.full((1, 5), 2)), ValueError, "only 0 and 1"),
    (lambda: (torch.ones(1, 5, dtype=torch.long), torch.ones(1, 5)), TypeError, "float mask is refused"),
    (lambda: (torch.ones(1, 5, dtype=torch.long), torch.ones(1, 4, dtype=torch.long)), ValueError, "must match"),
    (lambda: (torch.ones(1, 41, dtype=torch.long), None), ValueError, "exceeds max_len=40"),
    (lambda: (torch.ones(1, 0, dtype=torch.long), None), ValueError, "seq_len 0"),
])
def test_bad_tensors_are_specific_errors(tiny_encoder, make, error, words):
    ids, mask = make()
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        tiny_encoder(ids, mask)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_is_reported_with_its_place(value):
    stack = EncoderStack(tiny_config()).eval()
    x = torch.randn(2, 5, 32)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    x[1, 4, 0] = value  # at padding: never used, so accepted
    assert torch.isfinite(stack(x, mask).last_hidden_state).all()
    x[1, 2, 7] = value
    with pytest.raises(NonFiniteError, match=r"hidden_states holds NaN or inf \(first at index \(1, 2, 7\)\)"):
        stack(x, mask)


@pytest.mark.parametrize("parameter", ["embeddings.tokens.weight", "stack.layers.1.feed_forward.up.weight",
                                       "stack.layers.0.norm1.bias"])
def test_non_finite_weights_are_named(tiny_encoder, parameter):
    with torch.no_grad():
        tiny_encoder.get_parameter(parameter).view(-1)[3] = float("nan")
    ids = torch.arange(6).repeat(2, 1)  # uses token 0, whose embedding row holds the NaN
    with pytest.raises(NonFiniteError, match="weights do: .*" + parameter.split(".", 1)[1].replace(".", r"\.")):
        tiny_encoder(ids)


def test_all_padding_rows_are_valid_and_zero(tiny_encoder):
    ids = torch.tensor([[5, 6, 7], [0, 0, 0]])
    mask = torch.tensor([[1, 1, 1], [0, 0, 0]])
    out = tiny_encoder(ids, mask).last_hidden_state
    assert torch.isfinite(out).all() and (out[1] == 0).all()
    assert torch.allclose(out[0], tiny_encoder(ids[:1], mask[:1]).last_hidden_state[0], atol=1e-6)


# ---- options ------------------------------------------------------------------------------

@pytest.mark.parametrize("args, words", [
    (["encode", "x", "--batch-tokens", "0"], "--batch-tokens"),
    (["encode", "x", "--batch-tokens", "-5"], "--batch-tokens"),
    (["encode", "x", "--threads", "0"], "--threads"),
    (["encode", "x", "--threads", "-1"], "--threads"),
    (["encode", "x", "--precision", "fp8"], "'fp8' is not one of 'fp32', 'bf16'"),
    (["encode", "x", "--model", "bert-large"], "known models: minilm, seed"),
    (["embed", "in.txt", "-o", "v.npy", "--chunk-size", "0"], "--chunk-size"),
])
def test_bad_cli_options(tmp_path, args, words):
    proc = subprocess.run([sys.executable, "-m", "ctxvec", *args], capture_output=True, text=True, cwd=tmp_path)
    assert words in one_line_error(proc)


@pytest.mark.parametrize("call, words", [
    (lambda p: p.embed(["x"], batch_tokens=0), "batch_tokens must be a positive integer"),
    (lambda p: p.embed(["x"], batch_tokens=2.5), "batch_tokens must be a positive integer"),
    (lambda p: p.set_precision("int4"), "unknown precision 'int4'; choose one of fp32, bf16"),
    (lambda p: ctxvec.load("nope"), "known models: minilm, seed"),
    (lambda p: ctxvec.set_threads(0), "threads must be a positive integer"),
])
def test_bad_api_options(minilm, call, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(")):
        call(minilm)


# ---- hostile model files ------------------------------------------------------------------

def _safetensors(header: dict, data: bytes, header_len: int | None = None) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data


HOSTILE = {
    "offsets beyond the file": lambda: _safetensors(
        {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8),
    "size that disagrees with the shape": lambda: _safetensors(
        {"w": {"dtype": "F32", "shape": [1000, 1000], "data_offsets": [0, 16]}}, b"\0" * 16),
    "overlapping tensors": lambda: _safetensors(
        {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
         "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, b"\0" * 24),
    "a huge header length": lambda: _safetensors({}, b"", header_len=2**62),
    "a header that is not JSON": lambda: struct.pack("<Q", 10) + b"{not json!",
    "an unknown dtype": lambda: _safetensors(
        {"w": {"dtype": "F99", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8),
    "an empty file": lambda: b"",
    "seven bytes": lambda: b"\x01\x02\x03\x04\x05\x06\x07",
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_weights_files_are_clear_errors(tmp_path, tiny_model, name):
    folder = tmp_path / "model"
    folder.mkdir()
    for f in tiny_model.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "model.safetensors").write_bytes(HOSTILE[name]())
    with pytest.raises(WeightsError, match="model.safetensors"):
        ctxvec.load(folder)
    proc = cli("encode", "x", "--model", str(folder))
    assert "model.safetensors" in one_line_error(proc)


def test_wrong_dtype_and_extra_tensors_in_a_ctxvec_folder(tmp_path, tiny_model):
    from safetensors.torch import load_file, save_file

    state = load_file(str(tiny_model / "model.safetensors"))
    for name, change, words in [
        ("int", {**state, "stack.layers.0.norm1.weight": state["stack.layers.0.norm1.weight"].long()}, "norm1.weight"),
        ("extra", {**state, "surprise": torch.zeros(3)}, "surprise"),
        ("missing", {k: v for k, v in state.items() if "norm2.bias" not in k}, "norm2.bias"),
        ("shape", {**state, "stack.layers.1.feed_forward.up.weight": torch.zeros(3, 3)}, "feed_forward.up.weight"),
    ]:
        folder = tmp_path / name
        folder.mkdir()
        for f in tiny_model.iterdir():
            (folder / f.name).write_bytes(f.read_bytes())
        save_file(change, str(folder / "model.safetensors"))
        with pytest.raises(WeightsError, match=words):
            ctxvec.load(folder)


def _minilm_copy(folder: Path) -> Path:
    """all-MiniLM-L6-v2's folder, its weights linked, its small files copied (to be spoiled)."""
    folder.mkdir()
    for f in minilm_dir().iterdir():
        if f.is_file():
            (folder / f.name).symlink_to(f) if f.name == "model.safetensors" else (folder / f.name).write_bytes(f.read_bytes())
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_bytes((minilm_dir() / "1_Pooling" / "config.json").read_bytes())
    return folder


def test_a_ctxvec_folder_asking_for_a_billion_positions_is_refused_at_once(tmp_path, tiny_model):
    """Before: sinusoidal positions are not in the weights file, so the table of 10^9 positions
    was computed (8 GB, 13 s) before an out-of-memory error."""
    folder = tmp_path / "model"
    folder.mkdir()
    for f in tiny_model.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    meta = json.loads((folder / "ctxvec.json").read_text())
    meta["encoder"]["max_len"] = 10**9
    (folder / "ctxvec.json").write_text(json.dumps(meta))
    assert "max_len must be at most 65,536 positions" in one_line_error(cli("encode", "x", "--model", str(folder)))


@pytest.mark.parametrize("spoil, words", [
    (lambda f: (f / "tokenizer.json").unlink(), "tokenizer.json: no such file"),
    (lambda f: (f / "modules.json").write_text('{"type": "Pooling"}'), "modules.json must hold a JSON list, not a dict"),
    (lambda f: (f / "modules.json").write_text('["Pooling"]'), "modules.json: entry 0 must be an object"),
    (lambda f: (f / "modules.json").write_text("[" * 50_000), "cannot read"),
    (lambda f: _edit_json(f / "config.json", vocab_size=10**12),
     "embeddings.tokens.weight has shape (30522, 384), the model expects (1000000000000, 384)"),
    (lambda f: _edit_json(f / "config.json", max_position_embeddings=10**12), "max_len must be at most 65,536"),
    (lambda f: _edit_json(f / "config.json", num_hidden_layers=10**9), "holds 104 tensors, too few for the 1000000000 layers"),
    (lambda f: _edit_json(f / "config.json", intermediate_size=10**11), "the model expects (100000000000, 384)"),
], ids=["no tokenizer", "modules not a list", "modules entry", "modules nested", "vocab 10^12", "positions 10^12",
        "layers 10^9", "ffn 10^11"])
def test_spoiled_model_folders_are_one_line_errors_before_any_allocation(tmp_path, spoil, words):
    """Before: tracebacks, and ``vocab_size`` 10^12 tried to allocate 1.5 TB before any check."""
    folder = _minilm_copy(tmp_path / "model")
    spoil(folder)
    proc = cli("encode", "x", "--model", str(folder))
    line = one_line_error(proc)
    assert words in line and str(folder) in line


def _edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


# ---- property-based fuzzing ---------------------------------------------------------------

@FUZZ
@given(texts=st.lists(st.text(max_size=80), min_size=1, max_size=4))
def test_fuzz_any_unicode_is_a_result_or_a_clear_error(minilm, texts):
    try:
        vectors = minilm.embed(texts)
    except ValueError as err:
        assert "lone surrogate" in str(err)
        assert any(any(0xD800 <= ord(c) <= 0xDFFF for c in t) for t in texts)
        return
    assert vectors.shape == (len(texts), 384) and np.isfinite(vectors).all()
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)  # MiniLM normalises


@FUZZ
@given(data=st.data())
def test_fuzz_any_tensor_is_a_result_or_a_clear_error(data):
    config = tiny_config()
    encoder = _fuzz_encoder()
    batch = data.draw(st.integers(0, 3))
    length = data.draw(st.integers(0, 42))
    ids = torch.tensor(data.draw(st.lists(st.lists(st.integers(-2, config.vocab_size + 1), min_size=length,
                                                   max_size=length), min_size=batch, max_size=batch)),
                       dtype=data.draw(st.sampled_from([torch.long, torch.int32, torch.float32])))
    ids = ids.reshape(batch, length)
    mask_dtype = data.draw(st.sampled_from([None, torch.bool, torch.long, torch.uint8, torch.float32]))
    mask = None
    if mask_dtype is not None:
        values = data.draw(st.lists(st.integers(-1, 2) if mask_dtype != torch.bool else st.booleans(),
                                    min_size=batch * length, max_size=batch * length))
        mask = torch.tensor(values, dtype=torch.long).to(mask_dtype).reshape(batch, length)
    try:
        out = encoder(ids, mask).last_hidden_state
    except (ValueError, TypeError) as err:
        assert str(err).rstrip(")").endswith(".") and len(str(err)) > 20  # a sentence, not a bare exception
        return
    assert out.shape == (batch, length, config.d_model) and torch.isfinite(out).all()
    if mask is not None:
        assert (out[~mask.bool()] == 0).all()  # padding positions are exactly 0


_ENCODER: list[Encoder] = []


def _fuzz_encoder() -> Encoder:
    if not _ENCODER:
        torch.manual_seed(0)
        _ENCODER.append(Encoder(tiny_config()).eval())
    return _ENCODER[0]


# ---- load and memory ----------------------------------------------------------------------

def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux /proc")
def test_memory_stays_flat_over_1000_embed_calls(minilm):
    rng = np.random.default_rng(0)
    words = "a an the word longer sentence context vector encoder attention".split()

    def call(i: int) -> None:
        texts = [" ".join(rng.choice(words, size=int(rng.integers(1, 48)))) for _ in range(int(rng.integers(1, 5)))]
        assert np.isfinite(minilm.embed(texts)).all()

    for i in range(100):  # warm-up: allocator pools, thread pools, caches
        call(i)
    before = _rss_mb()
    samples = []
    for i in range(1000):
        call(i)
        if i % 100 == 99:
            samples.append(_rss_mb())
    growth = max(samples) - before
    print(f"\nRSS before {before:.0f} MB, after 1,000 calls {samples[-1]:.0f} MB, max growth {growth:.1f} MB")
    assert growth < 25, samples  # flat: no per-call leak (25 MB over 1,000 calls < 25 kB/call)


def test_threads_share_a_pipeline_safely(minilm):
    texts = [f"sentence number {i} " + "word " * (i % 37) for i in range(96)]
    groups = [texts[i::4] for i in range(4)]
    serial = [minilm.embed(g) for g in groups]
    results: dict[int, list[np.ndarray]] = {i: [] for i in range(4)}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for _ in range(3):
                results[i].append(minilm.embed(groups[i]))
        except BaseException as err:  # reported below, never lost in the thread
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i in range(4):
        for got in results[i]:
            assert np.abs(got - serial[i]).max() < 1e-6
