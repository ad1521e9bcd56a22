"""``offsite keygen NAME``: an Ed25519 key pair for signing artifacts (NAME.key private, NAME.pub public)."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("keygen", help="make an Ed25519 key pair to sign artifacts (NAME.key, NAME.pub)")
    p.add_argument("name", help="path prefix of the key files, e.g. keys/model-owner")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..artifacts import keygen

    private, public = keygen(args.name)
    print(f"private key {private} (keep it; pass it as --sign-key)")
    print(f"public key  {public} (give it to the other party; they pass it as --trusted-key)")
    return 0
