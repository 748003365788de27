#!/usr/bin/env bash
# Recipe of the shipped EAGLE-3 head for smollm2-135m (src/ltd/assets/drafters/smollm2-135m-eagle3).
# Target features for ShareGPT conversations (original responses, the target's own top-8
# distributions as soft labels) are cached in runs/smollm2-eagle3/features; rerunning
# resumes. Wall time and results on this machine are in README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
TOKENS=${TOKENS:-300000}
.venv/bin/ltd -v train-drafter --target smollm2-135m --data sharegpt --out runs/smollm2-eagle3 \
    --max-tokens "$TOKENS" --draft-vocab 8192 --unroll 3 --epochs "${EPOCHS:-1.0}" --batch-tokens 2048 \
    --eval-every 40 --threads "${THREADS:-2}" "$@"
mkdir -p src/ltd/assets/drafters/smollm2-135m-eagle3
cp runs/smollm2-eagle3/head/config.json runs/smollm2-eagle3/head/model.safetensors src/ltd/assets/drafters/smollm2-135m-eagle3/
