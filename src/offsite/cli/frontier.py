"""``offsite frontier``: sweep one method's size (and GradOT's λ), score each point, write the best emulator
that meets a privacy target."""

from __future__ import annotations

import os

from .common import add_out, parse_settings, protocol_from, refuse_workflow_arguments, steps


def add_parser(sub) -> None:
    p = sub.add_parser("frontier", help="sweep an emulator's size on a validation split; keep the best plug-in "
                       "that meets a privacy target")
    p.add_argument("--model", required=True, help="base model folder or hub id")
    p.add_argument("--method", required=True, help="emulator method to sweep (offsite emulate --help lists them)")
    p.add_argument("--tasks", required=True, help="one task name (with --data-dir) or own data as mine/{split}.jsonl")
    p.add_argument("--data-dir", default=os.environ.get("OFFSITE_DATA_DIR"), help="offline data folder")
    p.add_argument("--values", default=None, help="comma-separated values of the method's size setting "
                   "(uniform/distill/crash: emulator_layers; scaleot: alpha; gradot: param_budget); default: "
                   "the method's three")
    p.add_argument("--lambdas", default=None, help="gradot: comma-separated λ values (attention and MLP)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="settings every point shares")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--max-emulator-score", type=float, default=None,
                        help="privacy target: emulator FT (or, with --audit, the strongest attack) at most this "
                             "accuracy in %%")
    target.add_argument("--min-delta", type=float, default=None,
                        help="privacy target: plug-in minus the emulator side at least this (accuracy points; "
                             "for perplexity: emulator minus plug-in perplexity)")
    p.add_argument("--audit", action="store_true", help="judge privacy by the strongest attack of offsite audit "
                   "(same budget), not by emulator FT; slower")
    p.add_argument("--public", default=None, help="public text of the audit's recovery attack")
    p.add_argument("--adapter-layers", default="2,2")
    p.add_argument("--calibration", default=None, help="public calibration text for methods that learn from text")
    p.add_argument("--split", default="validation", help="split every point is scored on (keep test for judging)")
    p.add_argument("--limit", type=int, default=None, help="first N evaluation questions")
    p.add_argument("--train-limit", type=int, default=None, help="first N training examples")
    p.add_argument("--max-steps", type=steps, default=200)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workdir", required=True, help="folder for every point and frontier.json/.md/.png (not an input)")
    add_out(p, "where the chosen emulator package goes")
    p.add_argument("--device", default="auto",
                   help="where everything runs: auto (CUDA when present, else CPU) | cpu | cuda | cuda:N | mps")
    p.set_defaults(func=run)


def _numbers(text, what: str) -> list | None:
    from ..core.errors import OffsiteError
    from .common import parse_settings

    if text is None:
        return None
    values = [parse_settings([f"v={v.strip()}"])["v"] for v in text.split(",") if v.strip()]
    if not values or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in values):
        raise OffsiteError(f"{what} expects comma-separated numbers, got {text!r}")
    return values


def run(args) -> int:
    from ..core.device import resolve_device
    from ..experiments.frontier import format_frontier, run_frontier
    from ..workflows.emulate import emulate

    # every point's settings go to emulate(); its own arguments are flags of this command or fixed
    fixed = refuse_workflow_arguments(parse_settings(args.set), emulate, {"selection": None, "stream": None})
    device = resolve_device(args.device)  # an unavailable device costs nothing and writes nothing
    record = run_frontier(args.model, args.method, args.tasks, args.workdir, args.out, protocol_from(args, device),
                          values=_numbers(args.values, "--values"), lambdas=_numbers(args.lambdas, "--lambdas"),
                          fixed=fixed, max_emulator_score=args.max_emulator_score,
                          min_delta=args.min_delta, audit=args.audit, public=args.public,
                          adapter_layers=args.adapter_layers, calibration=args.calibration, overwrite=args.overwrite,
                          sign_key=args.sign_key)
    print(format_frontier(record))
    print(f"written: {args.out} (the chosen emulator); {args.workdir}/frontier.json, frontier.md, frontier.png")
    return 0
