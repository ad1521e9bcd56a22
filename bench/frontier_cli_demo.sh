#!/usr/bin/env bash
# `offsite frontier` on the demo world of seed 0 (as bench/choose_defaults.py prepares it): GradOT at
# two budgets x three privacy weights, each point fine-tuned (the demo's 200 steps, lr 3e-4, batch 16)
# and scored on the *validation* people with the strongest audit attack (--audit); the target is a
# margin of 40 points between the plug-in and the best attack. The chosen emulator is then scored on
# the *test* people by `offsite report`-style eval (the frontier never sees them).
#
# Usage: bash bench/frontier_cli_demo.sh   -> bench/results/frontier_cli_demo/frontier.{json,md,png}
set -euo pipefail
cd "$(dirname "$0")/.."
W=runs/choose_defaults/seed0
OUT=bench/results/frontier_cli_demo
.venv/bin/offsite demo --world --prepare-only --quiet --workdir "$W" > /dev/null
mkdir -p "$W/quiz"
cp "$W/data/train.jsonl" "$W/data/validation.jsonl" "$W/data/test.jsonl" "$W/quiz/"
.venv/bin/offsite --quiet frontier --model "$W/model" --method gradot --tasks "$W/quiz/{split}.jsonl" \
  --calibration "$W/data/corpus.txt" --values 0.25,0.4 --lambdas 0.25,1,4 --min-delta 40 --audit \
  --split validation --max-steps 200 --lr 3e-4 --batch-size 16 --workdir "$W/frontier" --out "$W/frontier-chosen" \
  --overwrite --device cpu
mkdir -p "$OUT"
cp "$W/frontier"/frontier.{json,md,png} "$OUT/"
