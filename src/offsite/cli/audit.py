"""``offsite audit``: the data owner's attacks on an emulator package and the privacy margin they leave."""

from __future__ import annotations

import os

from .common import protocol_from, steps


def add_parser(sub) -> None:
    p = sub.add_parser("audit", help="attacks a data owner can run on an emulator package; the worst-case privacy margin")
    p.add_argument("--emulator", required=True, help="the emulator package to audit")
    p.add_argument("--model", required=True, help="the full model it was built from (folder or hub id)")
    p.add_argument("--tasks", required=True, help="comma-separated task names (with --data-dir) or own data as "
                   "mine/{split}.jsonl; fine-tunes on train, scores --split")
    p.add_argument("--data-dir", default=os.environ.get("OFFSITE_DATA_DIR"), help="offline data folder")
    p.add_argument("--public", default=None, help="public text for the recovery attack (.txt/.gz/.jsonl; default: "
                   "the calibration default, War and Peace from the shared data, when present)")
    p.add_argument("--workdir", required=True, help="folder for adapters and audit.json/.md/.png (not an input)")
    p.add_argument("--budget", default="same", help="same: every attack gets the honest fine-tune's --max-steps; "
                   "strong: 4 times as many (recovery: half on public text, half on the task)")
    p.add_argument("--attacks", default="adapter,full,lora,recovery",
                   help="comma-separated subset of adapter,full,lora,recovery")
    p.add_argument("--max-steps", type=steps, default=200, help="optimizer steps of the honest fine-tune")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--split", default="validation")
    p.add_argument("--limit", type=int, default=None, help="first N evaluation questions per task")
    p.add_argument("--train-limit", type=int, default=None, help="first N training examples per task")
    p.add_argument("--full-ft", action="store_true", help="also fine-tune every decoder block of the full model")
    p.add_argument("--device", default="auto",
                   help="where everything runs: auto (CUDA when present, else CPU) | cpu | cuda | cuda:N | mps")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..core.device import resolve_device
    from ..experiments.audit import format_audit, run_audit

    device = resolve_device(args.device)  # first: an unavailable device costs nothing and writes nothing
    audit = run_audit(args.emulator, args.model, args.tasks, args.workdir, protocol_from(args, device),
                      public=args.public, budget=args.budget, attacks=[a for a in args.attacks.split(",") if a],
                      full_ft=args.full_ft)
    print(format_audit(audit))
    written = [n for n in ("audit.json", "audit.md", "audit.png") if os.path.isfile(os.path.join(args.workdir, n))]
    print(f"written: {args.workdir}/" + f", {args.workdir}/".join(written))  # no PNG without matplotlib
    return 0
