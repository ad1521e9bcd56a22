"""``offsite plug``: full model + adapter artifact -> stock HF checkpoint (or PEFT adapter)."""

from __future__ import annotations


def add_parser(sub) -> None:
    from .common import add_out, add_shard_size

    p = sub.add_parser("plug", help="plug a fine-tuned adapter into the full model (model owner)")
    p.add_argument("--model", required=True, help="full base model: local folder or hub id")
    p.add_argument("--adapter", required=True, help="adapter or LoRA artifact folder")
    p.add_argument("--lora-mode", default="merge", choices=["merge", "peft"],
                   help="LoRA: merge into the weights (default) or export a PEFT adapter for the full model")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto",
                   help="where the full model is loaded and the adapter plugged in: auto (CUDA when present, "
                        "else CPU) | cpu | cuda | cuda:N | mps")
    p.add_argument("--emulator", default=None,
                   help="the emulator package the adapter was trained on (recommended): its id and adapter layers "
                        "must match the adapter's, which a forged adapter manifest cannot fake")
    p.add_argument("--stream", action="store_true",
                   help="never load the full model: plug into the adapter layers alone and copy every other tensor "
                        "from the checkpoint's .safetensors files shard by shard (same output)")
    add_out(p, "output folder")
    add_shard_size(p)
    from .common import add_trust

    add_trust(p, "the adapter (and --emulator)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..core.device import resolve_device
    from ..workflows.plug import plug

    device = resolve_device(args.device)  # first: an unavailable device costs nothing and writes nothing
    out = plug(args.model, args.adapter, args.out, lora_mode=args.lora_mode, dtype=args.dtype,
               overwrite=args.overwrite, emulator=args.emulator, trusted_keys=args.trusted_keys,
               sign_key=args.sign_key, device=device, max_shard_size=args.max_shard_size, stream=args.stream)
    print(f"plugged model written to {out}")
    return 0
