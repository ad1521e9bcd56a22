"""``offsite emulate``: base model -> emulator package.

Every field of every registered method's config dataclass becomes a flag (``steps`` ->
``--steps``), with the field's docstring as help, so a new method's settings need no CLI code.
A flag is passed only when given, and only to a method that has that setting.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap



def workflow_arguments() -> set:
    """The arguments :func:`offsite.emulate.emulate` takes itself, read off its signature."""
    import inspect

    from ..emulate import emulate

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


def field_docs(cls) -> dict:
    """Attribute docstrings of a dataclass (the string right under each field), by field name."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):
        return {}
    body, docs = tree.body[0].body, {}
    for stmt, nxt in zip(body, body[1:]):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def add_parser(sub) -> None:
    from ..emulator import available_methods

    p = sub.add_parser("emulate", help="build an emulator package from a base model (model owner)")
    p.add_argument("--model", required=True, help="base model: local folder or hub id")
    p.add_argument("--method", default="uniform", choices=available_methods(), help="emulator method")
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
    group = p.add_argument_group("method settings (each applies to the methods named in brackets)")
    for name, (help_text, owners) in sorted(method_settings().items()):
        group.add_argument(f"--{name.replace('_', '-')}", dest=f"setting_{name}", default=None, metavar="V",
                           help=f"[{', '.join(owners)}] {help_text}".replace("%", "%%"))
    from .common import add_out, add_shard_size

    add_out(p, "emulator package folder to write")
    add_shard_size(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..device import resolve_device
    from ..emulate import emulate
    from ..errors import OffsiteError
    from .common import parse_settings, refuse_workflow_arguments

    settings = refuse_workflow_arguments(parse_settings(args.set), emulate, {"selection": None})
    device = resolve_device(args.device)  # an unavailable device costs nothing and writes nothing
    known = method_settings()
    for name, (_, owners) in known.items():
        value = getattr(args, f"setting_{name}", None)
        if value is None:
            continue
        if args.method not in owners:
            raise OffsiteError(f"--{name.replace('_', '-')} is a setting of {', '.join(owners)}, "
                               f"not of method '{args.method}'")
        settings[name] = parse_settings([f"{name}={value}"])[name]
    out = emulate(args.model, args.out, method=args.method, adapter_layers=args.adapter_layers, dtype=args.dtype,
                  calibration=args.calibration, overwrite=args.overwrite,
                  allow_verbatim_middle=args.allow_verbatim_middle, sign_key=args.sign_key, device=device,
                  max_shard_size=args.max_shard_size, stream=args.stream,
                  **({"spill_above": args.spill_above} if args.spill_above is not None else {}), **settings)
    print(f"emulator package written to {out}")
    return 0
