import errno
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

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


def test_a_command_freezes_what_it_loaded_out_of_the_collectors_reach(run):
    """After loading, the process's objects so far (PyTorch, the model) are frozen: a full
    garbage collection during the job then walks only what the job made."""
    import gc

    gc.unfreeze()  # (conftest thaws again after the test)
    assert run("encode", "my name is aj", "--model", "seed").exit_code == 0
    assert gc.get_freeze_count() > 10_000  # PyTorch's modules and the model, at least


@pytest.mark.parametrize("failures, blamed", [
    ({0: (3, 10.0), 1: (1, 10.5)}, 1),  # 0 stopped because 1 did, and was seen to end first
    ({0: (1, 10.0), 1: (3, 10.5)}, 0),
    ({0: (1, 11.0), 1: (1, 10.0), 2: (3, 9.0)}, 1),  # two causes: the first
    ({0: (3, 11.0), 1: (3, 10.0)}, 1),  # none of its own: the first to end
    ({0: (-9, 12.0), 1: (3, 10.0)}, 0),  # killed by a signal
])
def test_several_processes_name_the_one_that_stopped_for_a_reason_of_its_own(failures, blamed):
    from types import SimpleNamespace

    from ctxvec.cli.app import first_cause
    from ctxvec.engine.distributed import PEER_STOPPED_EXIT

    assert PEER_STOPPED_EXIT == 3
    failures = {rank: SimpleNamespace(exitcode=code, timestamp=at) for rank, (code, at) in failures.items()}
    assert first_cause(failures) == blamed


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
    from ctxvec.loading import load

    texts = ["a much longer first line about the heavens and the earth", "x", "", "my name is aj"]
    proc, out = _embed(tmp_path, "\r\n".join(texts).encode())  # CRLF, no final newline
    assert proc.returncode == 0, proc.stderr
    assert "embedding" in proc.stderr and "100%" in proc.stderr  # the progress bar
    assert "embedded 4 texts" in proc.stdout
    vectors = np.load(out)
    assert np.abs(vectors - load("minilm").embed(texts)).max() < 1e-5
    assert not (tmp_path / ".v.npy.partial").exists()


def test_embed_repacks_the_weights_once_for_the_whole_job(run, tmp_path, monkeypatch):
    """The weights are fixed for the job: ``ctxvec embed`` repacks them for oneDNN once, not
    once per chunk, and the vectors are the pipeline's own."""
    import ctxvec.pipeline
    from ctxvec.loading import load

    calls = []
    repack = ctxvec.pipeline.repack_weights
    monkeypatch.setattr(ctxvec.pipeline, "repack_weights", lambda module: calls.append(1) or repack(module))
    texts = [f"line {i}: " + "word " * (i % 7) for i in range(40)]
    src, out = tmp_path / "in.txt", tmp_path / "v.npy"
    src.write_text("\n".join(texts) + "\n", encoding="utf-8")
    # 5 chunks of 8 lines, each in 4 batches of 2 (a plain call repacks from 3 batches on)
    result = run("embed", str(src), "-o", str(out), "--chunk-size", "8", "--batch-tokens", "64")
    assert result.exit_code == 0, result.output
    assert len(calls) == 1
    assert np.abs(np.load(out) - load("minilm").embed(texts)).max() < 1e-5


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
    assert proc.returncode == 0 and "1 text(s) were truncated to 256 tokens: line(s) 2" in proc.stderr
    proc, _ = _embed(tmp_path, content, "in.txt", "--strict")
    assert proc.returncode == 1 and "line 2: has 402 tokens, more than max_len=256" in proc.stderr


# ---- errors are one line ----------------------------------------------------------------------

