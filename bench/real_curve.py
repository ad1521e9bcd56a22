"""How big should a layer-dropping emulator be on a real model? The curve behind the default (issue 24 item 2).

Usage (from the repository root):
    .venv/bin/python bench/real_curve.py [CELL ...] [--model DIR] [--workdir runs/real_curve]
                                         [--out bench/results/real_curve]
        CELL: N (uniform drop keeping N middle layers) or METHOD:KEY=VALUE[,KEY=VALUE] (another method at
        one setting, e.g. gradot:param_budget=0.7 or scaleot:alpha=0.3), placed on the curve by its size
    .venv/bin/python bench/real_curve.py --render        # results.md + curve.png from results.json

For each cell (by default uniform drop keeping n middle layers, adapter 2,2), the real_transfer protocol on
SmolLM2-135M-Instruct: emulate, emulator zero-shot, fine-tune on the first 2000 SciQ training
questions (100 steps, lr 1e-4, batch 8), emulator FT and plug-in. The default it chooses must not be
judged by the data that chose it, so this curve is scored on **selection questions**: 200 SciQ
*training* questions from the end of the training split (never trained on here: fine-tuning reads the
first 2000), while the OT table (bench/real_ot.py) and real_transfer score the validation split.
Each finished size is written to results.json at once; a rerun skips it.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
from pathlib import Path

from real_transfer import BATCH, TRAIN_LIMIT, _train_log  # noqa: E402 (bench/ is on sys.path as a script)
from realbench import begin, save, smol_path  # noqa: E402

LIMIT = 200
SELECT_FROM_END = 400  # the selection questions are the first LIMIT of the training split's last 400
SIZES = [6, 10, 14, 18, 22]
FT = {"max_steps": 100, "lr": 1e-4, "batch_size": BATCH, "val_limit": 64, "eval_every": 25}


def selection_data(data_dir: str, work: Path) -> Path:
    """A data folder whose ``mc/sciq/validation`` holds the selection questions (tail of SciQ train)."""
    sel = work / "select-data"
    target = sel / "mc/sciq/validation.jsonl.gz"
    if not target.exists():
        with gzip.open(Path(data_dir) / "mc/sciq/train.jsonl.gz", "rt", encoding="utf-8") as fh:
            records = fh.readlines()
        assert len(records) - SELECT_FROM_END >= TRAIN_LIMIT, "selection questions would overlap the training ones"
        target.parent.mkdir(parents=True, exist_ok=True)
        with gzip.open(target, "wt", encoding="utf-8") as fh:
            fh.writelines(records[-SELECT_FROM_END:])
    return sel


def parse_cell(spec: str) -> tuple:
    """``"18"`` -> ``("uniform", {"emulator_layers": 18})``; ``"gradot:param_budget=0.7"`` -> gradot's settings."""
    if spec.isdigit():
        return "uniform", {"emulator_layers": int(spec)}
    method, _, rest = spec.partition(":")
    settings = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        settings[key] = json.loads(value)
    return method, settings


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("cells", nargs="*", help=f"N or METHOD:KEY=VALUE,... (default: uniform at {SIZES})")
    p.add_argument("--model", default=None, help="base model folder (default: offsite models path smollm2-135m)")
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--workdir", default="runs/real_curve")
    p.add_argument("--out", default="bench/results/real_curve")
    p.add_argument("--render", action="store_true")
    args = p.parse_args()
    out, results = begin(args.out, {"sizes": {}})
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    if args.render:
        render(results, out)
        return 0

    import torch

    from offsite.workflows.emulate import emulate
    from offsite.experiments.protocol import score_with, train_file

    torch.set_num_threads(2)
    model = args.model or smol_path()
    sel = selection_data(args.data_dir, work)
    data, fmt = train_file("sciq", args.data_dir, work, TRAIN_LIMIT)
    results.setdefault("setup", {
        "model": "SmolLM2-135M-Instruct, fp32 (offsite models path smollm2-135m); 26 middle layers with adapter 2,2",
        "train": f"first {TRAIN_LIMIT} SciQ training questions",
        "select": f"{LIMIT} selection questions: SciQ training questions {-SELECT_FROM_END} to "
                  f"{-SELECT_FROM_END + LIMIT} (from the end), never trained on",
        "finetune": FT})
    if "full_zs" not in results:
        results["full_zs"] = score_with(model, None, "sciq", str(sel), "validation", LIMIT, BATCH, "cpu")["acc"]
        save(results, out)
    print(f"full zero-shot on the selection questions: {results['full_zs']}", flush=True)
    from offsite.workflows.finetune import finetune

    for spec in args.cells or [str(n) for n in SIZES]:
        if spec in results["sizes"]:
            print(f"{spec}: done before, skipped", flush=True)
            continue
        method, settings = parse_cell(spec)
        t0 = time.time()
        safe = spec.replace(":", "-").replace("=", "").replace(",", "-")
        emu, adapter = work / f"emulator-{safe}", work / f"adapter-{safe}"
        emulate(model, emu, method=method, adapter_layers="2,2", overwrite=True, **settings)
        params = json.loads((emu / "manifest.json").read_text())["parameters"]
        cell = {"method": method, "emulate": settings, "emulator_parameters": params,
                "emu_zs": score_with(emu, None, "sciq", str(sel), "validation", LIMIT, BATCH, "cpu")["acc"]}
        t1 = time.time()
        finetune(emu, data, adapter, format=fmt, overwrite=True, progress=True, device="cpu", **FT)
        cell["finetune_s"] = round(time.time() - t1, 1)
        cell["finetune_log"] = _train_log(adapter)
        cell["emu_ft"] = score_with(emu, adapter, "sciq", str(sel), "validation", LIMIT, BATCH, "cpu")["acc"]
        cell["plug_in"] = score_with(model, adapter, "sciq", str(sel), "validation", LIMIT, BATCH, "cpu")["acc"]
        cell["seconds"] = round(time.time() - t0, 1)
        flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in settings.items())
        cell["command"] = (f"offsite emulate {method} --model SMOL --adapter-layers 2,2 {flags} --out E && "
                           f"offsite finetune --emulator E --data sciq.train.jsonl --format {fmt} --max-steps 100 "
                           f"--lr 1e-4 --batch-size {BATCH} --eval-every 25 --out A")
        results["sizes"][spec] = cell
        save(results, out)
        render(results, out)
        print(f"{spec}: " + json.dumps({k: v for k, v in cell.items() if k != "finetune_log"}), flush=True)
    render(results, out)
    return 0


