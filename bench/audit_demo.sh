#!/usr/bin/env bash
# `offsite audit` on the demo world: the data owner's attacks on the demo's emulator (uniform, adapter
# 2+2, 1 of 4 middle layers, as `offsite demo` builds it), at the same and at the strong budget.
# Task: the demo quiz, fine-tuned on its train people, scored on its test people (never seen in
# fine-tuning); honest fine-tune as in the demo (200 steps, lr 3e-4, batch 16). Public text of the
# recovery attack: the calibration default (War and Peace), which knows nothing of the demo world.
#
# Usage: bash bench/audit_demo.sh   -> bench/results/audit_demo/{same,strong}/audit.{json,md,png}
set -euo pipefail
cd "$(dirname "$0")/.."
W=runs/audit_demo
OUT=bench/results/audit_demo
.venv/bin/offsite demo --world --prepare-only --quiet --workdir "$W" > /dev/null
# The quiz under a folder named for it, so that tables label it "quiz".
mkdir -p "$W/quiz"
cp "$W/data/train.jsonl" "$W/data/validation.jsonl" "$W/data/test.jsonl" "$W/quiz/"
.venv/bin/offsite --quiet emulate --model "$W/model" --method uniform --adapter-layers 2,2 --emulator-layers 1 \
  --out "$W/emu" --overwrite
for budget in same strong; do
  .venv/bin/offsite --quiet audit --emulator "$W/emu" --model "$W/model" --tasks "$W/quiz/{split}.jsonl" \
    --split test --workdir "$W/audit-$budget" --budget "$budget" --max-steps 200 --lr 3e-4 --batch-size 16 \
    --device cpu
  mkdir -p "$OUT/$budget"
  cp "$W/audit-$budget"/audit.{json,md,png} "$OUT/$budget/"
done
