#!/usr/bin/env bash
# The test command: set up everything from a fresh clone, then run the whole suite (one torch thread per process).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=1
exec .venv/bin/python -m pytest -q "$@"