def _setting(c: dict) -> tuple:
    """``(method, settings)`` of a cell (cells of the first run stored only ``emulator_layers``)."""
    return c.get("method", "uniform"), c.get("emulate", {"emulator_layers": c.get("emulator_layers")})


def render(r: dict, out: Path) -> None:
    """results.md (table) and curve.png (accuracy against emulator size, uniform as the curve)."""
    zs = r.get("full_zs", float("nan"))
    rows = sorted(r.get("sizes", {}).values(), key=lambda c: (_setting(c)[0] != "uniform",
                                                               c["emulator_parameters"]["emulator"]))
    lines = ["# Emulator size on SmolLM2-135M-Instruct: the curve behind the layer-drop default (issue 24)", "",
             "`python bench/real_curve.py [CELL ...]` on 2 CPU cores. Adapter 2,2 (26 middle layers); fine-tuned on "
             f"the first {TRAIN_LIMIT} SciQ training questions (100 steps, lr 1e-4, batch {BATCH}); scored (acc) on "
             f"{LIMIT} *selection* questions from the end of the SciQ training split, never trained on and not the "
             f"validation questions the OT table reports (SE about 3 points). Full zero-shot: **{zs * 100:.1f}**. "
             "Privacy bound: emulator FT at least 5 points below full zero-shot.", "",
             "| method | settings | emulator params (M) | share of full | emu ZS | emu FT | plug-in | "
             "plug-in − full ZS | full ZS − emu FT | fine-tune s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for c in rows:
        method, settings = _setting(c)
        par = c["emulator_parameters"]
        lines.append(f"| {method} | {json.dumps(settings)} | {par['emulator'] / 1e6:.1f} | "
                     f"{par['emulator'] / par['full']:.2f} | {c['emu_zs'] * 100:.1f} | {c['emu_ft'] * 100:.1f} | "
                     f"{c['plug_in'] * 100:.1f} | {(c['plug_in'] - zs) * 100:+.1f} | {(zs - c['emu_ft']) * 100:+.1f} | "
                     f"{c['finetune_s']:.0f} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    if not rows:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    uni = [c for c in rows if _setting(c)[0] == "uniform"]
    xs = [c["emulator_parameters"]["emulator"] / 1e6 for c in uni]
    for key, label, style in (("plug_in", "uniform: plug-in (utility)", "o-"),
                              ("emu_ft", "uniform: emulator FT (privacy: lower)", "s--"),
                              ("emu_zs", "uniform: emulator ZS", "^:")):
        ax.plot(xs, [c[key] * 100 for c in uni], style, label=label)
    for c in uni:
        ax.annotate(str(_setting(c)[1]["emulator_layers"]), (c["emulator_parameters"]["emulator"] / 1e6,
                                                             c["plug_in"] * 100), fontsize=7, xytext=(2, 4),
                    textcoords="offset points")
    for c in (c for c in rows if _setting(c)[0] != "uniform"):
        method, settings = _setting(c)
        x = c["emulator_parameters"]["emulator"] / 1e6
        ax.plot([x, x], [c["emu_ft"] * 100, c["plug_in"] * 100], "k-", lw=0.5)
        ax.plot([x], [c["plug_in"] * 100], "D", ms=6, label=f"{method} {json.dumps(settings)}: plug-in / emu FT")
        ax.plot([x], [c["emu_ft"] * 100], "x", color="black", ms=6)
    ax.axhline(zs * 100, color="gray", lw=1, label="full model zero-shot")
    ax.axhline(zs * 100 - 5, color="gray", lw=1, ls=":", label="full ZS − 5 (privacy bound)")
    ax.set_xlabel("emulator parameters (M; full model 134.5M; labels: middle layers kept of 26)")
    ax.set_ylabel("SciQ selection accuracy (%)")
    ax.set_title("SmolLM2-135M: emulator size vs utility and privacy")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "curve.png", dpi=120)


if __name__ == "__main__":
    sys.exit(main())
