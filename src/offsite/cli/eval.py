"""``offsite eval``: score a model (optionally with an adapter plugged in) on benchmark tasks.

    offsite eval --model DIR [--adapter DIR] --tasks arc_easy,piqa --data-dir DIR
                 [--split validation] [--limit N] [--batch-size N] [--stream] --out FILE.json

Writes ``{"results": ..., "settings": ..., "model": ...}`` to ``--out`` and prints a table.
``--data-dir`` defaults to ``$OFFSITE_DATA_DIR``. Imports stay inside :func:`run` so that building
the parser (every ``offsite`` call) does not load torch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def add_parser(sub) -> None:
    from ..data.tasks import list_tasks  # stdlib-only module: cheap

    p = sub.add_parser("eval", help="evaluate a model / emulator / plugged-in model on benchmark tasks")
    p.add_argument("--model", required=True, help="model folder, emulator folder or hub id")
    p.add_argument("--adapter", help="fine-tuned adapter folder to plug into --model")
    p.add_argument("--tasks", required=True,
                   help=f"comma-separated task names ({', '.join(list_tasks())}) or .jsonl(.gz) files "
                        "in the multiple-choice schema; a path with {split} (mine/{split}.jsonl) has one file per split")
    p.add_argument("--data-dir", default=None, help="offline data folder (default: $OFFSITE_DATA_DIR)")
    p.add_argument("--split", default="validation",
                   help="validation | test | train | default (lm-eval's split per task); default validation")
    p.add_argument("--limit", type=int, default=None, help="first N questions per task")
    p.add_argument("--batch-size", type=int, default=8,
                   help="rows per forward pass when no token budget applies (default 8)")
    p.add_argument("--max-batch-tokens", type=int, default=None, metavar="N",
                   help="multiple choice: batch by N padded tokens instead of --batch-size rows; 0 = off "
                        "(default: 8192 on CUDA, off on the CPU); scores are the same either way")
    p.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU) | cpu | cuda | cuda:N | mps")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16 (default auto)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="generation budget for webquestions")
    p.add_argument("--max-length", type=int, default=None, help="override the model's context length")
    p.add_argument("--stride", type=int, default=None, help="perplexity window stride (default: context length)")
    p.add_argument("--stream", action="store_true",
                   help="keep a full model's decoder layers on disk, each read while it runs (models larger than "
                        "memory; every batch reads the model once: use large batches); emulators load in memory")
    p.add_argument("--details", action="store_true", help="also write per-question records to the JSON")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--out", required=True, help="results JSON file")
    from .common import add_trust

    add_trust(p, "every artifact read (--model package or plugged folder, --adapter)")
    p.set_defaults(func=run)


def _positive(name: str, value) -> None:
    from ..core.errors import OffsiteError

    if value is not None and value < 1:
        raise OffsiteError(f"{name} must be a positive integer, got {value}")


def run(args) -> int:
    from ..core.device import resolve_device
    from ..core.errors import OffsiteError
    from ..data.batching import resolve_batch_tokens
    from ..eval.run import check_data_dir, evaluate, format_table, parse_tasks

    device = resolve_device(args.device)  # first: an unavailable device costs nothing and writes nothing
    budget = resolve_batch_tokens(args.max_batch_tokens, device)
    data_dir = args.data_dir or os.environ.get("OFFSITE_DATA_DIR")
    check_data_dir(parse_tasks(args.tasks), data_dir)
    for name in ("--limit", "--batch-size", "--max-new-tokens", "--max-length", "--stride"):
        _positive(name, getattr(args, name[2:].replace("-", "_")))
    tasks = parse_tasks(args.tasks)  # fail on a typo before loading the model
    out = Path(args.out)
    if out.exists() and out.is_dir():
        raise OffsiteError(f"--out {out} is a folder; give a file name such as results.json")
    from ..artifacts import overlapping_input
    from ..data.tasks import get_task

    task_files = [get_task(t).path.replace("{split}", sp) for t in tasks if get_task(t).adhoc
                  for sp in get_task(t).splits]
    given, relation = overlapping_input(out, [args.model, args.adapter, *task_files])
    if relation == "inside":
        raise OffsiteError(f"--out {out} is (inside) the input {given}; writing there would change it")

    from ..eval.loading import load_for_eval

    model, tokenizer, info = load_for_eval(args.model, adapter=args.adapter, dtype=args.dtype,
                                          trusted_keys=args.trusted_keys, device=device, stream=args.stream)
    report = evaluate(model, tokenizer, tasks, data_dir, split=args.split, limit=args.limit,
                      batch_size=args.batch_size, progress=not args.no_progress, keep_details=args.details,
                      max_new_tokens=args.max_new_tokens, max_length=args.max_length, stride=args.stride,
                      max_batch_tokens=budget)
    params = sum(p.numel() for p in model.parameters())
    report["model"] = {**_jsonable(info), "parameters": params,
                       "model_type": getattr(getattr(model, "config", None), "model_type", None)}
    report["settings"] = {"model": args.model, "adapter": args.adapter, "tasks": tasks,
                          "data_dir": str(Path(data_dir).resolve()) if data_dir else None, "split": args.split,
                          "limit": args.limit,
                          "batch_size": args.batch_size, "dtype": args.dtype, "max_new_tokens": args.max_new_tokens,
                          "max_length": args.max_length, "stride": args.stride, "device": str(device),
                          "max_batch_tokens": budget, "stream": args.stream}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
    os.replace(tmp, out)  # atomic: a crash never leaves half a results file
    print(format_table(report))
    print(f"wrote {out}")
    return 0


def _jsonable(info) -> dict:
    # load_for_eval's info may hold paths or dtypes; JSON gets their string form.
    return json.loads(json.dumps(dict(info or {}), default=str))
