#!/usr/bin/env bash
# Recipe of the shipped EAGLE-3 head for smollm2-135m (src/ltd/assets/drafters/smollm2-135m-eagle3).
# Target features for 1M tokens of ShareGPT conversations (original responses, the target's
# own top-8 distributions as soft labels) are cached in runs/smollm2-eagle3/features;
# rerunning resumes. Stage 1 trains from scratch with a 16384-token draft vocabulary, stage 2
# continues from stage 1's head with a new cosine schedule (the time budget split the
# run in two), then the draft vocabulary is cut to its 12288 most frequent tokens so the
# fp16 file stays under 25 MB. Wall time and results: docs/results.md.
set -euo pipefail
cd "$(dirname "$0")/.."
TOKENS=${TOKENS:-1000000}
COMMON=(--target smollm2-135m --data sharegpt --max-tokens "$TOKENS" --draft-vocab 16384 --unroll 3
        --batch-tokens 2048 --eval-every 40 --threads "${THREADS:-2}" --features runs/smollm2-eagle3/features)
.venv/bin/ltd -v train-drafter "${COMMON[@]}" --out runs/smollm2-head-1m --epochs 1 --lr 6e-4
.venv/bin/ltd -v train-drafter "${COMMON[@]}" --out runs/smollm2-head-1m-s2 --epochs 1.5 --lr 4e-4 \
    --init runs/smollm2-head-1m/head
.venv/bin/ltd drafter shrink-vocab --head runs/smollm2-head-1m-s2/head \
    --features runs/smollm2-eagle3/features --size 12288 --out runs/smollm2-head-12k
mkdir -p src/ltd/assets/drafters/smollm2-135m-eagle3
cp runs/smollm2-head-12k/config.json runs/smollm2-head-12k/model.safetensors \
    src/ltd/assets/drafters/smollm2-135m-eagle3/
