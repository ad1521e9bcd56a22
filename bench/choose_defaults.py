"""Choose every method's default size (and GradOT's λ) on demo worlds, then judge the choice on others.

Usage (from the repository root):
    .venv/bin/python bench/choose_defaults.py [--stage choose|judge|both] [--choose-seeds 0,1,2]
                                              [--judge-seeds 3,4,5] [--min-delta 40]
                                              [--out bench/results/choose_defaults] [--workdir runs/choose_defaults]

Choose: on demo worlds of ``--choose-seeds`` (each its own world, base model, fine-tuning seed), every
point of :data:`POINTS` goes through the report protocol scored on the *validation* people. Per
method the default is the point with the best mean plug-in whose mean Δ = plug-in − emulator FT is at
least ``--min-delta`` points (the stated privacy margin); with none, the one with the largest Δ.

Judge: on worlds of ``--judge-seeds`` (never used for choosing), the chosen point of every method is
scored on the *test* people, and ``offsite audit`` (same budget, every attack) gives its worst-case
margin; uniform drop at the size of GradOT's choice is scored too (the GradOT target compares them).
The audit's recovery attack pre-trains on the *world's own corpus* (the biographies the base model
was pretrained on), a stronger attacker than the threat model's public text: it holds the model
owner's training text. (``bench/audit_demo.sh`` audits with War and Peace, which knows nothing of the
world.) ``--stage summary`` rewrites summary.md from the stored JSON without running anything.

Writes ``choose.json`` / ``judge.json`` and ``summary.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from frontier_demo import FINETUNE  # noqa: E402  (the demo's fine-tuning: 200 steps, lr 3e-4, batch 16)

POINTS = {
    "uniform": [{"emulator_layers": k} for k in (1, 2, 3)],
    "distill": [{"emulator_layers": k, "num_sequences": 128} for k in (1, 2)],
    "crash": [{"emulator_layers": k, "share": True} for k in (1, 2)],
    "scaleot": [{"alpha": a, "beta": 0.2} for a in (0.75, 0.5)],
    "gradot": [{"param_budget": b, "lambda_attn": lam, "lambda_mlp": lam}
               for b, lams in ((0.4, (0.25, 1.0, 2.0, 4.0)), (0.25, (1.0, 4.0))) for lam in lams],
}


def world(work: Path, seed: int) -> tuple:
    """The demo world of ``seed`` (reused when prepared): ``(model folder, task template, corpus)``."""
    from offsite.experiments.demo.pipeline import prepare, settings_for

    paths, _ = prepare(work, settings_for(False, seed), seed, progress=False)
    quiz = work / "quiz"
    quiz.mkdir(parents=True, exist_ok=True)
    for split in ("train", "validation", "test"):
        shutil.copy(paths[split], quiz / f"{split}.jsonl")
    return str(paths["model"]), str(quiz / "{split}.jsonl"), str(paths["corpus"])


def point(model, task, corpus, workdir: Path, method: str, settings: dict, seed: int, split: str) -> dict:
    from offsite.experiments.protocol import Protocol
    from offsite.experiments.report import run_report

    if method in ("scaleot", "gradot"):
        settings = {**settings, "cache_dir": str(workdir.parent / f"{method}-cache")}
    protocol = Protocol(split=split, finetune={**FINETUNE, "seed": seed})
    report = run_report(model, [task], workdir, protocol, methods=[method], method_settings={method: settings},
                        calibration=corpus, log=lambda *a: None)
    res = report["methods"][method]
    params = res["build"]["parameters"]
    return {"method": method, "settings": {k: v for k, v in settings.items() if k != "cache_dir"}, "seed": seed,
            "params_ratio": round(params["emulator"] / params["full"], 4),
            **{row: res["table"][row][task] for row in ("full_zs", "emu_zs", "emu_ft", "plug_in")},
            "delta": res["delta"][task], "emulator": str(workdir / f"emulator-{method}")}


def mean(rows, key):
    return statistics.mean(r[key] for r in rows)


def choose(args, out: Path) -> dict:
    rows = []
    for seed in args.choose_seeds:
        work = Path(args.workdir) / f"seed{seed}"
        model, task, corpus = world(work, seed)
        for method, settings_list in POINTS.items():
            for i, settings in enumerate(settings_list):
                rows.append(point(model, task, corpus, work / f"{method}-{i}", method, settings, seed, "validation"))
                r = rows[-1]
                print(f"seed {seed} {method} {settings}: emu FT {100 * r['emu_ft']:.1f} plug-in "
                      f"{100 * r['plug_in']:.1f}", flush=True)
    chosen = pick(rows, args.min_delta)
    record = {"min_delta": args.min_delta, "seeds": args.choose_seeds, "rows": rows, "chosen": chosen}
    (out / "choose.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def pick(rows: list, min_delta: float) -> dict:
    """Per method: the point with the best mean plug-in among those with mean Δ >= ``min_delta`` points
    (ties: the larger Δ); with none, the one with the largest Δ."""
    chosen = {}
    for method, settings_list in POINTS.items():
        stats = []
        for settings in settings_list:
            mine = [r for r in rows if r["method"] == method and r["settings"] == settings]
            stats.append({"settings": settings, "emu_ft": mean(mine, "emu_ft"), "plug_in": mean(mine, "plug_in"),
                          "delta": mean(mine, "delta"), "params_ratio": mine[0]["params_ratio"]})
        ok = [s for s in stats if s["delta"] >= min_delta / 100]
        best = (max(ok, key=lambda s: (round(s["plug_in"], 6), s["delta"])) if ok
                else max(stats, key=lambda s: s["delta"]))
        chosen[method] = {**best, "met": bool(ok), "candidates": stats}
    return chosen


def judge(args, out: Path, chosen: dict) -> dict:
    from offsite.experiments.audit import run_audit
    from offsite.experiments.protocol import Protocol

    rows = []
    gradot_ratio = chosen["gradot"]["params_ratio"]
    uni = min(POINTS["uniform"], key=lambda s: abs(
        next(c for c in chosen["uniform"]["candidates"] if c["settings"] == s)["params_ratio"] - gradot_ratio))
    todo = [(m, c["settings"]) for m, c in chosen.items()] + [("uniform@gradot-size", uni)]
    for seed in args.judge_seeds:
        work = Path(args.workdir) / f"seed{seed}"
        model, task, corpus = world(work, seed)
        for name, settings in todo:
            method = name.split("@")[0]
            r = point(model, task, corpus, work / f"judge-{name}", method, settings, seed, "test")
            r["name"] = name
            if name == method:
                protocol = Protocol(split="test", device="cpu", finetune={**FINETUNE, "seed": seed})
                audit = run_audit(r["emulator"], model, [task], work / f"audit-{name}", protocol, public=corpus,
                                  log=lambda *a: None)
                res = audit["results"][task]
                r.update(audit_margin=res["margin"], best_attack=res["best_attack"],
                         attack_score=res["attacks"][res["best_attack"]]["score"])
            rows.append(r)
            print(f"judge seed {seed} {name}: emu FT {100 * r['emu_ft']:.1f} plug-in {100 * r['plug_in']:.1f}"
                  + (f" audit margin {100 * r['audit_margin']:+.1f} ({r['best_attack']})" if "audit_margin" in r else ""),
                  flush=True)
    record = {"seeds": args.judge_seeds, "rows": rows}
    (out / "judge.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def summary(args, chosen: dict, judged: dict | None) -> str:
    pct = lambda x: f"{100 * x:.1f}"  # noqa: E731
    lines = ["# Defaults chosen by measurement on demo worlds", "",
             "Commands: `.venv/bin/python bench/choose_defaults.py --stage choose`, then `--stage judge` (or both in one "
             "run without `--stage`; `--stage summary` rewrites this file from the JSON). Choice: demo worlds "
             f"{args.choose_seeds}, validation people; rule: best mean plug-in with mean Δ ≥ {args.min_delta} points. "
             f"Judgement: worlds {args.judge_seeds} (never used to choose), test people, plus `offsite audit` "
             "(same budget, every attack). Accuracies in %, 10 choices per question.", "",
             "## Choice (mean over the choice worlds, validation split)", "",
             "| method | settings | emulator / full params | emu FT | plug-in | Δ | chosen |", "|---|---|---|---|---|---|---|"]
    for method, c in chosen.items():
        for s in c["candidates"]:
            mark = "**yes**" if s["settings"] == c["settings"] else ""
            lines.append(f"| {method} | `{json.dumps(s['settings'])}` | {s['params_ratio']:.2f} | {pct(s['emu_ft'])} | "
                         f"{pct(s['plug_in'])} | {pct(s['delta'])} | {mark} |")
    if judged:
        lines += ["", "## Judgement (judge worlds, test split; mean ± standard error over worlds)", "",
                  "| emulator | settings | emu FT | plug-in | Δ | best attack | audit margin |", "|---|---|---|---|---|---|---|"]
        for name in dict.fromkeys(r["name"] for r in judged["rows"]):
            mine = [r for r in judged["rows"] if r["name"] == name]

            def ms(key):
                vals = [100 * r[key] for r in mine]
                err = statistics.stdev(vals) / len(vals) ** 0.5 if len(vals) > 1 else 0.0
                return f"{statistics.mean(vals):.1f} ± {err:.1f}"
            attack = ", ".join(sorted({r["best_attack"] for r in mine})) if "audit_margin" in mine[0] else "–"
            margin = ms("audit_margin") if "audit_margin" in mine[0] else "–"
            lines.append(f"| {name} | `{json.dumps(mine[0]['settings'])}` | {ms('emu_ft')} | {ms('plug_in')} | "
                         f"{ms('delta')} | {attack} | {margin} |")
        audited = [r for r in judged["rows"] if "audit_margin" in r]
        worst = min(audited, key=lambda r: r["audit_margin"])
        low = [f"{r['name']} on world {r['seed']} ({100 * r['audit_margin']:+.1f}: {r['best_attack']} reaches "
               f"{100 * r['attack_score']:.1f})" for r in audited if r["audit_margin"] < 0.2]
        lines += ["", "The audit's recovery attack pre-trains on the world's own corpus (the model owner's pretraining "
                  "text): a stronger attacker than the threat model's public text. Worst single world: "
                  f"{worst['name']} on world {worst['seed']}, margin {100 * worst['audit_margin']:+.1f}. Margins below 20 "
                  "points: " + ("; ".join(low) if low else "none") + "."]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stage", choices=("choose", "judge", "both", "summary"), default="both")
    p.add_argument("--choose-seeds", default="0,1,2")
    p.add_argument("--judge-seeds", default="3,4,5")
    p.add_argument("--min-delta", type=float, default=40.0)
    p.add_argument("--out", default="bench/results/choose_defaults")
    p.add_argument("--workdir", default="runs/choose_defaults")
    args = p.parse_args()
    args.choose_seeds = [int(s) for s in args.choose_seeds.split(",")]
    args.judge_seeds = [int(s) for s in args.judge_seeds.split(",")]
    import torch

    torch.set_num_threads(1)  # tiny model: one thread is fastest on a small shared CPU
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    stored = args.stage in ("judge", "summary")
    record = json.loads((out / "choose.json").read_text()) if stored else choose(args, out)
    record["chosen"] = pick(record["rows"], args.min_delta)  # the rule of this run, on the stored points
    if args.stage == "summary":
        judged = json.loads((out / "judge.json").read_text()) if (out / "judge.json").is_file() else None
    else:
        judged = judge(args, out, record["chosen"]) if args.stage != "choose" else None
    text = summary(args, record["chosen"], judged)
    if args.stage != "summary":
        text += f"\nWall time of this run: {time.time() - started:.0f} s.\n"
    else:
        previous = (out / "summary.md").read_text() if (out / "summary.md").is_file() else ""
        text += "".join(line + "\n" for line in previous.splitlines() if line.startswith("Wall time"))
    (out / "summary.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
