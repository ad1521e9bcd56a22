"""``offsite report``: the five OT numbers (+ Δ) for a base model, as a table, JSON and PNG."""

from __future__ import annotations

import os

from .common import protocol_from, steps


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="full ZS / emulator ZS / emulator FT / plug-in per task, with Δ")
    p.add_argument("--model", required=True, help="base model folder or hub id")
    p.add_argument("--tasks", required=True, help="comma-separated task names (see offsite eval); own data as "
                   "mine/{split}.jsonl (fine-tunes on train, scores --split)")
    p.add_argument("--data-dir", default=os.environ.get("OFFSITE_DATA_DIR"), help="offline data folder")
    p.add_argument("--methods", default="uniform", help="comma-separated emulator methods")
    p.add_argument("--adapter-layers", default="2,2")
    p.add_argument("--emulator-layers", type=int, default=None, help="for the methods that have this setting")
    p.add_argument("--calibration", default=None, help="public calibration text for methods that learn from text")
    p.add_argument("--method-set", action="append", default=[], metavar="METHOD:KEY=VALUE",
                   help="a setting of one method, e.g. scaleot:alpha=0.5 (repeatable)")
    p.add_argument("--split", default="validation")
    p.add_argument("--limit", type=int, default=None, help="first N evaluation questions per task")
    p.add_argument("--train-limit", type=int, default=None, help="first N training examples per task")
    p.add_argument("--max-steps", type=steps, default=200)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--full-ft", action="store_true",
                   help="also fine-tune every decoder block of the full model (the FT upper bound; slow)")
    p.add_argument("--audit", action="store_true",
                   help="add the best of offsite audit's attacks on each emulator as a sixth row (same budget)")
    p.add_argument("--public", default=None, help="public text of the audit's recovery attack (default: the "
                   "calibration default when present)")
    p.add_argument("--stream", action="store_true",
                   help="base model larger than memory: build with emulate --stream and score the full model with "
                        "its layers on disk (not with --full-ft or scaleot)")
    p.add_argument("--workdir", required=True, help="folder for emulators, adapters, report.json/.md/.png")
    p.add_argument("--device", default="auto",
                   help="where every build, fine-tuning and scoring runs: auto (CUDA when present, else CPU) | "
                        "cpu | cuda | cuda:N | mps")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..core.device import resolve_device
    from ..eval.run import check_data_dir, parse_tasks
    from ..experiments.report import format_report, plot_report, run_report

    device = resolve_device(args.device)  # first: an unavailable device costs nothing and writes nothing
    check_data_dir(parse_tasks(args.tasks), args.data_dir)
    methods = [m for m in args.methods.split(",") if m]
    settings = method_settings(methods, args.emulator_layers, args.method_set)
    report = run_report(args.model, args.tasks, args.workdir, protocol_from(args, device), methods=methods,
                        adapter_layers=args.adapter_layers, method_settings=settings, full_ft=args.full_ft,
                        calibration=args.calibration, audit=args.audit, public=args.public, stream=args.stream)
    table = format_report(report)
    from pathlib import Path

    (Path(args.workdir) / "report.md").write_text(table + "\n")
    png = plot_report(report, Path(args.workdir) / "report.png")
    print(table)
    print(f"written: {args.workdir}/report.json, report.md" + (", report.png" if png else ""))
    return 0


def method_settings(methods: list, emulator_layers, pairs: list) -> dict:
    """``{method: {setting: value}}`` from ``--emulator-layers`` and ``--method-set METHOD:KEY=VALUE``."""
    import dataclasses

    from ..core.errors import OffsiteError
    from ..emulator import get_builder
    from .common import parse_settings

    out = {m: {} for m in methods}
    for m in methods:
        fields = {f.name for f in dataclasses.fields(get_builder(m).config_cls)}
        if emulator_layers is not None and "emulator_layers" in fields:
            out[m]["emulator_layers"] = emulator_layers
    for pair in pairs:
        method, sep, setting = pair.partition(":")
        if not sep or method not in out:
            raise OffsiteError(f"--method-set expects METHOD:KEY=VALUE with METHOD one of {methods}, got {pair!r}")
        out[method].update(parse_settings([setting]))
    return out
