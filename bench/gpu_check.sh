#!/usr/bin/env bash
# One prepared GPU check: every workflow on a random-weight model of a real shape, on CUDA.
#
#   bash bench/gpu_check.sh [SHAPE] [OUT]        (default tinyllama-1.1b, bench/results/gpu_check)
#
# Builds a bf16 random-weight model (bench/make_random_model.py), then runs
# emulate --method gradot, finetune (adapter), eval (emulator + adapter, and plugged), plug, eval --stream
# of the plug-in (layers offloaded to the files, run on the GPU; must score as the plugged folder), all with
# --device cuda (DEVICE=cpu for a dry run). Each command's last stderr line is offsite's cost line (wall time, peak RSS,
# CUDA peak); they are collected into OUT/summary.json next to the full log. Never run by CI.
set -euo pipefail
cd "$(dirname "$0")/.."
SHAPE="${1:-tinyllama-1.1b}"
OUT="${2:-bench/results/gpu_check}"
PY="${PYTHON:-.venv/bin/python}"
OFFSITE="${OFFSITE:-.venv/bin/offsite}"
DEVICE="${DEVICE:-cuda}"   # DEVICE=cpu runs the same steps on the CPU (a dry run of this script)
DTYPE="${DTYPE:-bfloat16}" # DTYPE=float32 for a CPU dry run: bf16 matmuls are very slow on CPUs without AMX
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT"
LOG="$OUT/log.txt"
: > "$LOG"
if [ "$DEVICE" != cpu ]; then
  "$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))" \
    | tee -a "$LOG"
fi

step() {  # step NAME COMMAND...: run, keep the log, remember the cost line
  local name="$1"; shift
  echo "== $name: $*" | tee -a "$LOG"
  "$@" 2> >(tee -a "$LOG" "$WORK/$name.err" >&2) | tee -a "$LOG"
  tail -n 1 "$WORK/$name.err" > "$WORK/$name.cost"
}

step make "$PY" bench/make_random_model.py "$SHAPE" "$WORK/m" --dtype $DTYPE --device $DEVICE
step emulate $OFFSITE emulate --model "$WORK/m/model" --method gradot --param-budget 0.5 \
  --calibration "$WORK/m/public.txt" --device $DEVICE --out "$WORK/emu"
step finetune $OFFSITE finetune --emulator "$WORK/emu" --data "$WORK/m/task/train.jsonl" --format mc \
  --max-steps 50 --lr 2e-5 --batch-size 8 --device $DEVICE --out "$WORK/adapter"
step eval_emulator_ft $OFFSITE eval --model "$WORK/emu" --adapter "$WORK/adapter" \
  --tasks "$WORK/m/task/{split}.jsonl" --device $DEVICE --out "$WORK/emu_ft.json"
step plug $OFFSITE plug --model "$WORK/m/model" --adapter "$WORK/adapter" --emulator "$WORK/emu" \
  --device $DEVICE --out "$WORK/plugged"
step eval_plugged $OFFSITE eval --model "$WORK/plugged" --tasks "$WORK/m/task/{split}.jsonl" --device $DEVICE \
  --out "$WORK/plugged.json"
step eval_plugin_stream $OFFSITE eval --model "$WORK/m/model" --adapter "$WORK/adapter" --stream \
  --tasks "$WORK/m/task/{split}.jsonl" --device $DEVICE --out "$WORK/plugin_stream.json"
"$PY" -c "import json, sys; a, b = (json.load(open(p))['results'] for p in sys.argv[1:]); \
[r.pop('seconds') for r in (*a.values(), *b.values())]; \
print('eval --stream plug-in = plugged folder:', a == b)" "$WORK/plugged.json" "$WORK/plugin_stream.json" | tee -a "$LOG"
$OFFSITE verify "$WORK/plugged" | tee -a "$LOG"

"$PY" - "$WORK" "$OUT/summary.json" "$SHAPE" <<'EOF'
import json, re, sys
from pathlib import Path
work, out, shape = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
pattern = re.compile(r"done in ([\d.]+) s, peak RSS ([\d.]+) GB(?:, CUDA peak ([\d.]+) GB)?")
rows = {}
for cost in sorted(work.glob("*.cost")):
    m = pattern.search(cost.read_text())
    rows[cost.stem] = ({"seconds": float(m[1]), "peak_rss_gb": float(m[2]),
                        "cuda_peak_gb": float(m[3]) if m[3] else None} if m else {"line": cost.read_text().strip()})
plugged = json.loads((work / "plugged.json").read_text())
manifest = json.loads((work / "plugged" / "manifest.json").read_text())
dtypes = sorted({v[0] for v in manifest["tensors"]["model.safetensors"].values()})
json.dump({"shape": shape, "steps": rows, "plugged_dtypes": dtypes, "plugged_eval": plugged.get("results")},
          open(out, "w"), indent=2)
print(json.dumps(rows, indent=2))
EOF
