#!/usr/bin/env bash
# GradOT vs uniform drop at matched emulator size on ../shared/models/ref-llama-12l.
# Usage: bash bench/gradot_vs_uniform.sh [--quick]   -> bench/results/gradot_vs_uniform/{metrics.json,report.json,report.md}
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 TOKENIZERS_PARALLELISM=false
.venv/bin/python bench/gradot_vs_uniform.py "$@"
rm -rf bench/results/gradot_vs_uniform/work
