"""Plug an adapter artifact into a loaded full model, in memory (the model owner's last step).

Used by ``offsite plug`` (which then writes the plugged checkpoint) and by evaluation, which scores
the plugged model without writing it.
"""

from __future__ import annotations

from pathlib import Path

from ..families import get_family, get_layers
from ..model.identity import model_identity
from .artifact import copy_into_layers, load_adapter, merge_lora


def plug_into(model, name_or_path: str, adapter, trusted_keys=None, identity: dict | None = None) -> tuple:
    """Plug an adapter artifact into an already loaded full model, in memory.

    Args:
        model: the full base model.
        name_or_path: what it was loaded from.
        adapter: adapter or LoRA artifact folder.
        trusted_keys: public key files; when given, the adapter must be signed by one of them.
        identity: the model's ``base`` record when already computed (it hashes every weight).

    Returns:
        ``(model, adapter_manifest)``; the model is the same object for full adapters and the
        merged plain model for LoRA.

    Raises:
        ArtifactError: the adapter belongs to another base model, or it is not exactly its split's
            adapter layers (or PEFT's LoRA on them) in this model's shapes and dtypes; see
            :mod:`offsite.adapters.checks`. Nothing in the model is changed then.
    """
    family = get_family(model)
    identity = identity or model_identity(model, name_or_path)
    manifest, tensors = load_adapter(adapter, base=identity, trusted_keys=trusted_keys)
    if manifest["kind"] == "adapter":
        copy_into_layers(model, family, manifest, tensors, Path(adapter))
    else:
        n = len(get_layers(model, family))
        model = merge_lora(model, family, adapter, manifest, tensors, {i: i for i in range(n)})
    return model, manifest
