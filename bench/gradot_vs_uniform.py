"""GradOT vs uniform layer drop at matched emulator size on the reference Llama.

Usage (from the repository root):
    .venv/bin/python bench/gradot_vs_uniform.py [--model DIR] [--data-dir DIR] [--quick]
                                                [--lambdas 1,4] [--no-report] [--out DIR]

Writes bench/results/gradot_vs_uniform/{metrics.json, report.json, report.md} and prints a summary.

1. Builds each emulator with ``offsite emulate`` in a child process, timing it and reading the
   child's peak RSS (``ru_maxrss`` of RUSAGE_CHILDREN: each build is the only child alive).
   Emulators: uniform (4 of the 8 middle layers), GradOT (every middle linear at the same
   parameter fraction, λ defaults) and GradOT's magnitude baseline at the same size.
2. Adapter-gradient cosine (full model vs emulator, LM loss) and emulator LM loss on WikiText-2
   validation windows (not seen by any calibration).
3. The five OT numbers and Δ through ``offsite report`` (uniform vs gradot); ``--no-report`` skips it.

``--lambdas 1,4`` adds GradOT emulators with λ_attn = λ_mlp = each value (same size) to steps 1-2.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OFFSITE = str(ROOT / ".venv" / "bin" / "offsite")


def build(model, out, method, settings):
    cmd = [OFFSITE, "emulate", "--model", model, "--method", method, "--adapter-layers", "2,2", "--out", str(out),
           "--overwrite", "--set", *[f"{k}={v}" for k, v in settings.items()]]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    started = time.time()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"command": " ".join(cmd[1:]), "seconds": round(time.time() - started, 1),
            "child_peak_rss_mb": round(peak / 1024, 1) if peak > before else None}


def main() -> int:
    p = argparse.ArgumentParser()
    # relative defaults (run from the repository root) keep machine paths out of the results
    p.add_argument("--model", default="../shared/models/ref-llama-12l")
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--budget", type=float, default=0.5, help="GradOT param_budget matching 4 of 8 middle layers")
    p.add_argument("--quick", action="store_true", help="small limits (minutes on 2 CPU cores)")
    p.add_argument("--out", default="bench/results/gradot_vs_uniform")
    p.add_argument("--lambdas", default="", help="comma-separated extra λ values for GradOT (both parts)")
    p.add_argument("--no-report", action="store_true", help="stop after the size/gradient/loss metrics")
    args = p.parse_args()
    os.chdir(ROOT)
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_PROGRESS_BARS="1",
                      TOKENIZERS_PARALLELISM="false")
    out = Path(args.out)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)

    import torch
    import torch.nn.functional as F

    from offsite.calibration import calibration_batches
    from offsite.eval.gradients import adapter_gradient_cosine
    from offsite.families import get_family
    from offsite.model.loading import load_model
    from offsite.emulator.package import load_emulator

    variants = {"uniform": ("uniform", {"emulator_layers": 4}),
                "gradot": ("gradot", {"param_budget": args.budget}),
                "gradot-magnitude": ("gradot", {"param_budget": args.budget, "scoring": "magnitude"})}
    for lam in filter(None, args.lambdas.split(",")):
        variants[f"gradot-lambda{float(lam):g}"] = ("gradot", {"param_budget": args.budget, "lambda_attn": float(lam),
                                                             "lambda_mlp": float(lam)})
    full, tok = load_model(args.model)
    family = get_family(full)
    held = calibration_batches(Path(args.data_dir) / "lm/wikitext-2-raw/wiki.valid.raw.gz", tok, seq_len=128,
                               num_sequences=16 if args.quick else 64, batch_size=8, seed=1)

    def lm_loss(model):
        with torch.no_grad():
            total = sum(float(F.cross_entropy(model(input_ids=b).logits[:, :-1].flatten(0, 1), b[:, 1:].flatten(),
                                              reduction="sum")) for b in held)
        return total / sum(b[:, 1:].numel() for b in held)

    metrics = {"model": args.model, "held_out": "wikitext-2-raw validation, 128-token windows",
               "full": {"params": sum(p.numel() for p in full.parameters()), "loss": lm_loss(full)}, "emulators": {}}
    for name, (method, settings) in variants.items():
        row = build(args.model, work / f"emu-{name}", method, settings)
        emu = load_emulator(work / f"emu-{name}")
        cos = adapter_gradient_cosine(full, emu.model, family, list(emu.split.adapter), emu.layer_map, held)
        row.update(params=emu.manifest["parameters"]["emulator"], loss=lm_loss(emu.model), cosine=cos,
                   plan_build=emu.manifest["plan"].get("build"))
        metrics["emulators"][name] = row
        print(name, json.dumps({k: row[k] for k in ("seconds", "child_peak_rss_mb", "params", "loss")}),
              f"cos={cos['overall']:.4f}", flush=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    if args.no_report:
        return 0

    limits = ["--limit", "100", "--train-limit", "400", "--max-steps", "40"] if args.quick else \
        ["--limit", "300", "--train-limit", "2000", "--max-steps", "150"]
    cmd = [OFFSITE, "report", "--model", args.model, "--data-dir", args.data_dir,
           "--tasks", "arc_easy,piqa,sciq,wikitext", "--methods", "uniform,gradot", "--adapter-layers", "2,2",
           "--emulator-layers", "4", "--method-set", f"gradot:param_budget={args.budget}", *limits,
           "--lr", "3e-4", "--batch-size", "8", "--workdir", str(work / "report")]
    print("running:", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True)
    for name in ("report.json", "report.md"):
        (out / name).write_text((work / "report" / name).read_text())
    metrics["report_command"] = " ".join(cmd[1:])
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
