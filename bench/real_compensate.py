"""Does absorbing the emulator's shortfall first make the adapter transfer? (issue 24, an experiment)

Usage (from the repository root; cells are resumable, each written to results.json when it ends):
    .venv/bin/python bench/real_compensate.py CELL [CELL ...]     # --list for the cells

The measured cause so far (bench/results/real_diagnose, real_transfer): an adapter tuned on an
emulator learns two things at once, the task (which transfers) and how to make up for the layers
the emulator lacks (which does not, and harms the full model). Here the model owner first tunes the
emulator's adapter layers on *public* text (WikiText-2 train, LM loss): ``W_c``. The data owner
starts from ``W_c`` (``finetune --init-adapter``) and tunes on the task: ``W_d``. Plugged in is only
the data owner's change: ``W_orig + (W_d - W_c)``; the task's own data never reaches the model owner.
Scored (first 200 SciQ validation questions, acc): the emulator with ``W_c`` (what the data owner
receives), emulator FT (``W_d`` in the emulator), the delta plug-in, and for comparison ``W_d``
plugged as is.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from realbench import ROOT, save, smol_path  # noqa: E402 (bench/ is on sys.path when run as a script)
LIMIT, TRAIN_LIMIT, BATCH = 200, 2000, 8

# name -> (emulate settings, compensation steps, compensation lr, task fine-tune settings)
CELLS = {
    "uniform-18-c100": ({"method": "uniform", "emulator_layers": 18}, 100, 1e-4, {"max_steps": 100, "lr": 1e-4}),
    "uniform-10-c100": ({"method": "uniform", "emulator_layers": 10}, 100, 1e-4, {"max_steps": 100, "lr": 1e-4}),
    "uniform-6-c100": ({"method": "uniform", "emulator_layers": 6}, 100, 1e-4, {"max_steps": 100, "lr": 1e-4}),
    "uniform-10-c300": ({"method": "uniform", "emulator_layers": 10}, 300, 1e-4, {"max_steps": 100, "lr": 1e-4}),
}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("cells", nargs="*")
    p.add_argument("--model", default=None)
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--workdir", default="runs/real_compensate")
    p.add_argument("--out", default="bench/results/real_compensate")
    p.add_argument("--list", action="store_true")
    args = p.parse_args()
    os.chdir(ROOT)
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if args.list:
        print("\n".join(f"{k}: {v}" for k, v in CELLS.items()))
        return 0
    out, work = Path(args.out), Path(args.workdir)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {"cells": {}}

    import torch

    from offsite.workflows.emulate import emulate
    from offsite.experiments.protocol import score, score_with, train_file, wikitext_train_text
    from offsite.workflows.finetune import finetune

    torch.set_num_threads(2)
    model = args.model or smol_path()
    task_data, fmt = train_file("sciq", args.data_dir, work, TRAIN_LIMIT)
    public = wikitext_train_text(args.data_dir, work)
    for name in args.cells:
        if name in results["cells"]:
            print(f"{name}: done before, skipped", flush=True)
            continue
        settings, c_steps, c_lr, ft = CELLS[name]
        t0 = time.time()
        emu_dir, a_c, a_d = work / f"emulator-{name}", work / f"comp-{name}", work / f"task-{name}"
        emulate(model, emu_dir, adapter_layers="2,2", overwrite=True, **settings)
        finetune(emu_dir, public, a_c, format="text", max_steps=c_steps, lr=c_lr, batch_size=BATCH, block_size=256,
                 eval_every=max(1, c_steps // 4), overwrite=True, device="cpu")
        comp_s = time.time() - t0
        finetune(emu_dir, task_data, a_d, format=fmt, init_adapter=str(a_c), batch_size=BATCH, val_limit=64,
                 eval_every=ft["max_steps"] // 4, overwrite=True, device="cpu", **ft)
        cell = {"emulate": settings, "compensation": {"steps": c_steps, "lr": c_lr, "text": "WikiText-2 train",
                                                      "block_size": 256, "seconds": round(comp_s, 1)},
                "finetune": ft}
        sc = lambda m, a: score_with(str(m), None if a is None else str(a), "sciq", args.data_dir,  # noqa: E731
                                     "validation", LIMIT, BATCH, "cpu")["acc"]
        cell["emu_comp_zs"] = sc(emu_dir, a_c)
        cell["emu_ft"] = sc(emu_dir, a_d)
        cell["plug_in_as_is"] = sc(model, a_d)
        full, tok = delta_plugged(model, a_c, a_d)
        cell["plug_in_delta"] = score(full, tok, "sciq", args.data_dir, "validation", LIMIT, BATCH)["acc"]
        cell["seconds"] = round(time.time() - t0, 1)
        results["cells"][name] = cell
        save(results, out)
        print(f"{name}: {json.dumps(cell)}", flush=True)
    return 0


def delta_plugged(model: str, a_c: Path, a_d: Path):
    """The full model with ``W_orig + (W_d - W_c)`` in its adapter layers (both artifacts checked)."""
    import torch

    from offsite.adapters.artifact import load_adapter
    from offsite.model.loading import load_model

    full, tok = load_model(model)
    _, comp = load_adapter(a_c)
    _, tuned = load_adapter(a_d)
    state = full.state_dict()
    with torch.no_grad():
        for k, w_d in tuned.items():
            state[k].add_(w_d.float() - comp[k].float())
    full.eval()
    return full, tok



if __name__ == "__main__":
    sys.exit(main())
