"""Ed25519 signatures on artifacts: who made this emulator package, who sent this adapter.

The ``artifact_id`` covers an artifact's whole content (file hashes, tensor table, kind, base,
split, plan), but anyone can recompute it after an edit. A signature ties it to a key: the signed
message is ``b"offsite-artifact\\n" + kind + "\\n" + artifact_id``, and the manifest carries
``signature = {"algorithm": "ed25519", "key_id", "public_key", "value"}`` (base64, ``key_id`` the
first 16 hex digits of the sha256 of the raw public key).

Keys come from ``offsite keygen``: a PKCS#8 PEM private key (mode 0600) and a PEM public key
(``.pub``) to hand to the other party. A reader checks an embedded signature whenever one is
present; given trusted keys (``--trusted-key``) it also requires that one of them made it. Unsigned
artifacts stay allowed when no trusted key is given, and say so. Uses the ``cryptography`` package.
"""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

from ..core.errors import ArtifactError, OffsiteError

ALGORITHM = "ed25519"


def _crypto():
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:  # pragma: no cover - cryptography is a core dependency
        raise OffsiteError("signatures need the 'cryptography' package: pip install cryptography") from None
    return serialization, ed25519


def _raw_public(public) -> bytes:
    serialization, _ = _crypto()
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(public) -> str:
    return hashlib.sha256(_raw_public(public)).hexdigest()[:16]


def keygen(out) -> tuple:
    """Write a new key pair ``OUT.key`` (private, mode 0600) and ``OUT.pub``; returns both paths.

    Raises:
        OffsiteError: either file exists already (a key is never overwritten).
    """
    serialization, ed25519 = _crypto()
    base = Path(out)
    if not str(out).strip() or not base.name or base.name in (".", ".."):
        raise OffsiteError(f"key name {str(out)!r} is empty; give a path prefix such as keys/model-owner")
    parent = next((p for p in base.absolute().parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise OffsiteError(f"cannot write keys under {base.parent}: {parent} is a file, not a folder")
    private_path, public_path = base.with_name(base.name + ".key"), base.with_name(base.name + ".pub")
    for path in (private_path, public_path):
        if path.exists() or path.is_symlink():
            raise OffsiteError(f"{path} exists; offsite never overwrites a key — pick another name")
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    base.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public_path.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                          serialization.PublicFormat.SubjectPublicKeyInfo))
    return private_path, public_path


def _read_pem(path, what: str) -> bytes:
    p = Path(path)
    if not p.is_file():
        raise OffsiteError(f"{what} {p} does not exist or is not a file")
    return p.read_bytes()


def load_private_key(path):
    """An Ed25519 private key from a PEM file (``offsite keygen``'s ``.key``)."""
    serialization, ed25519 = _crypto()
    try:
        key = serialization.load_pem_private_key(_read_pem(path, "signing key"), password=None)
    except (ValueError, TypeError) as exc:
        raise OffsiteError(f"{path} is not an unencrypted PEM private key ({exc}); make one with offsite keygen") \
            from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise OffsiteError(f"{path} is a {type(key).__name__}; offsite signs with Ed25519 keys (offsite keygen)")
    return key


def load_public_key(path):
    """An Ed25519 public key from a PEM file (``.pub``; a private key file gives its public half)."""
    serialization, ed25519 = _crypto()
    data = _read_pem(path, "trusted key")
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        key = load_private_key(path).public_key()
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise OffsiteError(f"{path} is a {type(key).__name__}; offsite verifies Ed25519 keys (offsite keygen)")
    return key


def _message(manifest: dict) -> bytes:
    return f"offsite-artifact\n{manifest['kind']}\n{manifest['artifact_id']}".encode()


def sign_manifest(manifest: dict, private) -> dict:
    """The ``signature`` record for a manifest whose ``artifact_id`` is already set."""
    public = private.public_key()
    return {"algorithm": ALGORITHM, "key_id": key_id(public),
            "public_key": base64.b64encode(_raw_public(public)).decode(),
            "value": base64.b64encode(private.sign(_message(manifest))).decode()}


def check_embedded(manifest: dict, where) -> dict | None:
    """Verify the manifest's signature against its own public key; returns the record or None.

    Raises:
        ArtifactError: the signature record is malformed or does not match the content.
    """
    sig = manifest.get("signature")
    if sig is None:
        return None
    _, ed25519 = _crypto()
    from cryptography.exceptions import InvalidSignature

    if not isinstance(sig, dict) or sig.get("algorithm") != ALGORITHM:
        raise ArtifactError(f"{where}: signature must be an object with algorithm '{ALGORITHM}'")
    try:
        public = ed25519.Ed25519PublicKey.from_public_bytes(base64.b64decode(sig["public_key"], validate=True))
        public.verify(base64.b64decode(sig["value"], validate=True), _message(manifest))
    except (KeyError, TypeError, ValueError, InvalidSignature):
        raise ArtifactError(f"{where}: the signature does not match the artifact's content (tampered, or signed "
                            "as another artifact)") from None
    if sig.get("key_id") != key_id(public):
        raise ArtifactError(f"{where}: signature key_id {sig.get('key_id')!r} does not match its public key")
    return sig


def check_trusted(manifest: dict, trusted, where) -> str:
    """Require a signature by one of ``trusted`` (paths of public keys); ``None`` = no requirement.

    Returns:
        A one-line description: ``signed by <key_id> (trusted)``, ``signed by <key_id> (not checked
        against a trusted key)`` or ``unsigned``.

    Raises:
        ArtifactError: trusted keys were given and none of them signed the artifact.
    """
    sig = check_embedded(manifest, where)
    if not trusted:
        return f"signed by key {sig['key_id']} (no trusted key given)" if sig else "unsigned"
    # Compared on the full raw public key, not the short key_id, which is only a display name.
    keys = {base64.b64encode(_raw_public(load_public_key(path))).decode(): path for path in trusted}
    if sig is None:
        raise ArtifactError(f"{where} is unsigned, but a trusted key was required ({', '.join(map(str, trusted))})")
    if sig["public_key"] not in keys:
        names = ", ".join(key_id(load_public_key(path)) for path in trusted)
        raise ArtifactError(f"{where} is signed by key {sig['key_id']}, which is not a trusted key (trusted: {names})")
    return f"signed by key {sig['key_id']} (trusted: {keys[sig['public_key']]})"
