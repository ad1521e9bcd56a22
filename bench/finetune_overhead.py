"""Time a default-settings fine-tune and how much of it goes to validation and checkpoints.

Usage: python bench/finetune_overhead.py [--steps 200] [--lines 40000] [--work DIR] [--set KEY=VALUE ...]

Why: validation and checkpoints are pure overhead of ``offsite finetune``; the defaults must keep
them to about a tenth of a run. This script builds a small random Llama (8 layers, hidden 256,
intermediate 512; the tiny config's 128 positions cap the default ``block_size`` of 512 at 128)
with the test suite's tiny tokenizer, a uniform emulator with adapter ``2,2``, and a text file
large enough that the default 5 % hold-out exceeds the old ``val_limit`` of 256 blocks. It then runs ``finetune`` with
default settings (plus ``max_steps``, CPU, no progress bar, and any ``--set``), timing every call
of the validation and checkpoint functions through thin wrappers, and prints one JSON object:
total seconds, validation seconds and calls, checkpoint seconds, calls and bytes written, and the
overhead share. Run it in a fresh process (one thread, like the tests) so nothing else is timed.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # conftest's tiny tokenizer and model factory (no downloads)


def _text(lines: int, seed: int = 0) -> str:
    """Sentences shuffled from the test vocabulary: varied enough that the loss keeps moving."""
    from conftest import SENTENCES

    words = " ".join(SENTENCES).split()
    rng = random.Random(seed)
    return "\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(8, 24))) for _ in range(lines))


def _timed(module, name: str, record: dict, size_of=None):
    """Replace ``module.name`` by a wrapper adding its wall time to ``record``; returns the original.

    ``size_of(first argument)``, when given, is added to ``record["bytes"]`` after each call (outside
    the timed span: for a checkpoint it is the folder just written).
    """
    real = getattr(module, name)

    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        result = real(*args, **kwargs)
        record["seconds"] += time.perf_counter() - started
        record["calls"] += 1
        if size_of is not None:
            record["bytes"] += size_of(args[0])
        return result

    setattr(module, name, wrapper)
    return real


def _folder_bytes(folder) -> int:
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.is_file())


def main(argv=None) -> int:
    import torch
    from conftest import make_model, make_tokenizer

    import offsite.workflows.finetune as ft
    from offsite.cli.common import parse_settings
    from offsite.workflows.emulate import emulate

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lines", type=int, default=40000, help="lines of training text (5 %% are held out)")
    p.add_argument("--work", default=None, help="folder for the model, emulator and adapter (default: a temp dir)")
    p.add_argument("--set", dest="settings", nargs="*", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    work = Path(args.work or tempfile.mkdtemp(prefix="offsite-ft-bench-"))
    model_dir, data = work / "model", work / "train.txt"
    if not (model_dir / "config.json").is_file():
        make_model("llama", 8, hidden_size=256, intermediate_size=512).save_pretrained(model_dir)
        make_tokenizer().save_pretrained(model_dir)
    data.write_text(_text(args.lines))
    emu = emulate(str(model_dir), work / "emu", adapter_layers="2,2", overwrite=True)

    validation = {"seconds": 0.0, "calls": 0}
    checkpoints = {"seconds": 0.0, "calls": 0, "bytes": 0}
    _timed(ft, "_validate", validation)
    real_save = _timed(ft, "save_checkpoint", checkpoints, _folder_bytes)
    settings = {"max_steps": args.steps, "device": "cpu", "progress": False, **parse_settings(args.settings)}
    started = time.perf_counter()
    out = ft.finetune(emu, data, work / "adapter", overwrite=True, resume=False, **settings)
    total = time.perf_counter() - started
    ft.save_checkpoint = real_save
    log = json.loads((out / "training_log.json").read_text())
    resolved = json.loads((out / "settings.json").read_text())
    overhead = validation["seconds"] + checkpoints["seconds"]
    print(json.dumps({
        "steps": log["steps"], "total_seconds": round(total, 2),
        "validation": {"seconds": round(validation["seconds"], 2), "calls": validation["calls"],
                       "examples": log["val_examples"]},
        "checkpoints": {"seconds": round(checkpoints["seconds"], 2), "calls": checkpoints["calls"],
                        "bytes": checkpoints["bytes"]},
        "overhead_share": round(overhead / total, 3),
        "settings": {k: resolved.get(k) for k in ("eval_every", "save_every", "val_limit", "block_size",
                                                   "batch_size", "precision")},
        "train_examples": log["train_examples"], "best_val_loss": log["best_val_loss"],
        "torch": torch.__version__, "threads": torch.get_num_threads(),
    }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
