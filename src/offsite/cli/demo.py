"""``offsite demo``: the whole offsite-tuning workflow on a generated world, in a few minutes on a CPU."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="run offsite-tuning end to end on a self-generated world and model",
                       description="Generate a small world, pretrain a small Llama on it, build an emulator, "
                                   "fine-tune the adapter on the emulator, plug it into the full model and "
                                   "compare full ZS, emulator ZS, emulator FT and plug-in on held-out questions.")
    p.add_argument("--workdir", default="runs/demo",
                   help="folder for data, models and artifacts; a finished pretraining there is reused "
                        "(default: runs/demo)")
    p.add_argument("--quick", action="store_true", help="smaller world and model (well under a minute)")
    p.add_argument("--seed", type=int, default=0, help="seed of the world, pretraining and fine-tuning")
    p.add_argument("--full-ft", action="store_true",
                   help="also fine-tune every decoder block of the full model (the upper bound; slower)")
    p.add_argument("--prepare-only", action="store_true",
                   help="only write the world's files and pretrain the model into --workdir, then print "
                        "their paths as JSON (for benchmarks that run their own protocol on them)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: on a small shared CPU more threads often run slower)")
    p.add_argument("--device", default="auto",
                   help="where pretraining, emulation, fine-tuning and scoring run: auto (CUDA when present, "
                        "else CPU) | cpu | cuda | cuda:N | mps")
    p.add_argument("--out", metavar="FILE.json", help="also write the results to this JSON file")
    p.add_argument("--quiet", action="store_true", help="no progress bars or step messages")
    p.set_defaults(func=run)


def run(args) -> int:
    import json
    from pathlib import Path

    from ..demo.pipeline import format_table, prepare, run_demo, settings_for
    from ..device import resolve_device

    device = resolve_device(args.device)  # first: an unavailable device costs nothing and writes nothing
    if args.prepare_only:
        import torch

        torch.set_num_threads(args.threads)
        paths, _ = prepare(args.workdir, settings_for(args.quick, args.seed), args.seed, progress=not args.quiet,
                           device=device)
        print(json.dumps({k: str(v) for k, v in paths.items()}, indent=1))
        return 0
    result = run_demo(args.workdir, quick=args.quick, seed=args.seed, progress=not args.quiet,
                      full_ft=args.full_ft, threads=args.threads, device=device)
    print(format_table(result))
    print(f"({result['seconds']['total']:.0f} s; details in {Path(args.workdir) / 'results.json'})")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0
