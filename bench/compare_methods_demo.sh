#!/usr/bin/env bash
# The five emulator methods on the demo's generated world, where the answers live in the middle
# layers (see README, "The demo"): unlike the reference Llama, whose task accuracies sit a few
# points above chance, this base model knows its quiz (full zero-shot ~96%), so the methods'
# privacy (emulator ZS / FT) and utility (plug-in) can be told apart.
#
# Base model: `offsite demo --prepare-only` (8-layer Llama, 1M parameters, seed 0) -> adapter 2,2,
# 4 middle layers; every emulator at half of the middle's parameters (uniform/distill keep 2
# layers, CRaSh K=2 shared back to depth 4, ScaleOT replaces 2 by harmonizers + SRC beta 0.2,
# GradOT param_budget 0.5). Calibration: the demo's pretraining corpus (the model owner's own text;
# the quiz's train/test people are both in it, as the pretraining data always is; it holds 146
# windows of 128 tokens, so OT-KD draws 128 windows instead of its default 256). Task: the quiz,
# fine-tuned on its train people, scored on its test people (never seen in fine-tuning).
#
# Usage: bash bench/compare_methods_demo.sh
#   -> bench/results/compare_methods_demo/{summary.md,report.json,report.md,report.png,build.jsonl,...}
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=runs/compare_methods_demo
.venv/bin/offsite demo --world --prepare-only --quiet --workdir "$WORK" > /dev/null
# The quiz under a folder named for it, so that tables label it "quiz".
mkdir -p "$WORK/quiz"
cp "$WORK/data/train.jsonl" "$WORK/data/validation.jsonl" "$WORK/data/test.jsonl" "$WORK/quiz/"
OUT=bench/results/compare_methods_demo \
TASKS="$WORK/quiz/{split}.jsonl" \
CAL="$WORK/data/corpus.txt" \
TITLE="the demo world (8-layer Llama, 4 middle layers)" \
COMMAND="bash bench/compare_methods_demo.sh" \
REPORT_FLAGS="--split test --max-steps 200 --lr 3e-4 --batch-size 16" \
SET_uniform="emulator_layers=2" SET_distill="emulator_layers=2 num_sequences=128" \
  SET_crash="emulator_layers=2 share=true" \
  bash bench/compare_methods.sh "$WORK/model" "$WORK/data"
