"""Does an adapter tuned on an emulator transfer to SmolLM2? One fine-tune per cell (issue 24 item 1-2).

Usage (from the repository root):
    .venv/bin/python bench/real_transfer.py CELL [CELL ...] [--model DIR] [--workdir runs/real_transfer]
                                            [--out bench/results/real_transfer]
    .venv/bin/python bench/real_transfer.py --list          # the cells known
    .venv/bin/python bench/real_transfer.py --render        # results.md from results.json

Each cell is what ``offsite report --model SMOL --tasks sciq --methods M --adapter-layers A --limit 200
--train-limit 2000 --max-steps N --lr LR --batch-size 8`` does for one method, done step by step so
that full zero-shot is scored once and not per cell: the SciQ training file of the first 2000
questions (report's ``train_file``, the task's own prompt template), ``emulate`` (default public
calibration), emulator zero-shot, ``finetune`` (batch 8, cosine schedule, validation on 5% held out
every N/4 steps and the weights with the lowest *emulator* validation loss kept, as report does),
then the adapter scored in the emulator (emulator FT) and plugged into the full model (plug-in),
on the first 200 SciQ **validation** questions (acc; standard error about 3 points). Each finished
cell is written to ``results.json`` at once (a rerun skips it) with its settings, the equivalent
commands and the fine-tune's loss log.
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

# name -> (method, emulate settings, adapter layers, finetune settings)
CELLS = {
    "uniform-6": ("uniform", {"emulator_layers": 6}, "2,2", {"max_steps": 100, "lr": 1e-4}),
    "uniform-16": ("uniform", {"emulator_layers": 16}, "2,2", {"max_steps": 100, "lr": 1e-4}),
    "uniform-20": ("uniform", {"emulator_layers": 20}, "2,2", {"max_steps": 100, "lr": 1e-4}),
    "uniform-24": ("uniform", {"emulator_layers": 24}, "2,2", {"max_steps": 100, "lr": 1e-4}),
    "distill-10": ("distill", {"emulator_layers": 10}, "2,2", {"max_steps": 100, "lr": 1e-4}),
    "distill-10-300": ("distill", {"emulator_layers": 10, "steps": 300}, "2,2", {"max_steps": 100, "lr": 1e-4}),
    "gradot-0.6-lam0": ("gradot", {"param_budget": 0.6, "lambda_attn": 0.0, "lambda_mlp": 0.0}, "2,2",
                        {"max_steps": 100, "lr": 1e-4}),
    "gradot-0.4-lam0": ("gradot", {"param_budget": 0.4, "lambda_attn": 0.0, "lambda_mlp": 0.0}, "2,2",
                        {"max_steps": 100, "lr": 1e-4}),
    "scaleot-a0.25": ("scaleot", {"alpha": 0.25}, "2,2", {"max_steps": 100, "lr": 1e-4}),
    "crash": ("crash", {}, "2,2", {"max_steps": 100, "lr": 1e-4}),
    # the adapter on top only: the bottom adapter's gradient does not transfer (bench/results/real_diagnose)
    "uniform-10-ad0.2": ("uniform", {"emulator_layers": 10}, "0,2", {"max_steps": 100, "lr": 1e-4}),
    "uniform-10-ad0.4": ("uniform", {"emulator_layers": 10}, "0,4", {"max_steps": 100, "lr": 1e-4}),
    "uniform-6-ad0.4": ("uniform", {"emulator_layers": 6}, "0,4", {"max_steps": 100, "lr": 1e-4}),
    "uniform-10-ad2.2": ("uniform", {"emulator_layers": 10}, "2,2", {"max_steps": 100, "lr": 1e-4}),
    # 18 of 26 keeps layer 11, the one whose removal alone costs 2.1 nats (uniform 16 drops it)
    "uniform-18": ("uniform", {"emulator_layers": 18}, "2,2", {"max_steps": 100, "lr": 1e-4}),
    # only the top adapter trains (finetune --train-adapter top): the bottom one's gradient does not transfer
    "uniform-18-top": ("uniform", {"emulator_layers": 18}, "2,2",
                       {"max_steps": 100, "lr": 1e-4, "train_adapter": "top"}),
    "uniform-24-top": ("uniform", {"emulator_layers": 24}, "2,2",
                       {"max_steps": 100, "lr": 1e-4, "train_adapter": "top"}),
    "distill-10-top": ("distill", {"emulator_layers": 10, "kd_scale": "token"}, "2,2",
                       {"max_steps": 100, "lr": 1e-4, "train_adapter": "top"}),
}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("cells", nargs="*")
    p.add_argument("--model", default=None, help="base model folder (default: offsite models path smollm2-135m)")
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--workdir", default="runs/real_transfer")
    p.add_argument("--out", default="bench/results/real_transfer")
    p.add_argument("--list", action="store_true")
    p.add_argument("--render", action="store_true")
    p.add_argument("--full-zs", type=float, default=None,
                   help="full zero-shot acc measured before on the same questions (skips scoring it)")
    p.add_argument("--finetune-s", type=float, default=None, help="fine-tune seconds of a run resumed at scoring")
    p.add_argument("--no-emu-zs", action="store_true", help="skip emulator zero-shot (saves minutes on 2 cores)")
    args = p.parse_args()
    os.chdir(ROOT)
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {"cells": {}}
    if args.list:
        print("\n".join(f"{k}: {v}" for k, v in CELLS.items()))
        return 0
    if args.render:
        (out / "results.md").write_text(render(results))
        return 0

    import torch

    from offsite.workflows.emulate import emulate
    from offsite.experiments.protocol import score, score_with, train_file
    from offsite.workflows.finetune import finetune
    from offsite.model.loading import load_model

    torch.set_num_threads(2)
    model = args.model or smol_path()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    data, fmt = train_file("sciq", args.data_dir, work, TRAIN_LIMIT)
    results.setdefault("setup", {
        "model": "SmolLM2-135M-Instruct, fp32 (offsite models path smollm2-135m)",
        "task": f"sciq: fine-tuned on the first {TRAIN_LIMIT} training questions (report's train_file), scored on "
                f"the first {LIMIT} validation questions (acc)",
        "batch_size": BATCH})
    if "full_zs" not in results:
        if args.full_zs is not None:  # measured before on the same 200 questions; scoring it costs ~11 min here
            results["full_zs"], results["full_zs_source"] = args.full_zs, "given (--full-zs)"
        else:
            base, tok = load_model(model)
            results["full_zs"] = score(base, tok, "sciq", args.data_dir, "validation", LIMIT, BATCH)["acc"]
            results["full_zs_source"] = "scored here"
            del base
        save(results, out)
    print(f"full zero-shot {results['full_zs']}", flush=True)
    for name in args.cells:
        if name in results["cells"]:
            print(f"{name}: done before, skipped", flush=True)
            continue
        method, settings, adapter_layers, ft = CELLS[name]
        ft = {"batch_size": BATCH, "val_limit": 64, "eval_every": max(1, ft["max_steps"] // 4), **ft}
        t0 = time.time()
        emu_dir, adapter = work / f"emulator-{name}", work / f"adapter-{name}"
        # a run stopped after its fine-tune finished (both artifacts complete) resumes at the scoring
        resumed = (emu_dir / "manifest.json").exists() and (adapter / "manifest.json").exists()
        if not resumed:
            emulate(model, emu_dir, method=method, adapter_layers=adapter_layers, overwrite=True, **settings)
        built = time.time() - t0
        params = json.loads((emu_dir / "manifest.json").read_text())["parameters"]
        cell = {"method": method, "emulate": settings, "adapter_layers": adapter_layers, "finetune": ft,
                "emulator_parameters": params, "build_s": round(built, 1)}
        cell["emu_zs"] = None if args.no_emu_zs else score_with(emu_dir, None, "sciq", args.data_dir, "validation",
                                                                  LIMIT, BATCH, "cpu")["acc"]
        t1 = time.time()
        if not resumed:
            finetune(emu_dir, data, adapter, format=fmt, overwrite=True, progress=True, device="cpu", **ft)
        cell["finetune_s"] = args.finetune_s if resumed else round(time.time() - t1, 1)
        cell["resumed_at_scoring"] = resumed
        cell["finetune_log"] = _train_log(adapter)
        cell["emu_ft"] = score_with(emu_dir, adapter, "sciq", args.data_dir, "validation", LIMIT, BATCH, "cpu")["acc"]
        cell["plug_in"] = score_with(model, adapter, "sciq", args.data_dir, "validation", LIMIT, BATCH, "cpu")["acc"]
        cell["delta"] = cell["plug_in"] - cell["emu_ft"]
        cell["plug_in_minus_full_zs"] = cell["plug_in"] - results["full_zs"]
        cell["seconds"] = round(time.time() - t0, 1)
        flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in settings.items())
        cell["commands"] = [
            f"offsite emulate --model SMOL --method {method} --adapter-layers {adapter_layers} {flags} --out E",
            f"offsite finetune --emulator E --data sciq.train.jsonl --format {fmt} --max-steps {ft['max_steps']} "
            f"--lr {ft['lr']} --batch-size {BATCH} --eval-every {ft['eval_every']} "
            f"--train-adapter {ft.get('train_adapter', 'all')} --out A",
            f"offsite eval --model E --adapter A --tasks sciq --limit {LIMIT} --out emu_ft.json",
            f"offsite eval --model SMOL --adapter A --tasks sciq --limit {LIMIT} --out plug_in.json"]
        results["cells"][name] = cell
        save(results, out)
        (out / "results.md").write_text(render(results))
        print(f"{name}: {json.dumps({k: v for k, v in cell.items() if k != 'finetune_log'})}", flush=True)
    (out / "results.md").write_text(render(results))
    return 0


def _train_log(adapter: Path) -> dict:
    """The fine-tune's validation losses and every 10th training loss (finetune's training_log.json)."""
    f = adapter / "training_log.json"
    if not f.exists():
        return {}
    log = json.loads(f.read_text())
    return {"val": [round(v["loss"], 4) for v in log.get("val", [])],
            "train_every_10": [round(v["loss"], 4) for v in log.get("train", [])[::10]],
            "best_val_loss": log.get("best_val_loss")}




def pct(x) -> str:
    return "—" if x is None else f"{x * 100:.1f}"


def render(r: dict) -> str:
    lines = ["# Adapter transfer on SmolLM2-135M-Instruct, SciQ (issue 24)", "",
             f"Produced by `python bench/real_transfer.py CELL ...` on 2 shared CPU cores. {r.get('setup', {}).get('task', '')}; "
             f"batch {BATCH}; full zero-shot **{r.get('full_zs', float('nan')) * 100:.1f}**. Each cell's commands are "
             "in results.json. Target: plug-in clearly above full zero-shot while emulator FT stays ≥ 5 points below it.",
             "", "| cell | method | emulate settings | adapter | emulator params (M) | steps | lr | emu ZS | emu FT | "
             "plug-in | plug-in − full ZS | Δ plug-in − emu FT | fine-tune s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, c in r.get("cells", {}).items():
        lines.append(f"| {name} | {c['method']} | {json.dumps(c['emulate'])} | {c['adapter_layers']}{'' if c['finetune'].get('train_adapter', 'all') == 'all' else ' (' + c['finetune']['train_adapter'] + ' trains)'} | "
                     f"{c['emulator_parameters']['emulator'] / 1e6:.1f} | {c['finetune']['max_steps']} | {c['finetune']['lr']:g} | "
                     f"{pct(c['emu_zs'])} | {pct(c['emu_ft'])} | {pct(c['plug_in'])} | "
                     f"{c['plug_in_minus_full_zs'] * 100:+.1f} | {c['delta'] * 100:+.1f} | {c['finetune_s'] or float('nan'):.0f} |")
    if r.get("earlier"):
        lines += ["", "Measured before, same questions and protocol (`offsite report`), for comparison:", ""]
        lines += [f"- {k}: " + ", ".join(f"{n} {v * 100:.1f}" for n, v in row.items()) for k, row in r["earlier"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
