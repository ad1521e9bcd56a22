"""Artifact folders: files + ``manifest.json``, written atomically, verified on every load.

Every output of offsite (emulator package, adapter, LoRA adapter, plugged model) is a folder. It is
assembled in a hidden sibling temp folder; ``manifest.json`` (with the sha256 of every other file)
is written last, and only then is the folder renamed into place. So a folder with a manifest is
complete, and a failed run leaves nothing behind at the destination.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path

from .. import __version__
from ..errors import ArtifactError, OffsiteError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
KINDS = ("emulator", "adapter", "lora", "plugged", "peft")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def canonical_json(data) -> str:
    """Deterministic JSON (sorted keys, no spaces) used for hashing plain data."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)


def _list_files(root: Path) -> list:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p != root / MANIFEST)


def artifact_id(files: dict) -> str:
    """Identity of an artifact's content: sha256 over its sorted ``{file: sha256}`` table."""
    return hashlib.sha256(canonical_json(files).encode()).hexdigest()


@contextlib.contextmanager
def writing_artifact(out_dir, kind: str, overwrite: bool = False):
    """Yield a temp folder to fill; on success hash it, write the manifest last, move it into place.

    The caller fills ``staging.path`` with files and ``staging.manifest`` (a dict) with metadata.
    On any exception the temp folder is removed and ``out_dir`` is left untouched.

    Raises:
        OffsiteError: ``out_dir`` exists and is not empty, and ``overwrite`` is False.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown artifact kind {kind!r}")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise OffsiteError(f"output folder {out} already exists and is not empty; pass --overwrite or pick another")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    staging = _Staging(tmp)
    try:
        yield staging
        files = {rel: sha256_file(tmp / rel) for rel in _list_files(tmp)}
        manifest = {
            "kind": kind,
            "schema_version": SCHEMA_VERSION,
            "offsite_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **staging.manifest,
            "files": files,
            "artifact_id": artifact_id(files),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False, default=str) + "\n")
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


class _Staging:
    def __init__(self, path: Path):
        self.path = path
        self.manifest: dict = {}


def read_manifest(path, kind=None) -> dict:
    """Read and sanity-check ``manifest.json`` of an artifact folder (no hashing; see :func:`verify_files`).

    Args:
        path: the artifact folder.
        kind: expected kind or tuple of kinds; ``None`` accepts any.
    """
    root = Path(path)
    if not root.is_dir():
        raise ArtifactError(f"{root} is not a folder; expected an offsite artifact folder with {MANIFEST}")
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise ArtifactError(f"{root} has no {MANIFEST}: it is not an offsite artifact, or it was never completed")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{mpath} is not valid JSON ({exc})") from None
    for key in ("kind", "schema_version", "files"):
        if key not in manifest:
            raise ArtifactError(f"{mpath} lacks the required field '{key}'")
    if manifest["schema_version"] != SCHEMA_VERSION:
        raise ArtifactError(
            f"{root} has manifest schema {manifest['schema_version']}; this offsite ({__version__}) reads schema "
            f"{SCHEMA_VERSION}"
        )
    kinds = (kind,) if isinstance(kind, str) else kind
    if kinds and manifest["kind"] not in kinds:
        raise ArtifactError(f"{root} is a '{manifest['kind']}' artifact; expected {' or '.join(kinds)}")
    if artifact_id(manifest["files"]) != manifest.get("artifact_id"):
        raise ArtifactError(f"{mpath}: artifact_id does not match its file table (manifest edited)")
    return manifest


def verify_files(path, manifest: dict) -> None:
    """Check that the folder holds exactly the manifest's files with the recorded sha256.

    Raises:
        ArtifactError: a file is missing, unlisted, or its content changed.
    """
    root = Path(path)
    present = set(_list_files(root))
    listed = set(manifest["files"])
    if listed - present:
        raise ArtifactError(f"{root}: files listed in the manifest are missing: {sorted(listed - present)}")
    if present - listed:
        raise ArtifactError(f"{root}: files not listed in the manifest are present: {sorted(present - listed)}")
    for rel, digest in manifest["files"].items():
        actual = sha256_file(root / rel)
        if actual != digest:
            raise ArtifactError(f"{root / rel}: sha256 {actual[:12]}… does not match the manifest ({digest[:12]}…); "
                                "the file was modified or corrupted")