@pytest.mark.parametrize("args, words", [
    (["encode"], "Missing argument 'TEXTS...'. (see `ctxvec encode --help`)"),
    (["encode", "x", "--bogus"], "No such option '--bogus'"),
    (["encode", "x", "--precision", "fp8"], "'fp8' is not one of 'fp32', 'bf16'"),
    (["embed", "in.txt"], "Missing option '--output'"),
    (["bogus"], "No such command 'bogus'. (see `ctxvec --help`)"),
    (["train", "c.txt", "--out", "r", "--steps", "0"], "0 is not in the range x>=1"),
])
def test_usage_errors_are_one_line(tmp_path, args, words):
    """Before: click printed three lines (usage, a hint, the error)."""
    proc = subprocess.run([sys.executable, "-m", "ctxvec", *args], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [proc.stderr.strip()] and proc.stderr.startswith("Error: ")
    assert words in proc.stderr


@pytest.mark.parametrize("content, words", [
    (b"good\nw\xe9rld\n", "corpus.txt, line 2: not valid UTF-8."),
    (b"\n  \n", "the training text holds no words: a vocabulary cannot be learned from it."),
], ids=["not utf-8", "no words"])
def test_train_tokenizer_on_a_bad_corpus_is_one_line(tmp_path, content, words):
    """Before: a traceback from the Rust trainer naming neither file nor line, and an empty
    corpus "succeeded" with a vocabulary of the 5 special tokens."""
    (tmp_path / "corpus.txt").write_bytes(content)
    proc = subprocess.run([sys.executable, "-m", "ctxvec", "train-tokenizer", "corpus.txt", "-o", "tok"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 1 and proc.stderr.strip() == f"Error: {words}"
    assert not (tmp_path / "tok" / "tokenizer.json").exists()


def test_a_bare_ctxvec_prints_the_help():
    proc = subprocess.run([sys.executable, "-m", "ctxvec"], capture_output=True, text=True)
    assert (proc.stdout + proc.stderr).startswith("Usage: ") and "Commands:" in proc.stdout + proc.stderr


def test_running_out_of_memory_is_one_line(tiny_model, monkeypatch):
    from ctxvec.model.encoder import Encoder

    def allocate(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: "
                           "you tried to allocate 164282499072 bytes.")

    monkeypatch.setattr(Encoder, "forward", allocate)
    result = CliRunner().invoke(main, ["encode", "x", "--model", str(tiny_model)])
    assert result.exit_code == 1 and result.exception.__class__ is SystemExit
    assert result.output.startswith("Error: out of memory (") and "a smaller --batch-tokens" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_a_builtin_name_and_a_folder_of_that_name_say_which_was_loaded(tmp_path, tiny_model):
    (tmp_path / "seed").mkdir()
    proc = subprocess.run([sys.executable, "-m", "ctxvec", "encode", "x", "--model", "seed"], capture_output=True,
                          text=True, cwd=tmp_path)
    assert proc.returncode == 0
    assert "loading the built-in model 'seed'; for the folder of that name, give --model ./seed" in proc.stderr


# ---- every file every command writes is atomic, with one-line errors --------------------------

def _writers(tmp_path: Path, tiny_model: Path) -> dict[str, tuple[list[str], Path]]:
    """command line -> the file it writes, for every command that writes one."""
    from ctxvec.model.config import Seq2SeqConfig
    from ctxvec.model.translator import Translator
    from ctxvec.loading import seed_tokenizer
    from ctxvec.translate.pipeline import export_translator

    from conftest import tiny_config

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog\n" * 50)
    texts = tmp_path / "texts.txt"
    texts.write_text("el perro come pan\n" * 40)
    tokenizer = seed_tokenizer(max_len=32)
    translator = Translator(Seq2SeqConfig(tiny_config(vocab_size=tokenizer.vocab_size)))
    export_translator(tmp_path / "mt", translator, tokenizer, 32, "an untrained translator")
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 5.0 / s}) + "\n" for s in range(1, 9)))
    model = ["--model", str(tiny_model)]
    return {
        "encode .json": (["encode", "a", "b", *model, "-o", "out/v.json"], tmp_path / "out/v.json"),
        "encode .npy": (["encode", "a", *model, "-o", "out/v.npy"], tmp_path / "out/v.npy"),
        "encode .npz": (["encode", "a", "b", *model, "-o", "out/v.npz"], tmp_path / "out/v.npz"),
        "train-tokenizer": (["train-tokenizer", str(corpus), "-o", "out/tok.json", "--vocab-size", "60"],
                            tmp_path / "out/tok.json"),
        "translate": (["translate", "--file", str(texts), "--model", str(tmp_path / "mt"), "--beam", "1",
                       "-o", "out/en.txt"], tmp_path / "out/en.txt"),
        "explain": (["explain", "my name is aj", *model, "-o", "out/page.html"], tmp_path / "out/page.html"),
        "plot": (["plot", str(run), "-o", "out/loss.png"], tmp_path / "out/loss.png"),
    }


WRITERS = ["encode .json", "encode .npy", "encode .npz", "train-tokenizer", "translate", "explain", "plot"]


@pytest.fixture(scope="module")
def writers(tmp_path_factory, tiny_model):
    folder = tmp_path_factory.mktemp("writers")
    (folder / "out").mkdir()
    return folder, _writers(folder, tiny_model)


@pytest.mark.parametrize("name", WRITERS)
def test_a_file_size_limit_leaves_the_old_file_and_no_debris(writers, name):
    """Before: tracebacks, and truncated files (an invalid 20 kB JSON, a 0-byte .npz)."""
    folder, commands = writers
    args, target = commands[name]
    target.write_bytes(b"the previous file")
    limit = 256  # bytes: under every output, over nothing else a command writes
    proc = subprocess.run([sys.executable, "-m", "ctxvec", *args], capture_output=True, text=True, cwd=folder,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error")]
    assert errors == [f"Error: cannot write {target.relative_to(folder)}: the file would exceed this process's "
                      "file size limit (ulimit -f)."], proc.stderr
    assert target.read_bytes() == b"the previous file"
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]  # no temporary files left
    target.unlink()


@pytest.mark.parametrize("name", WRITERS)
def test_files_follow_the_umask(writers, name):
    """Before: files written atomically came out 0600 whatever the umask."""
    folder, commands = writers
    args, target = commands[name]
    for umask, mode in [(0o022, 0o644), (0o077, 0o600)][: 2 if name == "encode .json" else 1]:
        proc = subprocess.run([sys.executable, "-m", "ctxvec", *args], capture_output=True, text=True, cwd=folder,
                              preexec_fn=lambda: os.umask(umask))
        assert proc.returncode == 0, proc.stderr
        assert target.stat().st_mode & 0o777 == mode
        target.unlink()


@pytest.mark.parametrize("failure, words", [
    ("read-only", "read-only file system"),
    ("full", "no space left on the device"),
    ("denied", "permission denied"),
])
def test_write_failures_are_one_line_and_leave_nothing(tmp_path, tiny_model, monkeypatch, failure, words):
    import ctxvec.files as files

    code = {"read-only": errno.EROFS, "full": errno.ENOSPC, "denied": errno.EACCES}[failure]

    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    if failure == "full":  # the data is written, then fsync finds no room (as NFS reports it)
        monkeypatch.setattr(files, "fsync_file", fail)
    else:  # the temporary file cannot be created
        monkeypatch.setattr(files.os, "open", fail)
    out = tmp_path / "v.json"
    result = CliRunner().invoke(main, ["encode", "a", "--model", str(tiny_model), "-o", str(out)])
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1].startswith(f"Error: cannot write {out}: {words}")
    assert list(tmp_path.iterdir()) == []
