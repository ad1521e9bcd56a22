"""Artifact folders (safetensors + manifest): atomic writing, hashing, sharded weights, strict verified loading,
signatures."""

from .folder import guard_output, list_files, overlapping_input, sha256_file, verify_files, writing_artifact
from .manifest import (KINDS, MANIFEST, SCHEMA_VERSION, artifact_id, canonical_json, check_schema, read_manifest,
                       split_run_facts)
from .shards import DEFAULT_MAX_SHARD_SIZE, INDEX, WEIGHTS, check_layout, parse_size, save_sharded, weight_files
from .signing import check_trusted, keygen
from .tensors import (check_against, check_finite, check_table, load_into, load_tensors, save_tensors,
                      tensor_aliases, tensor_index, unique_state_dict)

__all__ = [
    "KINDS", "MANIFEST", "SCHEMA_VERSION", "artifact_id", "canonical_json", "check_schema", "read_manifest", "split_run_facts",
    "guard_output", "list_files", "overlapping_input", "sha256_file", "verify_files", "writing_artifact",
    "check_trusted", "keygen",
    "DEFAULT_MAX_SHARD_SIZE", "INDEX", "WEIGHTS", "check_layout", "parse_size", "save_sharded", "weight_files",
    "check_against", "check_finite", "check_table", "load_into", "load_tensors", "save_tensors", "tensor_aliases",
    "tensor_index", "unique_state_dict",
]
