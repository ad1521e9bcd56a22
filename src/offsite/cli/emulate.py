"""``offsite emulate METHOD``: base model -> emulator package.

Each registered method is a subcommand whose flags are the fields of its own config dataclass
(``steps`` -> ``--steps``), with the field's docstring as help, its annotation as the metavar and its
default shown, so ``offsite emulate gradot --help`` lists GradOT's settings and nothing else and a
new method's settings need no CLI code. A flag is passed only when given; the config checks its
type. The older spelling ``offsite emulate --method M`` keeps one merged namespace of every
method's flags, each refused for a method that lacks it.
"""

from __future__ import annotations

import dataclasses
import inspect

from .common import field_docs


def workflow_arguments() -> set:
    """The arguments :func:`offsite.workflows.emulate.emulate` takes itself, read off its signature."""
    from ..workflows.emulate import emulate

    return {name for name, param in inspect.signature(emulate).parameters.items()
            if param.kind not in (param.VAR_KEYWORD, param.VAR_POSITIONAL)}


def method_settings() -> dict:
    """``{setting: (help, [methods having it])}`` over the registered methods' config dataclasses."""
    from ..emulator import available_methods, get_builder

    out: dict = {}
    own = workflow_arguments() | {"set"}
    for method in available_methods():
        cls = get_builder(method).config_cls
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            if f.name in own:
                continue  # a setting shadowed by a workflow argument stays reachable through --set
            help_text, owners = out.get(f.name, (docs.get(f.name, ""), []))
            out[f.name] = (help_text or docs.get(f.name, ""), owners + [method])
    return out


def add_common(p, legacy: bool = False) -> None:
    """The workflow's own arguments (every method's); ``legacy``: not required by argparse, because
    ``offsite emulate --method M`` shares its parser with the per-method subcommands."""
    from .common import add_out, add_shard_size

    p.add_argument("--model", required=not legacy, help="base model: local folder, hub id or .gguf file")
    p.add_argument("--adapter-layers", default="2,2",
                   help="'a,b' = first a and last b layers, or 'idx:0,5,18,23' (default 2,2)")
    p.add_argument("--calibration", default=None,
                   help="public calibration text file (.txt/.gz/.jsonl) for methods that learn from text")
    p.add_argument("--dtype", default="auto", help="dtype to load the base model in (auto, float32, bfloat16)")
    p.add_argument("--device", default="auto",
                   help="where the base model is loaded and the method runs: auto (CUDA when present, else CPU) | "
                        "cpu | cuda | cuda:N | mps")
    p.add_argument("--allow-verbatim-middle", action="store_true",
                   help="write the package even if middle layers leave unchanged (e.g. every middle layer kept); "
                        "only for packages that are never shipped")
    streaming = p.add_mutually_exclusive_group()
    streaming.add_argument("--stream", dest="stream", action="store_const", const=True, default=None,
                           help="read the base model's decoder layers from its .safetensors files one at a time "
                                "(the default wherever the method and the model allow it; with this flag, refuse "
                                "otherwise): memory of one layer, same package")
    streaming.add_argument("--no-stream", dest="stream", action="store_const", const=False,
                           help="load the whole base model (can be faster when it fits in memory)")
    p.add_argument("--spill-above", default=None, metavar="SIZE",
                   help="streamed builds: calibration activations beyond SIZE (e.g. 2GB, 0 = all) go to a scratch "
                        "folder beside --out, so memory does not grow with depth (default 2GB)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="method settings as KEY=VALUE")
    add_out(p, "emulator package folder to write", required=not legacy)
    add_shard_size(p)


def add_method_settings(p, method: str) -> None:
    """One flag per field of ``method``'s config: its own help text, its type and its default."""
    from ..emulator import get_builder

    cls = get_builder(method).config_cls
    docs, own = field_docs(cls), workflow_arguments() | {"set"}
    group = p.add_argument_group(f"{method} settings (given ones only reach the method; the rest keep their default)")
    for f in dataclasses.fields(cls):
        if f.name in own:
            continue
        default = f.default if f.default is not dataclasses.MISSING else "(computed)"
        kind = str(f.type).replace(" ", "").replace("typing.", "")
        group.add_argument(f"--{f.name.replace('_', '-')}", dest=f"setting_{f.name}", default=None,
                           metavar=kind.upper(),
                           help=f"{docs.get(f.name, '')} (default: {default})".strip().replace("%", "%%"))


def add_parser(sub) -> None:
    import argparse

    from ..emulator import available_methods, get_builder

    p = sub.add_parser("emulate", help="build an emulator package from a base model (model owner)",
                       description="offsite emulate METHOD --model M --out E [settings]: build an emulator "
                                   "package; `offsite emulate METHOD --help` lists that method's settings. "
                                   "`offsite emulate --method M ...` is the older spelling, kept as an alias.")
    add_common(p, legacy=True)
    p.add_argument("--method", default=None, choices=available_methods(),
                   help="emulator method (older spelling of the METHOD subcommand; default uniform)")
    group = p.add_argument_group("method settings of the older spelling (each applies to the methods in brackets)")
    for name, (help_text, owners) in sorted(method_settings().items()):
        group.add_argument(f"--{name.replace('_', '-')}", dest=f"setting_{name}", default=None, metavar="V",
                           help=f"[{', '.join(owners)}] {help_text}".replace("%", "%%"))
    methods = p.add_subparsers(dest="method_command", metavar="METHOD", required=False)
    for method in available_methods():
        doc = (type(get_builder(method)).__doc__ or "").strip().splitlines()
        mp = methods.add_parser(method, help=doc[0] if doc else method)
        add_common(mp)
        add_method_settings(mp, method)
        mp.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="no progress bars or phase timings on stderr (the final cost line and errors stay)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..core.device import resolve_device
    from ..core.errors import OffsiteError
    from ..workflows.emulate import emulate
    from .common import parse_settings, refuse_workflow_arguments

    if args.method_command and args.method:
        raise OffsiteError(f"give the method once: `offsite emulate {args.method_command} ...` or --method, not both")
    method = args.method_command or args.method or "uniform"
    for flag in ("model", "out"):
        if getattr(args, flag) is None:
            raise OffsiteError(f"--{flag} is required (offsite emulate {method} --model M --out E)")
    settings = refuse_workflow_arguments(parse_settings(args.set), emulate, {"selection": None})
    device = resolve_device(args.device)  # an unavailable device costs nothing and writes nothing
    known = method_settings()
    for name, (_, owners) in known.items():
        value = getattr(args, f"setting_{name}", None)
        if value is None:
            continue
        if method not in owners:
            raise OffsiteError(f"--{name.replace('_', '-')} is a setting of {', '.join(owners)}, "
                               f"not of method '{method}'")
        settings[name] = parse_settings([f"{name}={value}"])[name]
    out = emulate(args.model, args.out, method=method, adapter_layers=args.adapter_layers, dtype=args.dtype,
                  calibration=args.calibration, overwrite=args.overwrite,
                  allow_verbatim_middle=args.allow_verbatim_middle, sign_key=args.sign_key, device=device,
                  max_shard_size=args.max_shard_size, stream=args.stream,
                  **({"spill_above": args.spill_above} if args.spill_above is not None else {}), **settings)
    print(f"emulator package written to {out}")
    return 0
