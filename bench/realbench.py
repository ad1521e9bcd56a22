"""What the real-model benchmarks (real_diagnose, real_transfer, real_compensate, real_ot) share."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def smol_path() -> str:
    """The prepared SmolLM2-135M-Instruct fp32 folder (``offsite models prepare smollm2-135m`` first)."""
    done = subprocess.run([str(ROOT / ".venv/bin/offsite"), "models", "path", "smollm2-135m"], capture_output=True,
                          text=True, check=True)
    return done.stdout.strip().splitlines()[-1]


def save(results: dict, out: Path) -> None:
    """``out/results.json``, replaced atomically, so a stopped run never leaves half a file."""
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    tmp.replace(out / "results.json")


def begin(out: str, empty: dict) -> tuple:
    """Work from the repository root with the hub switched off; ``(out folder, results so far)``.

    The results are ``out/results.json`` when a run before left one (a rerun resumes), else ``empty``.
    """
    os.chdir(ROOT)
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "results.json"
    return folder, json.loads(path.read_text()) if path.exists() else empty
