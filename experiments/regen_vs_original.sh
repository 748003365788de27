#!/usr/bin/env bash
# Regenerated responses vs original ShareGPT responses as training data for the EAGLE-3 head
# (which gives longer acceptance for the same CPU time?): both arms continue the shipped head for the same number of optimizer steps,
# each on one core, side by side; acceptance is then measured on the held-out bench suites
# (mean accepted per cycle does not depend on timing, so the two evaluations may share the
# machine). CPU times of every stage are in the logs (tqdm rates and the trainer's summary).
#
#   REGEN=runs/regen/sharegpt_regen.jsonl bash experiments/regen_vs_original.sh
#
# REGEN: the output of `ltd regenerate --data sharegpt ...` (the target's own greedy answers).
set -euo pipefail
cd "$(dirname "$0")/.."
REGEN=${REGEN:?set REGEN to a jsonl written by ltd regenerate}
EPOCHS_R=${EPOCHS_R:-2}
HEAD=src/ltd/assets/drafters/smollm2-135m-eagle3
COMMON=(--target smollm2-135m --unroll 3 --batch-tokens 2048 --eval-every 20 --threads 1 --lr 3e-4 --init "$HEAD")
mkdir -p runs/cmp
# Arm R: the target's regenerated answers (all of the file).
OMP_NUM_THREADS=1 .venv/bin/ltd -v train-drafter "${COMMON[@]}" --data "$REGEN" --max-tokens 100000000 \
    --epochs "$EPOCHS_R" --out runs/cmp/regen > runs/cmp/regen.log 2>&1 &
R=$!
# Arm O: original ShareGPT answers with the target's soft labels (the cached features of the
# shipped head's recipe), for the same number of steps: epochs scaled by the token ratio.
wait_for_manifest() { while [ ! -f runs/cmp/regen/train_config.json ]; do sleep 20; done; }
wait_for_manifest
RTOK=$(python3 -c "import json;print(json.load(open('runs/cmp/regen/features/manifest.json'))['tokens'])")
OTOK=$(python3 -c "import json;print(json.load(open('runs/smollm2-eagle3/features/manifest.json'))['tokens'])")
EPOCHS_O=$(python3 -c "print(round($EPOCHS_R * $RTOK / $OTOK, 4))")
OMP_NUM_THREADS=1 .venv/bin/ltd -v train-drafter "${COMMON[@]}" --data sharegpt --max-tokens "$OTOK" \
    --features runs/smollm2-eagle3/features --epochs "$EPOCHS_O" --out runs/cmp/original > runs/cmp/original.log 2>&1 &
O=$!
wait $R $O
bench() {  # arm, head dir
  OMP_NUM_THREADS=1 .venv/bin/ltd bench --suites alpaca,gsm8k,humaneval,mt_bench,qa,sum --limit 4 --repeats 1 \
      --max-new-tokens 64 --threads 1 --drafter "$2" --methods hf,static:2x8x8 --out "runs/cmp/bench-$1"
}
bench regen runs/cmp/regen/head &
bench original runs/cmp/original/head &
wait
bench shipped "$HEAD"
.venv/bin/python - <<'EOF'
import json
for arm in ("shipped", "regen", "original"):
    d = json.load(open(f"runs/cmp/bench-{arm}/results.json"))
    print(arm, {s: round(v["static:2x8x8"]["mean_accepted"], 3) for s, v in d["suites"].items()},
          "overall", round(d["methods"]["static:2x8x8"]["mean_accepted"], 3))
EOF
