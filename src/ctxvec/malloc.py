"""Which malloc the ``ctxvec`` command runs with: jemalloc where the machine has it.

A forward pass makes and frees hundreds of tensors of ever-different sizes, from two streams
(threads) at once. glibc's malloc serves them ~5-10% slower in bf16 than jemalloc does (fp32,
where the matrix multiplies take most of the time, is level: BENCHMARKS.md), and PyTorch's CPU
tuning guide gives the same advice. A process picks its malloc when it starts, through the
dynamic loader (``LD_PRELOAD``), so the command starts itself again under jemalloc before it
imports anything else (``ctxvec/__init__.py`` calls ``run_command_under_jemalloc`` first).
The exec keeps the process id, its open files and its standard streams; it costs ~20 ms.

- Only the ``ctxvec`` command (``ctxvec ...``, ``python -m ctxvec ...``, ``torchrun -m ctxvec``)
  does this: a program that imports ctxvec keeps its malloc (set ``LD_PRELOAD`` for it as the
  README shows).
- It does not where ``LD_PRELOAD`` is set already (the user chose), where
  ``CTXVEC_MALLOC=system``, off Linux, or where no jemalloc is installed (``scripts/setup.sh``
  installs Debian's ``libjemalloc2``; without it the command runs on glibc's malloc, as before).
- The process takes ``LD_PRELOAD`` (and ``MALLOC_CONF`` where it set it) out of its environment
  again once started, so the programs it starts (compilers, a browser, its own worker
  processes, which each do this themselves) start as they would have.
- A library that frees with glibc what another malloc allocated cannot run under it (OpenVINO
  aborts so); the command loads none such.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Debian/Ubuntu (multiarch), Fedora/RHEL, others, and a conda environment's own.
JEMALLOC_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib",
                 "/usr/local/lib", f"{sys.prefix}/lib")
JEMALLOC = "libjemalloc.so.2"
# background_thread: freed pages go back to the system on a thread of jemalloc's own, on time,
# not on the next allocation of a compute thread; the resident memory of a long job stays flat.
JEMALLOC_CONF = "background_thread:true"
STARTED = "CTXVEC_MALLOC_STARTED"  # "PID:" or "PID:conf" (ctxvec set MALLOC_CONF) of the process started again
_started_again = False  # this process is one that was (its environment no longer says so)


def jemalloc_path() -> str | None:
    return next((str(p) for d in JEMALLOC_DIRS if (p := Path(d) / JEMALLOC).is_file()), None)


def command_argv() -> list[str] | None:
    """The command line that runs this interpreter's ``ctxvec`` command again, or None when this
    interpreter runs something else (a program or a test that imports ctxvec)."""
    argv = list(getattr(sys, "orig_argv", []))
    if sys.argv[:1] == ["-m"]:  # python [options] -m ctxvec ... (or -mctxvec), while it is found
        for at, arg in enumerate(argv[1:], start=1):
            if arg == "-mctxvec" or (arg == "-m" and argv[at + 1:at + 2] == ["ctxvec"]):
                return [sys.executable, *argv[1:]]
            if arg.startswith("-m"):
                return None
        return None
    if sys.argv[:1] and Path(sys.argv[0]).name == "ctxvec" and sys.argv[0] in argv[1:]:  # the script
        at = argv.index(sys.argv[0], 1)  # after the interpreter's options (a shebang's too)
        return [sys.executable, *argv[1:]] if argv[at + 1:] == sys.argv[1:] else None
    return None


def in_use(pid: int | str = "self") -> str | None:
    """The malloc a process (this one by default) runs with, as its loader mapped it: "jemalloc"
    or "system"; None where its maps cannot be read (no /proc, or the process has ended)."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return None
    return "jemalloc" if "libjemalloc" in maps else "system"


def run_command_under_jemalloc() -> None:
    """Start this ``ctxvec`` command again under jemalloc (see the module's text); returns where
    it does not, and in the process that was started again."""
    start_again_under_jemalloc(command_argv())


def start_again_under_jemalloc(argv: list[str] | None) -> None:
    """Replace this process with ``argv`` (this same program's command line) under jemalloc, or
    return: where it is the process started so (whose children then start clean), where
    ``argv`` is None, and where it does not apply (see the module's text). Benchmarks call it to
    run as the command does."""
    global _started_again
    env = os.environ
    pid, _, added_conf = env.get(STARTED, "").partition(":")
    if pid == str(os.getpid()):  # the second start: its children start as they would have
        for name in [STARTED, "LD_PRELOAD"] + (["MALLOC_CONF"] if added_conf else []):
            env.pop(name, None)  # (the loader may have dropped LD_PRELOAD itself: a setcap python)
        _started_again = True
    if _started_again or argv is None or sys.platform != "linux" or env.get("LD_PRELOAD") \
            or env.get("CTXVEC_MALLOC") == "system":
        return
    library = jemalloc_path()
    if library is None or in_use() == "jemalloc":  # never twice
        return
    # The user's own MALLOC_CONF is kept (and left to the children); ctxvec's, marked, is not.
    marker = f"{os.getpid()}:" if env.get("MALLOC_CONF") else f"{os.getpid()}:conf"
    env = {"MALLOC_CONF": JEMALLOC_CONF, **env, STARTED: marker, "LD_PRELOAD": library}
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:  # (None where the descriptor is closed)
            stream.flush()
    try:
        os.execve(argv[0], argv, env)
    except OSError:  # cannot exec (a sandbox): on with glibc's malloc
        return
