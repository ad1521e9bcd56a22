#!/usr/bin/env bash
# Uniform drop, OT-KD, CRaSh, ScaleOT and GradOT (when registered) side by side on one base model,
# adapter 2,2, emulators at matched size. Defaults: the reference Llama
# (../shared/models/ref-llama-12l, 12 layers: 8 middle layers), half of the middle's parameters
# (uniform/distill keep 4 layers, CRaSh K=4 clusters shared back to depth 8, ScaleOT replaces half
# by harmonizers + SRC beta 0.2, GradOT param_budget 0.5), tasks arc_easy, piqa, sciq + WikiText.
# Calibration (every learned method): War and Peace from the shared data (public text, disjoint
# from the tasks). Build cost: one fresh process per method (bench/measure_build.py).
#
# Usage: bash bench/compare_methods.sh [MODEL_DIR] [DATA_DIR]
#   -> bench/results/compare_methods/{summary.md,report.json,report.md,report.png,build.jsonl,
#      plugin_vs_emuft-<method>.png}
# Other models and tasks (bench/compare_methods_demo.sh does this): the environment variables
# OUT, TASKS, CAL, TITLE, REPORT_FLAGS (offsite report flags after --tasks) and SET_<method> (that
# method's KEY=VALUE settings) replace the defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL="${1:-../shared/models/ref-llama-12l}"
DATA="${2:-../shared/data}"
CAL="${CAL:-$DATA/lm/war_and_peace/war_and_peace_pg2600.txt.gz}"
OUT="${OUT:-bench/results/compare_methods}"
TASKS="${TASKS:-arc_easy,piqa,sciq,wikitext}"
REPORT_FLAGS="${REPORT_FLAGS:---limit 300 --train-limit 2000 --max-steps 150 --lr 3e-4 --batch-size 8}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 TOKENIZERS_PARALLELISM=false
# One thread unless told otherwise: on a shared 2-core box OpenMP spin-waiting makes small models
# several times slower with two.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
PY=.venv/bin/python

declare -A SETTINGS=(
  [uniform]="${SET_uniform:-emulator_layers=4}"
  [distill]="${SET_distill:-emulator_layers=4}"
  [crash]="${SET_crash:-emulator_layers=4 share=true}"
  [scaleot]="${SET_scaleot:-alpha=0.5 beta=0.2}"
  [gradot]="${SET_gradot:-param_budget=0.5}"
)
METHODS=(uniform distill crash scaleot)
if $PY -c "import sys; from offsite.emulator import available_methods; sys.exit('gradot' not in available_methods())"; then
  METHODS+=(gradot)
fi

mkdir -p "$OUT/work"
: > "$OUT/build.jsonl"
for m in "${METHODS[@]}"; do
  # shellcheck disable=SC2086  # settings are space-separated KEY=VALUE words
  $PY bench/measure_build.py "$MODEL" "$m" "$OUT/work/build-$m" --calibration "$CAL" --set ${SETTINGS[$m]} \
    | tail -n 1 >> "$OUT/build.jsonl"
done

COMMAND="${COMMAND:-bash bench/compare_methods.sh $MODEL $DATA}"
# Two report processes, one per core (each single-threaded): the first takes the full fine-tuning
# row and the first half of the methods, the second the rest; merge_reports.py joins them.
half=$(( (${#METHODS[@]} + 1) / 2 ))
GROUP_A=$(IFS=,; echo "${METHODS[*]:0:$half}")
GROUP_B=$(IFS=,; echo "${METHODS[*]:$half}")
run_report() {  # methods workdir [extra flags]
  local sets=() m kv
  for m in ${1//,/ }; do
    for kv in ${SETTINGS[$m]}; do sets+=(--method-set "$m:$kv"); done
  done
  .venv/bin/offsite report --model "$MODEL" --data-dir "$DATA" --calibration "$CAL" \
    --tasks "$TASKS" --methods "$1" --adapter-layers 2,2 "${sets[@]}" \
    $REPORT_FLAGS --workdir "$2" "${@:3}"  # REPORT_FLAGS: words on purpose
}
run_report "$GROUP_A" "$OUT/work/a" --full-ft > "$OUT/work/a.log" 2>&1 &
PID_A=$!
if [ -n "$GROUP_B" ]; then run_report "$GROUP_B" "$OUT/work/b" > "$OUT/work/b.log" 2>&1; fi
wait "$PID_A"
$PY bench/merge_reports.py "$OUT" "$OUT/work/a/report.json" ${GROUP_B:+"$OUT/work/b/report.json"}
$PY bench/summarise_compare.py "$OUT" "$COMMAND" "${TITLE:-}"
rm -rf "$OUT/work"
