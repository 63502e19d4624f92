#!/usr/bin/env bash
# Creates .venv from a fresh clone: the CPU torch wheel, tokcomp (editable, with test extras) and the example plugin.
# Nothing downloads model weights; the tiny models are built in-process.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
quiet() { "$@" 2>&1 | { grep -v "is ignored" || true; }; }   # pip's exit status still fails the script
quiet .venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
quiet .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]" -e examples/tokcomp-example-plugin
.venv/bin/python -c "import torch, transformers, tokcomp; print('tokcomp', tokcomp.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
