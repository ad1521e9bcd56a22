"""Join ``offsite report`` results of the same model, tasks and settings run as separate processes.

Usage: python bench/merge_reports.py OUT_DIR REPORT.json [REPORT.json ...]

The first report supplies everything shared (model, tasks, fine-tuning settings and the full
model rows); every report contributes its methods. A method's full fine-tuning row is taken from
whichever report ran it, so one ``--full-ft`` run serves all methods. Writes ``OUT_DIR/report.json``,
``report.md`` and ``report.png``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SHARED = ("model", "tasks", "split", "limit", "finetune")


def merge(reports: list) -> dict:
    first = reports[0]
    for other in reports[1:]:
        differing = [k for k in SHARED if other.get(k) != first.get(k)]
        if differing:
            raise SystemExit(f"reports differ in {differing}; only runs of one protocol can be merged")
    merged = {**first, "methods": {}, "seconds": max(r.get("seconds", 0) for r in reports)}
    full_ft = next((m["table"]["full_ft"] for r in reports for m in r["methods"].values()
                    if any(v is not None for v in m["table"]["full_ft"].values())), None)
    for report in reports:
        for name, result in report["methods"].items():
            if full_ft is not None:
                result["table"]["full_ft"] = full_ft
            merged["methods"][name] = result
    return merged


def main(out: str, *paths: str) -> int:
    from offsite.experiments.report import format_report, plot_report

    report = merge([json.loads(Path(p).read_text()) for p in paths])
    root = Path(out)
    (root / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (root / "report.md").write_text(format_report(report) + "\n")
    plot_report(report, root / "report.png")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
