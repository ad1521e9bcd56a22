"""Merge ``report.json`` and the per-method build costs into ``summary.md`` + one PNG per method.

Usage: python bench/summarise_compare.py RESULTS_DIR "COMMAND THAT PRODUCED IT" [TITLE]

Reads ``RESULTS_DIR/report.json`` (``offsite report``) and ``RESULTS_DIR/build.jsonl`` (one
``bench/measure_build.py`` line per method); writes ``summary.md`` (build cost table, then the
five numbers and Δ per method) and ``plugin_vs_emuft-<method>.png``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(results: str, command: str, title: str = "") -> int:
    from offsite.experiments.report import format_report, plot_report

    root = Path(results)
    report = json.loads((root / "report.json").read_text())
    builds = {}
    if (root / "build.jsonl").is_file():
        for line in (root / "build.jsonl").read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                builds[record["method"]] = record
    lines = [f"# Emulator methods compared on {title or Path(report['model']).name}", "",
             f"Produced by `{command}`.", "",
             f"Tasks: {', '.join(report['tasks'])}; split {report['split']}, limit {report['limit']}; "
             f"fine-tuning {json.dumps(report['finetune'])}.", "",
             "| method | settings | emulator / full params | build s | peak RSS MB | avg plug-in | avg emu FT | Δ avg |",
             "|---|---|---|---|---|---|---|---|"]
    for method, res in report["methods"].items():
        b = builds.get(method, {})
        params = b.get("parameters") or res.get("build", {}).get("parameters") or {}
        ratio = f"{params['emulator'] / params['full']:.2f}" if params else "–"
        avg = res["table"]["plug_in"].get("avg"), res["table"]["emu_ft"].get("avg"), res["delta"].get("avg")
        cells = ["–" if v is None else f"{100 * v:.1f}" for v in avg]
        lines.append(f"| {method} | `{json.dumps(b.get('settings', {}))}` | {ratio} | {b.get('seconds', '–')} | "
                     f"{b.get('peak_rss_mb', '–')} | " + " | ".join(cells) + " |")
    errors = [100 * m["acc_stderr"] for res in report["methods"].values() for row in res["raw"].values()
              for m in row.values() if m and "acc_stderr" in m]
    if errors:
        lines += ["", f"Standard error of one accuracy (binomial, lm-eval's `acc_stderr`): {min(errors):.1f}–"
                      f"{max(errors):.1f} points; a difference between two methods' accuracies on one task "
                      f"needs about {2 * 1.41 * max(errors):.0f} points to be significant at 95%."]
    lines += ["", "CRaSh with `share=true` stores each shared layer once per position it fills (a stock HF "
              "checkpoint), so its stored size is the full depth while only K layers are distinct.", "",
              format_report(report)]
    (root / "summary.md").write_text("\n".join(lines) + "\n")
    for method in report["methods"]:
        plot_report({**report, "methods": {method: report["methods"][method]}},
                    root / f"plugin_vs_emuft-{method}.png")
    print((root / "summary.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]) if len(sys.argv) > 2 else main(sys.argv[1], "bench/compare_methods.sh"))
