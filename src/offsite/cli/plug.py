"""``offsite plug``: full model + adapter artifact -> stock HF checkpoint (or PEFT adapter)."""

from __future__ import annotations


def add_parser(sub) -> None:
    from .common import add_out

    p = sub.add_parser("plug", help="plug a fine-tuned adapter into the full model (model owner)")
    p.add_argument("--model", required=True, help="full base model: local folder or hub id")
    p.add_argument("--adapter", required=True, help="adapter or LoRA artifact folder")
    p.add_argument("--lora-mode", default="merge", choices=["merge", "peft"],
                   help="LoRA: merge into the weights (default) or export a PEFT adapter for the full model")
    p.add_argument("--dtype", default="auto")
    add_out(p, "output folder")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..plug import plug

    out = plug(args.model, args.adapter, args.out, lora_mode=args.lora_mode, dtype=args.dtype,
               overwrite=args.overwrite)
    print(f"plugged model written to {out}")
    return 0
