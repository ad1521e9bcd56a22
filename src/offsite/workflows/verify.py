"""Verify any artifact folder: manifest schema and identity, signature, file hashes, tensors.

What is checked, in order: the manifest's schema for its kind and its ``artifact_id`` (so no field
was edited), the embedded signature (and, with trusted keys, that one of them made it), that the
folder holds exactly the listed regular files with their sha256 (no symlinks, no pickles), and that
every weight file holds exactly its tensor table's names, shapes and dtypes with finite values.
Per kind: an emulator is rebuilt from its plan and loaded strictly; an adapter or LoRA may hold
tensors only inside its split's adapter layers, every adapter layer alike.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..adapters.artifact import check_lora_config
from ..artifacts import check_against, check_finite, check_trusted, load_tensors, read_manifest, verify_files
from ..core.errors import ArtifactError
from ..core.precision import dtype_name
from ..emulator.package import load_emulator
from ..families import get_family


def verify_artifact(path, trusted_keys=None) -> dict:
    """Check an artifact completely; returns a summary, raises :class:`ArtifactError` on any problem.

    Args:
        path: the artifact folder.
        trusted_keys: public key files; when given, the artifact must be signed by one of them.

    Returns:
        ``{"kind", "files", "tensors", "signature"}`` (``signature`` a one-line description).
    """
    root = Path(path)
    manifest = read_manifest(root)
    signature = check_trusted(manifest, trusted_keys, root)
    verify_files(root, manifest)
    count = 0
    for rel, index in manifest["tensors"].items():
        tensors = load_tensors(root / rel)
        check_against(tensors, {k: v[1] for k, v in index.items()}, root / rel)
        wrong = [k for k, v in index.items() if dtype_name(tensors[k].dtype) != v[0]]
        if wrong:
            raise ArtifactError(f"{root / rel}: tensor '{wrong[0]}' has dtype {tensors[wrong[0]].dtype}, "
                                f"manifest says {index[wrong[0]][0]}")
        check_finite(tensors, root / rel)
        count += len(tensors)
        if manifest["kind"] in ("adapter", "lora"):
            check_adapter_layers(tensors, manifest, root / rel)
    if manifest["kind"] == "emulator":
        load_emulator(root)  # rebuild from the plan and load strictly: shapes must fit the architecture
    if manifest["kind"] == "lora":
        check_lora_config(root, manifest)
    return {"kind": manifest["kind"], "files": len(manifest["files"]), "tensors": count, "signature": signature}


def check_adapter_layers(tensors: dict, manifest: dict, where) -> None:
    """Adapter tensors must all sit in the split's adapter layers, and every adapter layer alike.

    Without the base model this cannot check shapes against it (``plug`` does); it does catch a
    tensor renamed into a middle layer, a missing layer, and a layer with a missing parameter.
    """
    layers_attr = get_family(manifest["family"]).layers
    pattern = re.compile(r"(?:^|\.)" + re.escape(layers_attr) + r"\.(\d+)\.(.+)$")
    adapter = set(manifest["split"]["adapter"])
    per_layer: dict = {i: set() for i in adapter}
    for name in tensors:
        match = pattern.search(name)
        if not match or int(match.group(1)) not in adapter:
            raise ArtifactError(f"{where}: tensor '{name}' is not inside an adapter layer "
                                f"{sorted(adapter)} of the manifest's split")
        per_layer[int(match.group(1))].add(match.group(2))
    shapes = {frozenset(v) for v in per_layer.values()}
    if len(shapes) != 1 or not next(iter(shapes)):
        empty = sorted(i for i, v in per_layer.items() if not v)
        raise ArtifactError(f"{where}: adapter layers differ in their tensors (layers without any: {empty}); "
                            "an adapter holds every parameter of every adapter layer")
