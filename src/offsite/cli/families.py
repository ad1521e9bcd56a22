"""``offsite families``: list the supported architectures."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("families", help="list supported architectures (config.model_type)")
    p.add_argument("--json", action="store_true", help="print the full role table as JSON")
    p.add_argument("--support", action="store_true",
                   help="print the support table (family x method, LoRA, streamed build, federate) as Markdown")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..families import FAMILIES, describe
    from .common import print_json

    if args.support:
        print(support_table())
        return 0
    if args.json:
        print_json([describe(FAMILIES[k]) for k in sorted(FAMILIES)])
        return 0
    width = max(len("model_type"), *map(len, FAMILIES))
    print(f"{'model_type':<{width}} {'layers':<22} {'attention':<34} {'mlp'}")
    for key in sorted(FAMILIES):
        f = FAMILIES[key]
        attn = ",".join(p.rsplit(".", 1)[-1] for p in f.attention.values())
        mlp = ",".join(p.rsplit(".", 1)[-1] for p in f.mlp.values()) or (
            f"router {f.experts.router} + fused experts {f.experts.path}" if f.experts else "")
        print(f"{key:<{width}} {f.layers:<22} {attn:<34} {mlp}")
    return 0


def support_table() -> str:
    """Family x (every registered method, LoRA, streamed build, federate) as a Markdown table.

    Generated from the registries, and true because the conformance suite runs each registered
    method, LoRA and the streamed builds on every family (``tests/test_families.py``,
    ``tests/test_streaming.py``); the README holds this table and a test fails when it is stale.
    A method that cannot build from a streamed model (its ``stream_refusal``) is said in the
    streamed column, the same for every family, and so is a family whose checkpoints transformers
    converts on load in a way the streamed reader does not reproduce. LoRA on a mixture-of-experts
    family targets the attention projections.
    """
    from ..emulator import available_methods, get_builder
    from ..families import FAMILIES, tiny_config
    from ..model.streaming import conversion_refusal

    methods = available_methods()
    streamed = ", ".join(m for m in methods if get_builder(m).supports_stream)
    head = ["family", *methods, "LoRA", "streamed build", "federate"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in sorted(FAMILIES):
        converted = conversion_refusal(tiny_config(key, 1))
        lora = "✓ (attention)" if FAMILIES[key].experts else "✓"
        cells = [f"`{key}`", *["✓"] * len(methods), lora,
                 "— (converted on load: loads whole)" if converted else streamed, "✓"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
