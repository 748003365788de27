#!/usr/bin/env bash
# Recipe of the shipped EAGLE-3 head for smollm2-135m (src/ltd/assets/drafters/smollm2-135m-eagle3).
# Target features for ShareGPT conversations (original responses, the target's own top-8
# distributions as soft labels) are cached in runs/smollm2-eagle3/features; rerunning
# resumes. Stage 1 trains from scratch, stage 2 continues from stage 1's head with a new
# cosine schedule (the session budget split the run in two). Wall time and results on
# this machine are in README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
TOKENS=${TOKENS:-264045}
COMMON=(--target smollm2-135m --data sharegpt --max-tokens "$TOKENS" --draft-vocab 8192 --unroll 3
        --batch-tokens 2048 --eval-every 40 --threads "${THREADS:-2}" --features runs/smollm2-eagle3/features)
.venv/bin/ltd -v train-drafter "${COMMON[@]}" --out runs/smollm2-eagle3 --epochs 1.5
.venv/bin/ltd -v train-drafter "${COMMON[@]}" --out runs/smollm2-eagle3-s2 --epochs 2 --lr 4e-4 \
    --init runs/smollm2-eagle3/head
mkdir -p src/ltd/assets/drafters/smollm2-135m-eagle3
cp runs/smollm2-eagle3-s2/head/config.json runs/smollm2-eagle3-s2/head/model.safetensors \
    src/ltd/assets/drafters/smollm2-135m-eagle3/
