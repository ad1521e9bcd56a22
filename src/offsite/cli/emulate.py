"""``offsite emulate``: base model -> emulator package."""

from __future__ import annotations


def add_parser(sub) -> None:
    from ..emulator import available_methods

    p = sub.add_parser("emulate", help="build an emulator package from a base model (model owner)")
    p.add_argument("--model", required=True, help="base model: local folder or hub id")
    p.add_argument("--method", default="uniform", choices=available_methods(), help="emulator method")
    p.add_argument("--adapter-layers", default="2,2",
                   help="'a,b' = first a and last b layers, or 'idx:0,5,18,23' (default 2,2)")
    p.add_argument("--emulator-layers", type=int, default=None,
                   help="middle layers the emulator keeps (uniform; default 40%% of the middle)")
    p.add_argument("--calibration", default=None, help="public calibration text file (methods that need one)")
    p.add_argument("--dtype", default="auto", help="dtype to load the base model in (auto, float32, bfloat16)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="other method settings")
    from .common import add_out

    add_out(p, "emulator package folder to write")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..emulate import emulate
    from .common import parse_settings

    settings = parse_settings(args.set)
    if args.emulator_layers is not None:
        settings["emulator_layers"] = args.emulator_layers
    out = emulate(args.model, args.out, method=args.method, adapter_layers=args.adapter_layers, dtype=args.dtype,
                  calibration=args.calibration, overwrite=args.overwrite, **settings)
    print(f"emulator package written to {out}")
    return 0
