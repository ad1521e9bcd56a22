"""GCS vs magnitude vs random selection at matched size on the reference Llama, and GCS's λ.

Usage (from the repository root):
    .venv/bin/python bench/gcs_selection.py [--model DIR] [--data-dir DIR] [--budget 0.4]
                                            [--windows 64] [--out bench/results/gcs_selection]

Every emulator keeps every middle layer with each middle linear at ``--budget`` of its parameters
(GradOT's sizes); only *which* singular components and channels stay differs:

* ``gcs`` in the relative form at λ ∈ {0, 0.25, 0.5, 1, 2, 4, 8, 10^6}, with the first-order term at
  λ ∈ {0.25, 1}, and in the paper form at λ ∈ {0.25, 4} (terms computed once, through ``cache_dir``);
* ``magnitude`` (top singular values, channel norms) and ``random`` (same floor, seeds 0-4).

For each: the adapter-gradient cosine (full model vs emulator) and the emulator's LM loss on
WikiText-2 *validation* windows (used to choose λ) and *test* windows (used to judge the choice),
neither seen by the calibration (War and Peace). Selection stability: the GCS terms computed on two
disjoint halves of the calibration windows, per matrix the Spearman correlation of each term between
the halves and the overlap (|kept ∩ kept'| / |kept|) of the default selection.

Writes ``results.json`` and ``results.md`` (tables with the command) under ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
RELATIVE = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 1e6)
PAPER = (0.25, 4.0)
RANDOM_SEEDS = (0, 1, 2, 3, 4)
TERMS = ("shift", "gain", "curvature", "loss")


def _spearman(a, b) -> float:
    import torch

    ra, rb = (torch.argsort(torch.argsort(x)).double() for x in (a, b))
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="../shared/models/ref-llama-12l")
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--budget", type=float, default=0.4)
    p.add_argument("--windows", type=int, default=64, help="calibration windows (the GradOT default)")
    p.add_argument("--held-windows", type=int, default=32)
    p.add_argument("--out", default="bench/results/gcs_selection")
    args = p.parse_args()
    os.chdir(ROOT)
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    import torch

    from offsite.emulator import get_builder
    from offsite.emulator.inputs import BuildInputs
    from offsite.emulator.methods.gradot import select
    from offsite.eval.gradients import adapter_gradient_cosine
    from offsite.families import get_family
    from offsite.model.loading import load_model
    from offsite.model.split import make_split

    from heldout import lm_loss, windows

    torch.set_num_threads(2)
    started = time.time()
    full, tok = load_model(args.model)
    family, split = get_family(full), make_split(full.config.num_hidden_layers, "2,2")
    calib, held = windows(args.data_dir, tok, args.windows, args.held_windows)


    builder = get_builder("gradot")
    cache = tempfile.mkdtemp(prefix="gcs-terms-")
    points = [("gcs", "relative", lam) for lam in RELATIVE] + [("gcs", "relative+first", lam) for lam in (0.25, 1.0)]
    points += [("gcs", "paper", lam) for lam in PAPER]
    points += [("magnitude", None, None)] + [("random", None, seed) for seed in RANDOM_SEEDS]
    rows = []
    for scoring, form, value in points:
        settings = {"param_budget": args.budget, "scoring": scoring}
        if scoring == "gcs":
            settings.update(gcs_form=form.split("+")[0], first_order=form.endswith("+first"), lambda_attn=value,
                            lambda_mlp=value, cache_dir=cache)
        if scoring == "random":
            settings["seed"] = value
        config = builder.make_config(**settings)
        plan = builder.plan(full, family, split, config, BuildInputs(calibration=calib))
        emu = builder.apply(copy.deepcopy(full), family, split, plan)
        layer_map = [e["source"] for e in plan["layers"]]
        row = {"scoring": scoring, "form": form, "lambda": value if scoring == "gcs" else None,
               "seed": value if scoring == "random" else None,
               "params": sum(t.numel() for t in emu.parameters())}
        for name, batches in held.items():
            row[f"cos_{name}"] = adapter_gradient_cosine(full, emu, family, list(split.adapter), layer_map,
                                                         batches)["overall"]
            row[f"loss_{name}"] = lm_loss(emu, batches)
        rows.append(row)
        print(json.dumps(row), flush=True)

    # stability: terms from two disjoint halves of the calibration windows
    half = len(calib) // 2
    halves = []
    for part in (calib[:half], calib[half:]):
        config = builder.make_config(param_budget=args.budget, first_order=True)  # with the gradient terms too
        halves.append(builder.terms(full, family, split, config, BuildInputs(calibration=part))[0])
    stability = {"attn": {}, "mlp": {}}
    overlap = {}
    for lam in (0.25, 4.0):  # the old default and the default
        config = builder.make_config(param_budget=args.budget, lambda_attn=lam, lambda_mlp=lam)
        kept = [select(t, config) for t in halves]
        overlap[f"lambda {lam:g}"] = {
            "attn": statistics.mean(len(set(a["components"]) & set(b["components"])) / len(a["components"])
                                    for a, b in zip(kept[0][0], kept[1][0])),
            "mlp": statistics.mean(len(set(a["channels"]) & set(b["channels"])) / len(a["channels"])
                                   for a, b in zip(kept[0][1], kept[1][1]))}
    for kind in ("attn", "mlp"):
        for key in halves[0][kind]:
            stability[kind][key] = {term: _spearman(halves[0][kind][key][term], halves[1][kind][key][term])
                                    for term in TERMS}
    summary = {kind: {term: statistics.median(v[term] for v in stability[kind].values())
                      for term in TERMS} for kind in ("attn", "mlp")}
    results = {"command": "python bench/gcs_selection.py " + " ".join(sys.argv[1:]), "model": args.model,
               "budget": args.budget, "calibration_windows": args.windows, "held_windows": args.held_windows,
               "full": {f"loss_{n}": lm_loss(full, b) for n, b in held.items()}, "rows": rows,
               "stability": {"median_spearman": summary, "per_matrix": stability,
                             "kept_overlap": overlap},
               "seconds": round(time.time() - started, 1)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(render(results))
    print(render(results))
    return 0


def render(r: dict) -> str:
    lines = [f"# Which components GradOT keeps: GCS vs magnitude vs random (reference Llama, budget {r['budget']})",
             "", f"Produced by `{r['command']}` in {r['seconds']:.0f} s (2 CPU cores). Calibration: "
             f"{r['calibration_windows']} War and Peace windows x 128 tokens; held out: {r['held_windows']} WikiText-2 "
             "windows each of validation (chooses) and test (judges). Full model loss: "
             f"valid {r['full']['loss_valid']:.3f}, test {r['full']['loss_test']:.3f}.", "",
             "| scoring | form | λ / seed | params | grad cos (valid) | loss (valid) | grad cos (test) | loss (test) |",
             "|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        tag = row["lambda"] if row["scoring"] == "gcs" else (row["seed"] if row["scoring"] == "random" else "")
        lines.append(f"| {row['scoring']} | {row['form'] or ''} | {tag} | {row['params']:,} | {row['cos_valid']:.4f} | "
                     f"{row['loss_valid']:.4f} | {row['cos_test']:.4f} | {row['loss_test']:.4f} |")
    rand = [row for row in r["rows"] if row["scoring"] == "random"]
    if len(rand) > 1:
        lines += ["", "Random selection over its seeds (mean ± standard error): " + ", ".join(
            f"{k} {statistics.mean(x[k] for x in rand):.4f} ± {statistics.stdev(x[k] for x in rand) / len(rand) ** 0.5:.4f}"
            for k in ("cos_valid", "loss_valid", "cos_test", "loss_test"))]
    s = r["stability"]
    lines += ["", "## Stability between two disjoint halves of the calibration windows", "",
              "Median over matrices of the Spearman rank correlation of each term between the halves, and the "
              "mean overlap |kept ∩ kept'| / |kept| of the selections the two halves make (relative form):", "",
              "| part | shift ‖GδA‖₁ | gain ⟨g,δ⟩ | curvature ½tr(δᵀGδA) | loss (gain + curvature) | "
              "kept overlap, λ 0.25 | kept overlap, λ 4 |", "|---|---|---|---|---|---|---|"]
    for kind in ("attn", "mlp"):
        m = s["median_spearman"][kind]
        lines.append(f"| {kind} | {m['shift']:.3f} | {m['gain']:.3f} | {m['curvature']:.3f} | {m['loss']:.3f} | "
                     f"{s['kept_overlap']['lambda 0.25'][kind]:.3f} | {s['kept_overlap']['lambda 4'][kind]:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
