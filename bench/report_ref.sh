#!/usr/bin/env bash
# Five OT numbers + Δ for the uniform-drop emulator on the reference Llama (../shared/models/ref-llama-12l).
# Usage: bash bench/report_ref.sh [MODEL_DIR] [DATA_DIR]   -> bench/results/report_ref/{report.json,report.md,report.png}
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL="${1:-../shared/models/ref-llama-12l}"
DATA="${2:-../shared/data}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 TOKENIZERS_PARALLELISM=false
# One thread by default: on a shared 2-core box OpenMP spin-waiting makes small models far slower with 2.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
OUT=bench/results/report_ref
.venv/bin/offsite report --model "$MODEL" --data-dir "$DATA" \
  --tasks arc_easy,piqa,sciq,wikitext --methods uniform --adapter-layers 2,2 --emulator-layers 4 \
  --limit 300 --train-limit 2000 --max-steps 150 --lr 3e-4 --batch-size 8 --full-ft --workdir "$OUT/work"
cp "$OUT/work/report.json" "$OUT/work/report.md" "$OUT/" && cp "$OUT/work/report.png" "$OUT/" 2>/dev/null || true
rm -rf "$OUT/work"
