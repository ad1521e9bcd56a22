"""Reusable calibration results: ScaleOT's stage 1 (importance scores + every middle layer's
harmonizer) and GradOT's GCS terms (per middle matrix, see :mod:`.gcs`).

Layout of a cache folder (no pickle)::

    harmonizers.safetensors   "<full layer index>.<parameter>" -> tensor, one harmonizer per middle layer
    importance.json           key, scores per full layer index, training record and settings

GradOT's folder holds ``gcs_terms.safetensors`` ("attn|<layer>.<role>|<term>" or "mlp|<layer>|<term>")
and ``gcs_terms.json`` (key, shapes, record). The JSON file is written last, so a folder with it is
complete. The key is a sha256 over the
base model's identity (config hash + weight fingerprint), the split, the calibration batches'
token ids and the training settings: a cache answers only the exact question it was made for, and
a folder made for another one is refused rather than silently reused or overwritten.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ..artifacts import canonical_json, check_against, load_tensors, save_tensors, unique_state_dict
from ..core.errors import OffsiteError
from ..model.fingerprint import config_hash, weight_fingerprint

SCORES = "importance.json"
WEIGHTS = "harmonizers.safetensors"


def cache_key(model, split, batches: list, settings: dict, fingerprint: str | None = None) -> str:
    """Identity of a stage-1 run (see the module docstring); ``fingerprint`` of the weights when known
    (a streamed model has no values to hash in memory)."""
    h = hashlib.sha256()
    for ids in batches:
        h.update(ids.to("cpu", torch.int64).contiguous().numpy().tobytes())
    data = [config_hash(model.config), fingerprint or weight_fingerprint(unique_state_dict(model)), split.to_dict(),
            settings, h.hexdigest()]
    return hashlib.sha256(canonical_json(data).encode()).hexdigest()


def load_cache(folder, key: str, harmonizers: dict) -> dict | None:
    """Load a matching cache into ``harmonizers`` (in place); None when the folder has none yet.

    Returns:
        ``{"scores": {full index: float}, "record": dict}``.

    Raises:
        OffsiteError: the folder holds a cache for another model, split, calibration or settings,
            or its tensors do not fit the harmonizers.
    """
    root = Path(folder)
    if not (root / SCORES).is_file():
        return None
    meta = json.loads((root / SCORES).read_text())
    if meta.get("key") != key:
        raise OffsiteError(f"importance cache {root} was made for another base model, split, calibration text or "
                           f"training settings (recorded: {meta.get('settings')}); use another cache_dir or the "
                           "same settings")
    tensors = load_tensors(root / WEIGHTS)
    expected = {f"{i}.{name}": tuple(p.shape) for i, h in harmonizers.items() for name, p in h.state_dict().items()}
    check_against(tensors, expected, root / WEIGHTS)
    with torch.no_grad():
        for i, h in harmonizers.items():
            for name, p in h.state_dict().items():
                p.copy_(tensors[f"{i}.{name}"].to(p.dtype))
    return {"scores": {int(i): float(s) for i, s in meta["scores"].items()}, "record": meta["record"]}


def save_cache(folder, key: str, scores: dict, harmonizers: dict, record: dict, settings: dict) -> Path:
    """Write scores and harmonizers to ``folder`` (created; ``importance.json`` last)."""
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    tensors = {f"{i}.{name}": t for i, h in harmonizers.items() for name, t in h.state_dict().items()}
    save_tensors(tensors, root / WEIGHTS)
    meta = {"key": key, "scores": {str(i): s for i, s in scores.items()}, "record": record, "settings": settings}
    (root / SCORES).write_text(json.dumps(meta, indent=2) + "\n")
    return root


TERMS_META = "gcs_terms.json"
TERMS_WEIGHTS = "gcs_terms.safetensors"


def load_terms(folder, key: str) -> dict | None:
    """GradOT's terms from ``folder`` when they were made for ``key``; None when it has none yet.

    Returns:
        ``{"terms": {"attn": {...}, "mlp": {...}}, "record": dict}``.

    Raises:
        OffsiteError: the folder holds terms for another model, split, calibration or statistics dtype.
    """
    root = Path(folder)
    if not (root / TERMS_META).is_file():
        return None
    meta = json.loads((root / TERMS_META).read_text())
    if meta.get("key") != key:
        raise OffsiteError(f"GCS terms cache {root} was made for another base model, split, calibration text, "
                           "statistics dtype or GCS form (the paper form and first_order need the gradient terms); "
                           "use another cache_dir or the same settings")
    tensors = load_tensors(root / TERMS_WEIGHTS)
    terms = {"attn": {k: {"shape": shape} for k, shape in meta["attn"].items()},
             "mlp": {k: {"of": of} for k, of in meta["mlp"].items()},
             "experts": {k: {"of": of} for k, of in meta.get("experts", {}).items()}}
    for name, t in tensors.items():
        kind, key_, term = name.split("|")
        if key_ not in terms.get(kind, {}):
            raise OffsiteError(f"GCS terms cache {root}: tensor {name!r} has no entry in {TERMS_META}")
        terms[kind][key_][term] = t
    return {"terms": terms, "record": meta["record"]}


def save_terms(folder, key: str, terms: dict, record: dict) -> Path:
    """Write GradOT's terms to ``folder`` (created; the JSON file last)."""
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    tensors = {f"{kind}|{k}|{name}": v for kind in ("attn", "mlp", "experts") for k, entry in terms.get(kind, {}).items()
               for name, v in entry.items() if torch.is_tensor(v)}
    save_tensors(tensors, root / TERMS_WEIGHTS)
    meta = {"key": key, "attn": {k: e["shape"] for k, e in terms["attn"].items()},
            "mlp": {k: e["of"] for k, e in terms["mlp"].items()},
            "experts": {k: e["of"] for k, e in terms.get("experts", {}).items()}, "record": record}
    (root / TERMS_META).write_text(json.dumps(meta, indent=2) + "\n")
    return root
