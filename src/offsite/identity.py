"""Identity of a base model: which model an emulator, adapter or plugged folder belongs to.

An adapter is bound to the exact base model it was made from. Comparing names is not enough (a
local folder can hold anything), so the identity carries a hash of the architecture config and a
fingerprint of the weights.

The weight fingerprint hashes, for every tensor in sorted order, its name, dtype, shape and a fixed
strided sample of at most 4096 values. It is cheap on a 7B model (it reads a few MB, not 14 GB)
and changes whenever a tensor is retrained, re-quantised, or swapped. It is not a cryptographic
commitment to every byte; the artifacts' own sha256 tables do that for the files that travel.
"""

from __future__ import annotations

import hashlib

import torch

from .artifacts import canonical_json, unique_state_dict

FINGERPRINT_SAMPLES = 4096
# Config fields that describe how a file was written, not what the model computes.
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "dtype", "torch_dtype", "architectures",
                         "use_cache", "_commit_hash", "_attn_implementation_autoset", "output_attentions",
                         "output_hidden_states", "return_dict"}


def config_hash(config) -> str:
    """sha256 of the config's content, ignoring fields that do not change the computation."""
    data = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    return hashlib.sha256(canonical_json(data).encode()).hexdigest()


def _sample(t: torch.Tensor) -> bytes:
    flat = t.detach().reshape(-1)
    step = max(1, flat.numel() // FINGERPRINT_SAMPLES)
    sample = flat[::step][:FINGERPRINT_SAMPLES].to("cpu", torch.float32).contiguous()
    return sample.numpy().tobytes()


def weight_fingerprint(tensors: dict) -> str:
    """Fingerprint of a ``{name: tensor}`` dict (see the module docstring)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}|{str(t.dtype)}|{tuple(t.shape)}|".encode())
        h.update(_sample(t))
    return h.hexdigest()


def model_identity(model: torch.nn.Module, name_or_path: str) -> dict:
    """The ``base`` record stored in every manifest."""
    cfg = model.config
    return {
        "name_or_path": str(name_or_path),
        "model_type": cfg.model_type,
        "num_layers": cfg.num_hidden_layers,
        "config_hash": config_hash(cfg),
        "weight_fingerprint": weight_fingerprint(unique_state_dict(model)),
    }


def same_base(a: dict, b: dict) -> bool:
    """True when two ``base`` records name the same architecture and the same weights."""
    return all(a.get(k) == b.get(k) for k in ("model_type", "num_layers", "config_hash", "weight_fingerprint"))
