"""GradOT's K-FAC statistics in fp32 against fp64 on the reference Llama: term error and selection.

Usage (from the repository root):
    .venv/bin/python bench/stats_precision.py [--model DIR] [--data-dir DIR] [--windows 64] [--budget 0.25]
                                              [--out bench/results/stats_precision]

Both runs take the same calibration windows (War and Peace, 128 tokens each) through one GradOT
``terms`` sweep, with ``stats_dtype`` float64 (the default) and float32. Reported per term kind
(shift, curvature, ...): the largest and the median relative error of fp32 against fp64, each
matrix's terms scaled by their largest magnitude; and whether the default selection (GradOT's
defaults at ``--budget``) keeps the same components and channels, per matrix and overall.

Writes ``results.json`` and ``results.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _errors(t64: dict, t32: dict) -> dict:
    """``{term name: [relative error of each matrix]}`` over every floating tensor the terms hold."""
    import torch

    out = {}
    for group in ("attn", "mlp"):
        for key, terms in t64[group].items():
            for name, value in terms.items():
                if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel():
                    scale = value.abs().max().clamp_min(1e-300)
                    err = ((t32[group][key][name].double() - value.double()).abs().max() / scale).item()
                    out.setdefault(f"{group}.{name}", []).append(err)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(ROOT.parent / "shared" / "models" / "ref-llama-12l"))
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--windows", type=int, default=64)
    p.add_argument("--budget", type=float, default=0.25)
    p.add_argument("--out", default="bench/results/stats_precision")
    args = p.parse_args()
    from offsite.calibration import calibration_batches
    from offsite.emulator import get_builder
    from offsite.emulator.inputs import BuildInputs
    from offsite.emulator.methods.gradot.select import select
    from offsite.families import get_family
    from offsite.model.loading import load_model
    from offsite.model.split import make_split

    model, tok = load_model(args.model)
    family, split = get_family(model), make_split(model.config.num_hidden_layers, "2,2")
    batches = calibration_batches(Path(args.data_dir) / "lm/war_and_peace/war_and_peace_pg2600.txt.gz", tok,
                                  seq_len=128, num_sequences=args.windows, batch_size=8)
    builder = get_builder("gradot")
    runs = {}
    for dtype in ("float64", "float32"):
        config = builder.make_config(param_budget=args.budget, stats_dtype=dtype)
        started = time.time()
        terms, _ = builder.terms(model, family, split, config, BuildInputs(calibration=batches))
        runs[dtype] = {"terms": terms, "selection": select(terms, config), "seconds": round(time.time() - started, 1)}
        print(f"{dtype}: {runs[dtype]['seconds']} s", file=sys.stderr)
    errors = _errors(runs["float64"]["terms"], runs["float32"]["terms"])
    (lin64, mlp64), (lin32, mlp32) = runs["float64"]["selection"], runs["float32"]["selection"]
    same_lin = sum(a == b for a, b in zip(lin64, lin32))
    same_mlp = sum(a == b for a, b in zip(mlp64, mlp32))
    record = {"command": "python bench/stats_precision.py " + " ".join(sys.argv[1:]), "windows": args.windows,
              "budget": args.budget, "seconds": {k: v["seconds"] for k, v in runs.items()},
              "errors": {k: {"max": max(v), "median": statistics.median(v), "matrices": len(v)}
                         for k, v in sorted(errors.items())},
              "attention_matrices_same": [same_lin, len(lin64)], "mlp_layers_same": [same_mlp, len(mlp64)],
              "identical_selection": lin64 == lin32 and mlp64 == mlp32}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = ["# GradOT statistics: fp32 against fp64 on the reference Llama", "",
             f"Produced by `{record['command']}`: {args.windows} War and Peace windows x 128 tokens, budget "
             f"{args.budget}, GradOT's default λ and form. Sweep time fp64 {record['seconds']['float64']} s, fp32 "
             f"{record['seconds']['float32']} s (2 shared CPU cores).", "",
             "| term | matrices | max relative error | median |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['matrices']} | {v['max']:.2e} | {v['median']:.2e} |" for k, v in record["errors"].items()]
    lines += ["", f"Same selection: attention matrices {same_lin}/{len(lin64)}, MLP layers {same_mlp}/{len(mlp64)}; "
              f"identical overall: {record['identical_selection']}."]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
