import json
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from ctxvec.cli import main


@pytest.fixture
def run():
    runner = CliRunner()
    return lambda *args: runner.invoke(main, list(args), catch_exceptions=False)


@pytest.mark.parametrize("command", [[], ["encode"], ["embed"], ["models"], ["train-tokenizer"]])
def test_every_command_has_help(run, command):
    result = run(*command, "--help")
    assert result.exit_code == 0 and "Usage:" in result.output


def test_encode_prints_tokens_with_compact_vectors(run):
    result = run("encode", "my name is aj", "--model", "seed")
    assert result.exit_code == 0
    assert "UNTRAINED" in result.output
    lines = [line.split() for line in result.output.splitlines() if line.strip()[:1].isdigit()]
    assert [parts[1] for parts in lines] == ["[CLS]", "my", "name", "is", "a", "##j", "[SEP]"]
    assert "(special)" in result.output and "512 values" in result.output


@pytest.mark.parametrize("suffix", [".npy", ".json", ".npz"])
def test_encode_writes_all_vectors(run, tmp_path, suffix):
    out = tmp_path / f"vectors{suffix}"
    assert run("encode", "my name is aj", "-o", str(out)).exit_code == 0
    if suffix == ".npy":
        vectors = np.load(out)
    elif suffix == ".npz":
        vectors = np.load(out)["text_0"]
    else:
        payload = json.loads(out.read_text())
        assert payload["texts"][0]["tokens"][1] == "my"
        vectors = np.array(payload["texts"][0]["vectors"])
    assert vectors.shape == (6, 384) and np.isfinite(vectors).all()


def test_encode_uses_minilm_by_default(run):
    result = run("encode", "my name is aj")
    assert result.exit_code == 0 and "all-MiniLM-L6-v2" in result.output
    rows = [line.split() for line in result.output.splitlines() if line.strip()[:1].isdigit()]
    words = [parts[1] for parts in rows if "(special)" not in " ".join(parts)]
    assert words == ["my", "name", "is", "aj"]
    assert [parts[1] for parts in rows if "(special)" in " ".join(parts)] == ["[CLS]", "[SEP]"]


@pytest.mark.parametrize("args, words", [
    (["encode", "x", "--model", "nope"], "known models: minilm, seed"),
    (["embed", "missing.txt", "-o", "v.npy"], "missing.txt: no such file"),
    (["embed", ".", "-o", "v.npy"], "is a directory"),
    (["embed", "missing.txt", "-o", "v.txt"], "must be a .npy"),
    (["encode", "x", "-o", "out.txt"], "use one of .npy"),
    (["encode", "x", "y", "-o", "out.npy"], ".npy holds one text"),
    (["encode", "word " * 600, "--strict"], "more than max_len"),
    (["train-tokenizer", "missing.txt", "-o", "tok"], "does not exist"),
])
def test_errors_are_one_line_and_nonzero(tmp_path, args, words):
    proc = subprocess.run([sys.executable, "-m", "ctxvec", *args], capture_output=True, text=True,
                          cwd=tmp_path)
    assert proc.returncode != 0
    assert words in proc.stderr and "Traceback" not in proc.stderr


def test_train_tokenizer(run, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog\n" * 50)
    result = run("train-tokenizer", str(corpus), "-o", str(tmp_path / "tok"), "--vocab-size", "60")
    assert result.exit_code == 0
    assert (tmp_path / "tok" / "tokenizer.json").is_file()


# ---- ctxvec embed ---------------------------------------------------------------------------

def _embed(tmp_path, content: bytes, name="in.txt", *extra):
    src = tmp_path / name
    src.write_bytes(content)
    out = tmp_path / "v.npy"
    proc = subprocess.run([sys.executable, "-m", "ctxvec", "embed", str(src), "-o", str(out), *extra],
                          capture_output=True, text=True)
    return proc, out


def test_embed_writes_vectors_in_input_order_with_progress(tmp_path):
    from ctxvec.models import load

    texts = ["a much longer first line about the heavens and the earth", "x", "", "my name is aj"]
    proc, out = _embed(tmp_path, "\r\n".join(texts).encode())  # CRLF, no final newline
    assert proc.returncode == 0, proc.stderr
    assert "embedding" in proc.stderr and "100%" in proc.stderr  # the progress bar
    assert "embedded 4 texts" in proc.stdout
    vectors = np.load(out)
    assert np.abs(vectors - load("minilm").embed(texts)).max() < 1e-5
    assert not (tmp_path / ".v.npy.partial").exists()


def test_embed_json_lines(tmp_path):
    lines = [json.dumps({"text": t, "id": i}) for i, t in enumerate(["hello", "world"])]
    proc, out = _embed(tmp_path, ("\n".join(lines) + "\n").encode(), "in.jsonl")
    assert proc.returncode == 0, proc.stderr
    assert np.load(out).shape == (2, 384)


@pytest.mark.parametrize("content, name, words", [
    (b'{"text": "ok"}\n{"id": 3}\n', "in.jsonl", 'line 2: a JSON object with a "text" field'),
    (b'{"text": "ok"}\n{"text": 5}\n', "in.jsonl", 'line 2: "text" is a int, not a string'),
    (b'{"text": "ok"}\nnot json\n', "in.jsonl", "line 2: not JSON"),
    (b"fine\nfine\nbad \xff\xfe byte\n", "in.txt", "line 3: not valid UTF-8"),
])
def test_embed_bad_files_name_the_line(tmp_path, content, name, words):
    proc, out = _embed(tmp_path, content, name)
    assert proc.returncode == 1
    assert words in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists() and not (tmp_path / ".v.npy.partial").exists()


def test_embed_reports_truncation_and_strict_names_the_line(tmp_path):
    content = ("short\n" + "word " * 400 + "\n").encode()
    proc, _ = _embed(tmp_path, content)
    assert proc.returncode == 0 and "1 text(s) were truncated to 256 tokens: line(s) 2" in proc.stdout
    proc, _ = _embed(tmp_path, content, "in.txt", "--strict")
    assert proc.returncode == 1 and "line 2: 402 tokens" in proc.stderr
