"""Identity of a base model: which model an emulator, adapter or plugged folder belongs to.

An adapter is bound to the exact base model it was made from. Comparing names is not enough (a
local folder can hold anything), so the identity carries a hash of the architecture config and a
fingerprint of the weights.

The weight fingerprint is a sha256 over *every* weight value: for each tensor in sorted name order,
its name, shape and all its values in a canonical form — floating tensors as float32 (exact for
bf16 and fp16, so the same checkpoint read in bf16 or fp32 is the same base model), integer tensors
as themselves. Changing any single value changes it. Hashing a 7B model reads ~28 GB of fp32
bytes (seconds to a minute), so :func:`model_identity` can cache the result keyed on the weight
files it was loaded from (name, size, inode, mtime and ctime of every file, plus the loaded dtype):
rewriting a file changes its ctime, which user code cannot set back.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from .artifacts import canonical_json, unique_state_dict

FINGERPRINT_VERSION = "all-values-fp32-v1"
_CHUNK = 1 << 24  # elements hashed per step: bounds the fp32 copy of a large matrix to 64 MB
# Config fields that describe how a file was written, not what the model computes.
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "dtype", "torch_dtype", "architectures",
                         "use_cache", "_commit_hash", "_attn_implementation_autoset", "output_attentions",
                         "output_hidden_states", "return_dict"}


def config_hash(config) -> str:
    """sha256 of the config's content, ignoring fields that do not change the computation."""
    data = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    return hashlib.sha256(canonical_json(data).encode()).hexdigest()


def _update(h, t: torch.Tensor) -> None:
    flat = t.detach().reshape(-1)
    for start in range(0, flat.numel(), _CHUNK):
        part = flat[start:start + _CHUNK].to("cpu")
        part = part.to(torch.float32) if part.is_floating_point() else part
        h.update(part.contiguous().view(torch.uint8).numpy().tobytes() if part.dtype == torch.bool
                 else part.contiguous().numpy().tobytes())


def weight_fingerprint(tensors: dict) -> str:
    """Fingerprint of a ``{name: tensor}`` dict over every value (see the module docstring)."""
    h = hashlib.sha256(FINGERPRINT_VERSION.encode())
    for name in sorted(tensors):
        t = tensors[name]
        kind = "float" if t.is_floating_point() else str(t.dtype)
        h.update(f"|{name}|{kind}|{tuple(t.shape)}|".encode())
        _update(h, t)
    return h.hexdigest()


def _cache_dir() -> Path:
    return Path(os.environ.get("OFFSITE_CACHE_DIR") or Path.home() / ".cache" / "offsite") / "fingerprints"


def _files_key(name_or_path: str, dtype) -> str | None:
    """Key of a local model folder's weight files as they are on disk now, or None (hub id, no files)."""
    root = Path(name_or_path)
    if not root.is_dir():
        return None
    stats = []
    for path in sorted(root.iterdir()):
        if path.suffix in (".safetensors", ".bin", ".json") and path.is_file():
            st = path.stat()
            stats.append([path.name, st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns])
    if not any(name.endswith((".safetensors", ".bin")) for name, *_ in stats):
        return None
    data = [FINGERPRINT_VERSION, str(root.resolve()), str(dtype), stats]
    return hashlib.sha256(canonical_json(data).encode()).hexdigest()


def _cached_fingerprint(model, name_or_path: str) -> str:
    key = _files_key(name_or_path, model.dtype)
    entry = _cache_dir() / f"{key}.json" if key else None
    if entry is not None and entry.is_file():
        try:
            return json.loads(entry.read_text())["weight_fingerprint"]
        except (ValueError, KeyError, OSError):
            pass  # a damaged cache entry is recomputed
    value = weight_fingerprint(unique_state_dict(model))
    if entry is not None:
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            tmp = entry.with_suffix(f".tmp-{os.getpid()}")
            tmp.write_text(json.dumps({"weight_fingerprint": value, "model": str(name_or_path)}))
            os.replace(tmp, entry)
        except OSError:
            pass  # a read-only home only costs the recomputation next time
    return value


def model_identity(model: torch.nn.Module, name_or_path: str, loaded_from_files: bool = False) -> dict:
    """The ``base`` record stored in every manifest.

    Args:
        model: the base model.
        name_or_path: what it was loaded from.
        loaded_from_files: ``model`` is exactly what ``name_or_path``'s files hold (just loaded,
            unmodified): the fingerprint may then come from the cache.
    """
    cfg = model.config
    fingerprint = (_cached_fingerprint(model, name_or_path) if loaded_from_files
                   else weight_fingerprint(unique_state_dict(model)))
    return {
        "name_or_path": str(name_or_path),
        "model_type": cfg.model_type,
        "num_layers": cfg.num_hidden_layers,
        "config_hash": config_hash(cfg),
        "weight_fingerprint": fingerprint,
    }


def same_base(a: dict, b: dict) -> bool:
    """True when two ``base`` records name the same architecture and the same weights."""
    return all(a.get(k) == b.get(k) for k in ("model_type", "num_layers", "config_hash", "weight_fingerprint"))
