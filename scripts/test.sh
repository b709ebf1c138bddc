#!/usr/bin/env bash
# Quick start 2: set up, then run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV="${INSEQ_SEMIRING_VENV:-.venv}"
HF_HUB_OFFLINE=1 "$VENV/bin/python" -m pytest -q "$@"
