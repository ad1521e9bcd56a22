"""``offsite verify DIR``: check schema, signature, hashes, tensor names/shapes and values; exit 2 on any problem."""

from __future__ import annotations


def add_parser(sub) -> None:
    from .common import add_trust

    p = sub.add_parser("verify", help="verify an artifact folder (schema, signature, hashes, shapes, finite values)")
    p.add_argument("path", help="artifact folder")
    add_trust(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..workflows.verify import verify_artifact

    summary = verify_artifact(args.path, trusted_keys=args.trusted_keys)
    print(f"OK {summary['kind']} {args.path}: {summary['files']} files, {summary['tensors']} tensors verified; "
          f"{summary['signature']}")
    return 0
