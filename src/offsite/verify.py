"""Verify any artifact folder: manifest, file hashes, tensor names/shapes/dtypes, finite values."""

from __future__ import annotations

from pathlib import Path

from .artifacts import check_against, check_finite, load_tensors, read_manifest, verify_files
from .errors import ArtifactError


def verify_artifact(path) -> dict:
    """Check an artifact completely; returns a summary, raises :class:`ArtifactError` on any problem."""
    root = Path(path)
    manifest = read_manifest(root)
    verify_files(root, manifest)
    count = 0
    for rel, index in manifest.get("tensors", {}).items():
        tensors = load_tensors(root / rel)
        check_against(tensors, {k: v[1] for k, v in index.items()}, root / rel)
        wrong = [k for k, v in index.items() if str(tensors[k].dtype).replace("torch.", "") != v[0]]
        if wrong:
            raise ArtifactError(f"{root / rel}: tensor '{wrong[0]}' has dtype {tensors[wrong[0]].dtype}, "
                                f"manifest says {index[wrong[0]][0]}")
        check_finite(tensors, root / rel)
        count += len(tensors)
    if manifest["kind"] == "emulator":
        from .package import load_emulator

        load_emulator(root)  # rebuild from the plan and load strictly: shapes must fit the architecture
    return {"kind": manifest["kind"], "files": len(manifest["files"]), "tensors": count}
