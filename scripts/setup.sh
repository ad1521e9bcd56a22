#!/usr/bin/env bash
# Create a venv with the CPU build of torch; never pulls the CUDA wheels.
# EXTRAS selects the optional dependencies (default: all).
# VENV (default .venv) and CONSTRAINTS (default constraints.txt, the versions the suite last passed
# with) let .ci/run build a second venv on the newest versions pyproject's ranges allow
# (CONSTRAINTS=constraints-newest.txt pins torch's CPU wheel and nothing else).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
EXTRAS="${EXTRAS:-all}"
VENV="${VENV:-.venv}"
CONSTRAINTS="${CONSTRAINTS:-constraints.txt}"
FIND_LINKS="${PIP_FIND_LINKS:-$("$PY" -m pip config get global.find-links 2>/dev/null || true)}"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
if [ -z "${NO_UV:-}" ] && "$VENV/bin/python" -m pip install -q uv 2>/dev/null; then
  UV_FIND_LINKS="$FIND_LINKS" "$VENV/bin/uv" pip install -q -p "$VENV/bin/python" -c "$CONSTRAINTS" -e ".[$EXTRAS]"
else
  "$VENV/bin/python" -m pip install -q -c "$CONSTRAINTS" -e ".[$EXTRAS]"
fi
"$VENV/bin/python" -c "import torch; assert not torch.version.cuda, torch.version.cuda; print('torch', torch.__version__)"
