"""Artifact folders (safetensors + manifest): atomic writing, hashing, strict verified loading."""

from .folder import (KINDS, MANIFEST, SCHEMA_VERSION, artifact_id, canonical_json, read_manifest, sha256_file,
                     verify_files, writing_artifact)
from .tensors import (check_against, check_finite, load_into, load_tensors, save_tensors, tensor_index,
                      unique_state_dict)

__all__ = [
    "KINDS", "MANIFEST", "SCHEMA_VERSION", "artifact_id", "canonical_json", "read_manifest", "sha256_file",
    "verify_files", "writing_artifact", "check_against", "check_finite", "load_into", "load_tensors",
    "save_tensors", "tensor_index", "unique_state_dict",
]
