"""Weight fingerprints and their cache: the primitives of a base model's identity (:mod:`.identity`).

The weight fingerprint is a sha256 over *every* weight value: for each tensor in sorted name order,
its name, shape and all its values in a canonical form — floating tensors as float32 (exact for
bf16 and fp16), integer tensors as themselves. Changing any single value changes it. Results are
cached keyed on the weight files' state (see :mod:`.identity` for why that is safe).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from ..artifacts import canonical_json
from ..core.errors import OffsiteError

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


def _entry(h, name: str, t: torch.Tensor) -> None:
    kind = "float" if t.is_floating_point() else str(t.dtype)
    h.update(f"|{name}|{kind}|{tuple(t.shape)}|".encode())
    _update(h, t)


def weight_fingerprint(tensors: dict) -> str:
    """Fingerprint of a ``{name: tensor}`` dict over every value (see the module docstring)."""
    h = hashlib.sha256(FINGERPRINT_VERSION.encode())
    for name in sorted(tensors):
        _entry(h, name, tensors[name])
    return h.hexdigest()


def _cache_dir() -> Path:
    home = os.environ.get("OFFSITE_CACHE_DIR") or os.environ.get("OFFSITE_HOME") or Path.home() / ".cache" / "offsite"
    return Path(home).expanduser() / "fingerprints"


def weight_files(name_or_path: str) -> list:
    """The safetensors files of a local model folder or of a hub id in the local cache (else [])."""
    root = Path(name_or_path)
    if not root.is_dir():
        try:
            from huggingface_hub import snapshot_download

            root = Path(snapshot_download(str(name_or_path), local_files_only=True,
                                          allow_patterns=["*.safetensors", "*.json"]))
        except Exception:  # not cached, offline, not a repo id: the in-memory fallback applies
            return []
    return sorted(p for p in root.glob("*.safetensors") if p.is_file())


def files_fingerprint(files) -> str:
    """:func:`weight_fingerprint` of the tensors stored in ``files``, read one tensor at a time.

    Each tensor is read through a handle opened for it alone: a handle maps its whole file, and every
    page read through a long-lived one stays resident until it closes, so hashing a checkpoint larger
    than memory would otherwise hold all of it.
    """
    from safetensors import safe_open

    where = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as handle:
                names = list(handle.keys())
        except Exception as exc:  # safetensors raises its own types for broken files
            raise OffsiteError(f"{path}: not a readable safetensors file ({exc})") from None
        for name in names:
            if name in where:
                raise OffsiteError(f"tensor '{name}' is stored twice ({where[name].name}, {path.name})")
            where[name] = path
    h = hashlib.sha256(FINGERPRINT_VERSION.encode())
    for name in sorted(where):
        with safe_open(str(where[name]), framework="pt") as handle:
            _entry(h, name, handle.get_tensor(name))
    return h.hexdigest()


def _files_key(files) -> str:
    stats = []
    for path in files:
        st = path.stat()
        stats.append([str(path.resolve()), st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns])
    return hashlib.sha256(canonical_json([FINGERPRINT_VERSION, stats]).encode()).hexdigest()


def cached_fingerprint(files) -> dict | None:
    """The cache entry of these files in their present state (``{"weight_fingerprint": ...}``), or None."""
    entry = _cache_dir() / f"{_files_key(files)}.json"
    if entry.is_file():
        try:
            record = json.loads(entry.read_text())
            if isinstance(record.get("weight_fingerprint"), str):
                return record
        except (ValueError, OSError, AttributeError):
            pass  # a damaged cache entry is recomputed
    return None


def cache_fingerprint(files, record: dict) -> None:
    """Store ``record`` (at least ``weight_fingerprint``) as the cache entry of these files' present state."""
    entry = _cache_dir() / f"{_files_key(files)}.json"
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps({**record, "files": [str(f) for f in files]}))
        os.replace(tmp, entry)
    except OSError:
        pass  # a read-only home only costs the recomputation next time


def cached_files_fingerprint(files) -> str:
    """:func:`files_fingerprint`, cached per weight-file state (see the module docstring)."""
    record = cached_fingerprint(files)
    if record is not None:
        return record["weight_fingerprint"]
    value = files_fingerprint(files)
    cache_fingerprint(files, {"weight_fingerprint": value})
    return value
