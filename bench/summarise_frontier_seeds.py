"""Put the frontier runs of several seeds side by side: emulator FT / plug-in per point and seed, and the mean.

Usage: python bench/summarise_frontier_seeds.py OUT.md RESULTS_DIR [RESULTS_DIR ...]

Each RESULTS_DIR holds ``frontier.json`` and/or ``gradot_lambda.json`` from ``bench/frontier_demo.py``
(one seed each: a different generated world, pretraining and fine-tuning). Points are matched by
position, so every run must use the same point set.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

SHOWN = ("emulator_layers", "alpha", "param_budget", "lambda_attn", "scoring")


def table(records: list) -> list:
    seeds = [r["seed"] for r in records]
    lines = ["| method | setting | " + " | ".join(f"seed {s}: emu FT / plug-in" for s in seeds)
             + " | mean emu FT | mean plug-in |", "|---" * (4 + len(seeds)) + "|",
             "| full model ZS | | " + " | ".join(f"{100 * r['points'][0]['full_zs']:.1f}" for r in records)
             + " | | |"]
    for i, point in enumerate(records[0]["points"]):
        rows = [r["points"][i] for r in records]
        if any(row["method"] != point["method"] or row["settings"] != point["settings"] for row in rows):
            raise SystemExit(f"point {i} differs between runs; only runs of one point set can be joined")
        setting = ", ".join(f"{k}={point['settings'][k]}" for k in SHOWN if k in point["settings"])
        cells = [f"{100 * row['emu_ft']:.1f} / {100 * row['plug_in']:.1f}" for row in rows]
        means = [statistics.mean(100 * row[key] for row in rows) for key in ("emu_ft", "plug_in")]
        lines.append(f"| {point['method']} | {setting} | " + " | ".join(cells)
                     + f" | {means[0]:.1f} | {means[1]:.1f} |")
    return lines


def main(out: str, *dirs: str) -> int:
    lines = ["# Demo-world frontier over seeds", "",
             f"Produced by `python bench/summarise_frontier_seeds.py {out} {' '.join(dirs)}` from the runs' JSON; "
             "each run's own command is in its .md file. Accuracies in %, 105 test questions per seed.", ""]
    for stem, title in (("frontier", "Every method at three sizes"), ("gradot_lambda", "GradOT's λ at budget 0.5")):
        records = [json.loads((Path(d) / f"{stem}.json").read_text()) for d in dirs
                   if (Path(d) / f"{stem}.json").is_file()]
        if records:
            lines += [f"## {title}", "", *table(records), ""]
    Path(out).write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
