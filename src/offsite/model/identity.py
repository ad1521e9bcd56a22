"""Identity of a base model: which model an emulator, adapter or plugged folder belongs to.

An adapter is bound to the exact base model it was made from. Comparing names is not enough (a
local folder can hold anything), so the identity carries a hash of the architecture config and a
fingerprint of the weights.

The weight fingerprint is a sha256 over *every* weight value: for each tensor in sorted name order,
its name, shape and all its values in a canonical form — floating tensors as float32 (exact for
bf16 and fp16), integer tensors as themselves. Changing any single value changes it.

It is taken from the checkpoint's **files** whenever the model comes from safetensors files (a local
folder, or a hub id already in the local cache), not from the model in memory: the same checkpoint
loaded in bf16 or in fp32 (even a lossy ``--dtype bfloat16`` of an fp32 checkpoint) is then the same
base model, and what is named is what is on disk. Without safetensors files (``.bin`` checkpoints)
it falls back to the model in memory, in the same canonical form. Hashing a 7B checkpoint reads it
once (~14 GB for bf16), so the result is cached keyed on the weight files (path, name, size, inode,
mtime, ctime of every file): rewriting a file changes its ctime, which user code cannot set back.
The cache lives in ``$OFFSITE_CACHE_DIR`` (else ``$OFFSITE_HOME``, else ``~/.cache/offsite``).

A ``.gguf`` file is fingerprinted over its dequantised fp32 values (:mod:`offsite.model.gguf_input`), the
same fingerprint as its fp32 conversion to a folder, and its record adds the file's ``source``.
"""

from __future__ import annotations

import torch

from ..artifacts import unique_state_dict
from .fingerprint import cached_files_fingerprint, config_hash, weight_files, weight_fingerprint
from .gguf_input import gguf_identity, is_gguf


def model_identity(model: torch.nn.Module, name_or_path: str) -> dict:
    """The ``base`` record stored in every manifest.

    Args:
        model: the base model as loaded from ``name_or_path`` (its config is hashed; its weights
            only when ``name_or_path`` has no safetensors files).
        name_or_path: the folder or hub id it was loaded from, or a ``.gguf`` file (then the record
            also holds ``source``: the file's sha256 and quantization, see
            :func:`offsite.model.gguf_input.gguf_source`).
    """
    cfg = model.config
    source = None
    if is_gguf(name_or_path):  # fingerprinted over the dequantised fp32 values, whatever dtype is loaded
        fingerprint, source = gguf_identity(name_or_path)
    else:
        files = weight_files(name_or_path)
        fingerprint = cached_files_fingerprint(files) if files else weight_fingerprint(unique_state_dict(model))
    return {
        "name_or_path": str(name_or_path),
        "model_type": cfg.model_type,
        "num_layers": cfg.num_hidden_layers,
        "config_hash": config_hash(cfg),
        "weight_fingerprint": fingerprint,
        **({"source": source} if source else {}),
    }


def same_base(a: dict, b: dict) -> bool:
    """True when two ``base`` records name the same architecture and the same weights."""
    return all(a.get(k) == b.get(k) for k in ("model_type", "num_layers", "config_hash", "weight_fingerprint"))
