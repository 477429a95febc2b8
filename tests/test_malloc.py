"""``ctxvec.malloc``: the ctxvec command starts itself again under jemalloc, and only the command."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ctxvec import malloc

PYTHON = sys.executable


@pytest.mark.parametrize("argv, orig_argv, expected", [
    (["-m", "embed"], ["python3", "-m", "ctxvec", "embed"], [PYTHON, "-m", "ctxvec", "embed"]),
    (["-m", "x"], ["python3", "-W", "error", "-X", "dev", "-m", "ctxvec", "x"],
     [PYTHON, "-W", "error", "-X", "dev", "-m", "ctxvec", "x"]),  # the interpreter's options kept
    (["-m", "x"], ["python3", "-mctxvec", "x"], [PYTHON, "-mctxvec", "x"]),
    (["/venv/bin/ctxvec", "serve"], ["/venv/bin/python", "/venv/bin/ctxvec", "serve"],
     [PYTHON, "/venv/bin/ctxvec", "serve"]),  # the installed script
    (["/venv/bin/ctxvec", "serve"], ["/usr/bin/python3", "-s", "/venv/bin/ctxvec", "serve"],
     [PYTHON, "-s", "/venv/bin/ctxvec", "serve"]),  # a shebang with the interpreter's options
    (["-m", "x"], ["python3", "-mpytest", "x"], None),
    (["-m"], ["python3", "-m", "pytest"], None),  # a program that imports ctxvec: never
    (["app.py"], ["python3", "app.py"], None),
    (["-c"], ["python3", "-c", "import ctxvec"], None),
    (["/home/ctxvec"], ["python3", "/home/ctxvec/app.py"], None),
])
def test_only_the_ctxvec_command_is_started_again(monkeypatch, argv, orig_argv, expected):
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setattr(sys, "orig_argv", orig_argv)
    assert malloc.command_argv() == expected


@pytest.fixture
def execs(monkeypatch):
    """The exec calls that start_again_under_jemalloc makes, in place of making them."""
    calls = []
    monkeypatch.setattr(malloc.os, "execve", lambda path, argv, env: calls.append((path, argv, env)))
    monkeypatch.setattr(malloc, "jemalloc_path", lambda: "/lib/libjemalloc.so.2")
    monkeypatch.setattr(malloc, "in_use", lambda: "system")
    monkeypatch.setattr(malloc, "_started_again", False)
    for name in ("LD_PRELOAD", "MALLOC_CONF", "CTXVEC_MALLOC", malloc.STARTED):
        monkeypatch.delenv(name, raising=False)
    return calls


@pytest.mark.parametrize("user_conf", [None, "narenas:1"])
def test_the_command_is_started_again_with_jemalloc_preloaded(monkeypatch, execs, user_conf):
    if user_conf:
        monkeypatch.setenv("MALLOC_CONF", user_conf)
    malloc.start_again_under_jemalloc([PYTHON, "-m", "ctxvec", "embed"])
    [(path, argv, env)] = execs
    assert path == PYTHON and argv == [PYTHON, "-m", "ctxvec", "embed"]
    assert env["LD_PRELOAD"] == "/lib/libjemalloc.so.2" and env[malloc.STARTED].startswith(f"{os.getpid()}:")
    assert env["MALLOC_CONF"] == (user_conf or malloc.JEMALLOC_CONF)
    assert "LD_PRELOAD" not in os.environ  # this process's own environment is untouched


@pytest.mark.parametrize("setting", [
    {"LD_PRELOAD": "/lib/libtcmalloc.so.4"},  # the user chose
    {"CTXVEC_MALLOC": "system"},  # the user opted out
])
def test_a_choice_of_the_users_is_kept(monkeypatch, execs, setting):
    for name, value in setting.items():
        monkeypatch.setenv(name, value)
    malloc.start_again_under_jemalloc([PYTHON, "-m", "ctxvec", "embed"])
    assert execs == []


def test_nothing_happens_without_jemalloc_or_a_command_or_with_jemalloc_mapped(monkeypatch, execs):
    malloc.start_again_under_jemalloc(None)
    monkeypatch.setattr(malloc, "in_use", lambda: "jemalloc")
    malloc.start_again_under_jemalloc([PYTHON, "-m", "ctxvec", "embed"])
    monkeypatch.setattr(malloc, "in_use", lambda: "system")
    monkeypatch.setattr(malloc, "jemalloc_path", lambda: None)
    malloc.start_again_under_jemalloc([PYTHON, "-m", "ctxvec", "embed"])
    assert execs == []


@pytest.mark.parametrize("user_conf", [None, "narenas:1"])
@pytest.mark.parametrize("loader_kept_preload", [True, False])  # glibc drops it for a setcap python
def test_the_process_started_again_gives_its_children_a_clean_start(monkeypatch, execs, user_conf,
                                                                     loader_kept_preload):
    if user_conf:
        monkeypatch.setenv("MALLOC_CONF", user_conf)
    malloc.start_again_under_jemalloc([PYTHON, "-m", "ctxvec", "embed"])
    [(_, _, env)] = execs
    for name in (malloc.STARTED, "LD_PRELOAD", "MALLOC_CONF"):  # what the second start finds
        monkeypatch.setenv(name, env[name])
    if not loader_kept_preload:
        monkeypatch.delenv("LD_PRELOAD")
    malloc.start_again_under_jemalloc(None)  # ctxvec/__init__.py, in a benchmark's process
    malloc.start_again_under_jemalloc([PYTHON, "benchmarks/bench_encode.py"])  # then the benchmark's own call
    assert len(execs) == 1  # never twice
    assert malloc.STARTED not in os.environ and "LD_PRELOAD" not in os.environ
    assert os.environ.get("MALLOC_CONF") == user_conf  # the user's own stays; ctxvec's goes


def test_a_failed_exec_goes_on_with_the_system_malloc(monkeypatch, execs):
    refused = []

    def refuse(*args):
        refused.append(args)
        raise PermissionError("exec not allowed")

    monkeypatch.setattr(malloc.os, "execve", refuse)
    malloc.start_again_under_jemalloc([PYTHON, "-m", "ctxvec", "embed"])  # returns: the command goes on
    assert len(refused) == 1 and "LD_PRELOAD" not in os.environ


def test_this_test_process_keeps_its_malloc():
    """pytest imports ctxvec but is not the command: it never runs under a malloc of ctxvec's."""
    assert malloc.command_argv() is None


def test_the_command_runs_with_its_standard_output_closed():
    """A daemon's command has no stdout (sys.stdout is None): the restart still goes through."""
    proc = subprocess.run(["bash", "-c", f"'{PYTHON}' -m ctxvec --version >&-"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
