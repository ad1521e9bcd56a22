"""Argument helpers shared by the subcommands."""

from __future__ import annotations

import json


def add_out(parser, help_text: str = "output folder") -> None:
    parser.add_argument("--out", required=True, help=help_text)
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it already exists")


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
