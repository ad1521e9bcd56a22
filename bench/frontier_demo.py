"""Privacy/utility frontier of every emulator method on the demo world: each method at several sizes.

Usage: .venv/bin/python bench/frontier_demo.py [--points methods|gradot-lambda] [--out bench/results/frontier_demo]
                                               [--workdir runs/frontier_demo] [--seed 0] [--quick]

One point = one emulator: build it, fine-tune the adapter on it (the quiz's train people), score
the emulator zero-shot, the emulator fine-tuned and the plug-in on the test people (``offsite
report`` with one method). Sizes: uniform / OT-KD / CRaSh keep 1, 2 or 3 of the 4 middle layers;
ScaleOT replaces 3, 2 or 1 of them by harmonizers (alpha 0.75 / 0.5 / 0.25, SRC beta 0.2; the
importance scores and harmonizers are trained once and reused through ``cache_dir``); GradOT keeps
25 / 50 / 75 % of every middle linear (``param_budget``). Base model, calibration text and task as
in ``bench/compare_methods_demo.sh``.

Writes ``frontier.json`` (every point's settings, sizes and accuracies), ``frontier.md`` and
``frontier.png`` (plug-in against emulator FT, one line per method: up is utility, left is privacy).
``--points gradot-lambda`` sweeps GradOT's privacy weight λ at budget 0.5 instead, into
``gradot_lambda.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

POINTS = {
    "uniform": [{"emulator_layers": k} for k in (1, 2, 3)],
    "distill": [{"emulator_layers": k, "num_sequences": 128} for k in (1, 2, 3)],
    "crash": [{"emulator_layers": k, "share": True} for k in (1, 2, 3)],
    "scaleot": [{"alpha": a, "beta": 0.2} for a in (0.75, 0.5, 0.25)],
    "gradot": [{"param_budget": b} for b in (0.25, 0.5, 0.75)],
}
# --points gradot-lambda: GradOT at budget 0.5 with the privacy weight λ (both parts) from 0 (gradient
# fidelity only) up, and the magnitude baseline (top singular values + channel norms) at that size.
LAMBDA_POINTS = {
    "gradot": [{"param_budget": 0.5, "lambda_attn": lam, "lambda_mlp": lam} for lam in (0.0, 0.25, 1.0, 4.0, 16.0)]
    + [{"param_budget": 0.5, "scoring": "magnitude"}],
}
POINT_SETS = {"methods": ("frontier", POINTS), "gradot-lambda": ("gradot_lambda", LAMBDA_POINTS)}
FINETUNE = {"max_steps": 200, "lr": 3e-4, "batch_size": 16}


def run_point(model, task, calibration, workdir: Path, method: str, settings: dict, seed: int) -> dict:
    """One emulator through the report protocol; returns its sizes and the four accuracies."""
    from offsite.experiments.protocol import Protocol
    from offsite.experiments.report import run_report

    protocol = Protocol(split="test", finetune={**FINETUNE, "seed": seed})
    report = run_report(model, [task], workdir, protocol, methods=[method], method_settings={method: settings},
                        calibration=calibration, log=lambda *a: None)
    result = report["methods"][method]
    acc = {row: result["table"][row][task] for row in ("full_zs", "emu_zs", "emu_ft", "plug_in")}
    params = result["build"]["parameters"]
    return {"method": method, "settings": settings, "params_ratio": round(params["emulator"] / params["full"], 4),
            "build_seconds": result["build"]["seconds"], **acc, "delta": result["delta"][task],
            "n": result["raw"]["plug_in"][task]["n"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/results/frontier_demo")
    p.add_argument("--workdir", default="runs/frontier_demo")
    p.add_argument("--seed", type=int, default=0, help="seed of the demo world, its pretraining and fine-tuning")
    p.add_argument("--quick", action="store_true", help="the quick demo's smaller world and model")
    p.add_argument("--points", choices=sorted(POINT_SETS), default="methods",
                   help="methods: every method at three sizes; gradot-lambda: GradOT's λ at budget 0.5")
    args = p.parse_args(argv)

    import torch
    from tqdm import tqdm

    from offsite.experiments.demo.pipeline import prepare, settings_for

    torch.set_num_threads(1)  # tiny model: one thread is fastest on a small shared CPU
    work, out = Path(args.workdir), Path(args.out)
    paths, _ = prepare(work, settings_for(args.quick, args.seed), args.seed, progress=True)
    quiz = work / "quiz"  # named for the task, so that tables label it "quiz"
    quiz.mkdir(parents=True, exist_ok=True)
    for split in ("train", "validation", "test"):
        shutil.copy(paths[split], quiz / f"{split}.jsonl")
    task = str(quiz / "{split}.jsonl")

    started, points = time.time(), []
    stem, point_set = POINT_SETS[args.points]
    todo = [(m, s) for m, settings in point_set.items() for s in settings]
    for i, (method, settings) in enumerate(tqdm(todo, desc="frontier", unit="emulator")):
        if method == "scaleot":  # one importance/harmonizer training serves every alpha
            settings = {**settings, "cache_dir": str(work / "scaleot-cache")}
        point = run_point(str(paths["model"]), task, str(paths["corpus"]), work / f"point-{i}", method,
                          settings, args.seed)
        point["settings"].pop("cache_dir", None)
        points.append(point)
        tqdm.write(f"{method} {json.dumps(point['settings'])}: emu FT {100 * point['emu_ft']:.1f}, "
                   f"plug-in {100 * point['plug_in']:.1f}")
    out.mkdir(parents=True, exist_ok=True)
    flags = [f"--points {args.points}"] * (args.points != "methods") + [f"--seed {args.seed}"] * bool(args.seed) \
        + ["--quick"] * args.quick
    record = {"command": " ".join([".venv/bin/python bench/frontier_demo.py", *flags]), "seed": args.seed,
              "quick": args.quick, "finetune": FINETUNE, "seconds": round(time.time() - started, 1), "points": points}
    (out / f"{stem}.json").write_text(json.dumps(record, indent=1) + "\n")
    (out / f"{stem}.md").write_text(to_markdown(record))
    plot(record, out / f"{stem}.png")
    print(to_markdown(record))
    return 0


def to_markdown(record: dict) -> str:
    points = record["points"]
    lines = [f"# Privacy/utility frontier on the demo world (seed {record['seed']})", "",
             f"Produced by `{record['command']}` in {record['seconds']:.0f} s. Full model zero-shot: "
             f"{100 * points[0]['full_zs']:.1f}%; {points[0]['n']} test questions (10 choices).", "",
             "Parameters are as stored: CRaSh with `share` stores a copy of a kept layer for every position it "
             "fills, so its stored size is the full depth although only k layers are distinct.", "",
             "| method | settings | emulator / full params | emu ZS | emu FT | plug-in | Δ |",
             "|---|---|---|---|---|---|---|"]
    for pt in points:
        cells = [f"{100 * pt[k]:.1f}" for k in ("emu_zs", "emu_ft", "plug_in", "delta")]
        lines.append(f"| {pt['method']} | `{json.dumps(pt['settings'])}` | {pt['params_ratio']:.2f} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _label(settings: dict) -> str:
    """What tells a point from its neighbours, short: ``k=2``, ``α=0.5``, ``b=0.25``, ``λ=4.0``."""
    if "scoring" in settings:
        return settings["scoring"]
    for key, short in (("lambda_attn", "λ"), ("emulator_layers", "k"), ("alpha", "α"), ("param_budget", "b")):
        if key in settings:
            return f"{short}={settings[key]}"
    return ""


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    def series(pt):  # one line per method; a baseline scoring of it stands apart
        scoring = pt["settings"].get("scoring")
        return pt["method"] + (f" ({scoring})" if scoring else "")

    for name in dict.fromkeys(series(pt) for pt in record["points"]):
        pts = [pt for pt in record["points"] if series(pt) == name]  # in the order they were run
        ax.plot([100 * pt["emu_ft"] for pt in pts], [100 * pt["plug_in"] for pt in pts], marker="o", label=name)
        for pt in pts:
            ax.annotate(_label(pt["settings"]), (100 * pt["emu_ft"], 100 * pt["plug_in"]), fontsize=6,
                        xytext=(3, -8), textcoords="offset points")
    full = 100 * record["points"][0]["full_zs"]
    ax.axhline(full, color="k", linestyle="dashed", linewidth=0.8, label="full model ZS")
    ax.plot([0, 100], [0, 100], color="grey", linewidth=0.6, linestyle="dotted", label="plug-in = emulator FT")
    ax.set_xlabel("emulator fine-tuned accuracy (%)  ← more private")
    ax.set_ylabel("plug-in accuracy (%)  ↑ more useful")
    ax.set_xlim(0, 100)
    low = min(100 * pt["plug_in"] for pt in record["points"])
    ax.set_ylim(max(0, 10 * int(low / 10) - 20), 100)
    ax.set_title("Demo world: k = middle layers kept, α = fraction replaced by harmonizers,\n"
                 "b = GradOT parameter budget, λ = GradOT privacy weight", fontsize=8)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
