#!/usr/bin/env bash
# Create .venv with the CPU build of torch; never pulls the CUDA wheels.
# EXTRAS selects the optional dependencies (default: test,lora,plot,eval,dp,fl).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
EXTRAS="${EXTRAS:-test,lora,plot,eval,dp,fl}"
FIND_LINKS="${PIP_FIND_LINKS:-$("$PY" -m pip config get global.find-links 2>/dev/null || true)}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
if [ -z "${NO_UV:-}" ] && .venv/bin/python -m pip install -q uv 2>/dev/null; then
  UV_FIND_LINKS="$FIND_LINKS" .venv/bin/uv pip install -q -p .venv/bin/python -c constraints.txt -e ".[$EXTRAS]"
else
  .venv/bin/python -m pip install -q -c constraints.txt -e ".[$EXTRAS]"
fi
.venv/bin/python -c "import torch; assert not torch.version.cuda, torch.version.cuda; print('torch', torch.__version__)"
