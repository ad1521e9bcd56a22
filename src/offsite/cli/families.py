"""``offsite families``: list the supported architectures."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("families", help="list supported architectures (config.model_type)")
    p.add_argument("--json", action="store_true", help="print the full role table as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..families import FAMILIES, describe
    from .common import print_json

    if args.json:
        print_json([describe(FAMILIES[k]) for k in sorted(FAMILIES)])
        return 0
    print(f"{'model_type':<10} {'layers':<22} {'attention':<34} {'mlp'}")
    for key in sorted(FAMILIES):
        f = FAMILIES[key]
        attn = ",".join(p.rsplit(".", 1)[-1] for p in f.attention.values())
        mlp = ",".join(p.rsplit(".", 1)[-1] for p in f.mlp.values())
        print(f"{key:<10} {f.layers:<22} {attn:<34} {mlp}")
    return 0
