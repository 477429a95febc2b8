"""``ctxvec.malloc``: the ctxvec command starts itself again under jemalloc, and only the command."""

from __future__ import annotations

import os
import sys

import pytest

from ctxvec import malloc

PYTHON = sys.executable


@pytest.mark.parametrize("argv, orig_argv, expected", [
    (["-m", "embed"], ["python3", "-m", "ctxvec", "embed"], [PYTHON, "-m", "ctxvec", "embed"]),
    (["-m", "x"], ["python3", "-W", "error", "-X", "dev", "-m", "ctxvec", "x"],
     [PYTHON, "-W", "error", "-X", "dev", "-m", "ctxvec", "x"]),  # the interpreter's options kept
    (["/venv/bin/ctxvec", "serve"], ["/venv/bin/python", "/venv/bin/ctxvec", "serve"],
     [PYTHON, "/venv/bin/ctxvec", "serve"]),  # the installed script
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
    assert env["LD_PRELOAD"] == "/lib/libjemalloc.so.2" and env[malloc.STARTED] == str(os.getpid())
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


def test_the_process_started_again_gives_its_children_a_clean_start(monkeypatch, execs):
    monkeypatch.setenv(malloc.STARTED, str(os.getpid()))
    monkeypatch.setenv("LD_PRELOAD", "/lib/libjemalloc.so.2")
    monkeypatch.setenv("MALLOC_CONF", malloc.JEMALLOC_CONF)
    malloc.start_again_under_jemalloc(None)  # ctxvec/__init__.py, in a benchmark's process
    malloc.start_again_under_jemalloc([PYTHON, "benchmarks/bench_encode.py"])  # then the benchmark's own call
    assert execs == []  # never twice
    assert malloc.STARTED not in os.environ and "LD_PRELOAD" not in os.environ
    # A child (another process id) that is the command starts itself again: it sees no marker.
    assert os.environ["MALLOC_CONF"] == malloc.JEMALLOC_CONF


def test_a_failed_exec_goes_on_with_the_system_malloc(monkeypatch, execs):
    def refuse(*args):
        raise PermissionError("exec not allowed")

    monkeypatch.setattr(malloc.os, "execve", refuse)
    assert malloc.start_again_under_jemalloc([PYTHON, "-m", "ctxvec", "embed"]) is None


def test_this_test_process_keeps_its_malloc():
    """pytest imports ctxvec but is not the command: it never runs under a malloc of ctxvec's."""
    assert malloc.command_argv() is None
