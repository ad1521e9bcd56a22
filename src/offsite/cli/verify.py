"""``offsite verify DIR``: check hashes, tensor names/shapes and values; non-zero exit on any problem."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("verify", help="verify an artifact folder (hashes, shapes, finite values)")
    p.add_argument("path", help="artifact folder")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..verify import verify_artifact

    summary = verify_artifact(args.path)
    print(f"OK {summary['kind']} {args.path}: {summary['files']} files, {summary['tensors']} tensors verified")
    return 0
