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


@pytest.mark.parametrize("command", [[], ["encode"], ["models"], ["train-tokenizer"]])
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
    assert vectors.shape == (7, 512) and np.isfinite(vectors).all()


@pytest.mark.parametrize("args, words", [
    (["encode", "x", "--model", "nope"], "known models: seed"),
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
