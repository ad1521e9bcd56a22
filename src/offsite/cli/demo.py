"""``offsite demo``: the embedded, generated end-to-end run (world -> tiny LM -> emulator -> adapter -> plug-in)."""

from __future__ import annotations

import json


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="run the embedded offline demo and print the OT numbers")
    p.add_argument("--workdir", default="runs/demo", help="where the generated data, model and artifacts go")
    p.add_argument("--quick", action="store_true", help="a smaller, faster setting")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the results JSON here")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..demo.pipeline import run_demo

    result = run_demo(args.workdir, quick=args.quick, seed=args.seed)
    acc = result["accuracy"]
    print(f"\nOffsite-tuning demo ({result['test_questions']} test questions, chance {result['chance']:.2f})")
    for key, label in (("full_zs", "Full ZS"), ("emulator_zs", "Emulator ZS"), ("emulator_ft", "Emulator FT"),
                       ("plug_in", "Plug-in")):
        if acc.get(key) is not None:
            print(f"  {label:<12} {100 * acc[key]:5.1f}")
    print(f"  {'Δ (plug-in − emulator FT)':<12} {100 * result['delta']:+.1f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2, default=str)
    return 0
