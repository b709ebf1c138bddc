#!/usr/bin/env bash
# Quick start 1: set up, then attribute "The keys to the cabinet" -> " are" on the embedded SmolLM2 with
# semiring_maxpath (per-token table, entropy, top path). Extra arguments go to `inseq-semiring attribute`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV="${INSEQ_SEMIRING_VENV:-.venv}"
HF_HUB_OFFLINE=1 "$VENV/bin/inseq-semiring" attribute "$@"
