"""Argument helpers shared by the subcommands."""

from __future__ import annotations

import ast
import inspect
import json
import textwrap


def add_out(parser, help_text: str = "output folder", required: bool = True) -> None:
    """``--out``, ``--overwrite`` and ``--sign-key`` of a command that writes an artifact."""
    parser.add_argument("--out", required=required, help=help_text)
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out if it is already an artifact of the same kind (never an input)")
    parser.add_argument("--sign-key", default=None, metavar="KEY",
                        help="sign the artifact with this Ed25519 private key (offsite keygen); default unsigned")


def add_shard_size(parser) -> None:
    """``--max-shard-size`` of a command that writes model weights."""
    parser.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                        help="largest weight file (bytes, or e.g. 5GB / 500MiB); bigger weights are written shard by "
                             "shard in Hugging Face's sharded layout (default 5GB)")


def add_trust(parser, what: str = "the artifact") -> None:
    """``--trusted-key`` (repeatable) of a command that reads an artifact from the other party."""
    parser.add_argument("--trusted-key", action="append", default=None, metavar="PUB", dest="trusted_keys",
                        help=f"require {what} to be signed by this public key (repeat for several); "
                             "default: signatures are checked when present but not required")


def steps(text: str) -> int:
    """argparse type of a step count: an integer >= 1. Zero steps would write the untouched layers
    as a "trained" adapter, which a mistyped count should never ship."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expects a whole number of steps >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 (0 steps would ship the untouched adapter), got {value}")
    return value


def parse_settings(pairs) -> dict:
    """``["rank=8", "ratio=0.5"]`` -> ``{"rank": 8, "ratio": 0.5}`` (values parsed as JSON when possible)."""
    from ..core.errors import OffsiteError

    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise OffsiteError(f"--set expects KEY=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        try:
            out[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            out[key.replace("-", "_")] = value
    return out


def refuse_workflow_arguments(settings: dict, workflow, flags: dict | None = None) -> dict:
    """Refuse ``--set`` keys that name an argument of ``workflow`` itself rather than a method setting.

    The reserved names are read off the workflow's signature (every named parameter; ``**settings``
    is where method settings go), so a new workflow argument is reserved without a hand-kept list.
    ``flags`` maps an argument to the CLI flag that sets it, for the message.
    """
    import inspect

    from ..core.errors import OffsiteError

    own = [name for name, param in inspect.signature(workflow).parameters.items()
           if param.kind not in (param.VAR_KEYWORD, param.VAR_POSITIONAL)]
    for key in settings:
        if key in own:
            flag = (flags or {}).get(key, f"--{key.replace('_', '-')}")
            raise OffsiteError(f"--set {key}=... names an argument of the workflow, not a method setting; "
                               f"pass it as {flag}" if flag else
                               f"--set {key}=... names an argument of the workflow, not a method setting, "
                               "and it has no command-line flag")
    return settings


def print_json(data) -> None:
    print(json.dumps(data, indent=2, default=str))


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


def protocol_from(args, device):
    """The :class:`~offsite.experiments.protocol.Protocol` of report, audit and frontier from their shared flags."""
    from ..experiments.protocol import Protocol

    return Protocol(data_dir=args.data_dir, split=args.split, limit=args.limit, train_limit=args.train_limit,
                    device=device, finetune={"max_steps": args.max_steps, "lr": args.lr, "batch_size": args.batch_size})
