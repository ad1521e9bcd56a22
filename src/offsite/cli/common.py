"""Argument helpers shared by the subcommands."""

from __future__ import annotations

import json


def add_out(parser, help_text: str = "output folder") -> None:
    """``--out``, ``--overwrite`` and ``--sign-key`` of a command that writes an artifact."""
    parser.add_argument("--out", required=True, help=help_text)
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


def parse_settings(pairs) -> dict:
    """``["rank=8", "ratio=0.5"]`` -> ``{"rank": 8, "ratio": 0.5}`` (values parsed as JSON when possible)."""
    from ..errors import OffsiteError

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


def print_json(data) -> None:
    print(json.dumps(data, indent=2, default=str))
