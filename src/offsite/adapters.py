"""Adapter artifacts: what the data owner sends back, indexed in *full-model* layer numbers.

Two kinds:

* ``adapter`` — the whole adapter layers (``adapter.safetensors``), keyed by the full model's
  parameter names, e.g. ``model.layers.11.mlp.up_proj.weight`` for the last layer of a 12-layer
  Llama even though it sat at position 5 of the emulator. Plug-in is then a by-name copy.
* ``lora`` — a PEFT LoRA on the adapter layers, written in PEFT's own format
  (``adapter_config.json`` + ``adapter_model.safetensors``) with keys and ``layers_to_transform``
  re-indexed to the full model and ``base_model_name_or_path`` set to the base model, so
  ``PeftModel.from_pretrained(full_model, dir)`` works without offsite.

Both manifests carry the base identity and the emulator's ``artifact_id``: an adapter is refused by
any other emulator and by any other base model.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .artifacts import (check_against, check_finite, load_tensors, read_manifest, save_tensors, verify_files,
                        writing_artifact)
from .errors import ArtifactError
from .families import Family, named_layer_parameters
from .identity import same_base

ADAPTER_WEIGHTS = "adapter.safetensors"
LORA_WEIGHTS = "adapter_model.safetensors"
LORA_CONFIG = "adapter_config.json"


def reindex(names, family: Family, mapping: dict) -> dict:
    """Rename layer indices in parameter names: ``{old_name: new_name}``.

    Args:
        names: parameter names containing ``<family.layers>.<i>.`` (any prefix, e.g. PEFT's
            ``base_model.model.``).
        mapping: old layer index -> new layer index.
    """
    pattern = re.compile(r"(^|\.)" + re.escape(family.layers) + r"\.(\d+)\.")
    out = {}
    for name in names:
        match = pattern.search(name)
        if not match or int(match.group(2)) not in mapping:
            raise ArtifactError(f"parameter '{name}' is not inside a layer of {sorted(mapping)}")
        new = f"{match.group(1)}{family.layers}.{mapping[int(match.group(2))]}."
        out[name] = name[: match.start()] + new + name[match.end():]
    return out


def adapter_record(emulator) -> dict:
    """Manifest fields binding an adapter to its emulator and base model."""
    m = emulator.manifest
    return {"base": m["base"], "family": m["family"], "split": m["split"],
            "emulator": {"artifact_id": m["artifact_id"], "method": m["method"], "path": str(emulator.path)}}


def save_full_adapter(out, emulator, settings: dict, log: dict, overwrite=False) -> Path:
    """Write the (trained) adapter layers of ``emulator.model`` as an ``adapter`` artifact."""
    to_full = dict(zip(emulator.adapter_positions, emulator.split.adapter))
    params = named_layer_parameters(emulator.model, emulator.family, emulator.adapter_positions)
    names = reindex(params, emulator.family, to_full)
    tensors = {names[k]: v.detach() for k, v in params.items()}
    with writing_artifact(out, "adapter", overwrite=overwrite) as stage:
        index = save_tensors(tensors, stage.path / ADAPTER_WEIGHTS)
        _write_sidecars(stage.path, settings, log)
        stage.manifest.update(adapter_record(emulator))
        stage.manifest["tensors"] = {ADAPTER_WEIGHTS: index}
    return Path(out)


def save_lora_adapter(out, emulator, peft_model, settings: dict, log: dict, overwrite=False) -> Path:
    """Write a PEFT LoRA trained on the emulator as a ``lora`` artifact in full-model numbering."""
    from peft import get_peft_model_state_dict

    config = peft_model.peft_config["default"]
    to_full = dict(zip(emulator.adapter_positions, emulator.split.adapter))
    state = get_peft_model_state_dict(peft_model)
    names = reindex(state, emulator.family, to_full)
    tensors = {names[k]: v.detach() for k, v in state.items()}
    with writing_artifact(out, "lora", overwrite=overwrite) as stage:
        index = save_tensors(tensors, stage.path / LORA_WEIGHTS)
        data = config.to_dict()
        data["layers_to_transform"] = [to_full[i] for i in config.layers_to_transform]
        data["base_model_name_or_path"] = emulator.manifest["base"]["name_or_path"]
        data["target_modules"] = sorted(data["target_modules"])
        (stage.path / LORA_CONFIG).write_text(json.dumps(data, indent=2, sort_keys=True, default=_jsonable) + "\n")
        _write_sidecars(stage.path, settings, log)
        stage.manifest.update(adapter_record(emulator))
        stage.manifest["tensors"] = {LORA_WEIGHTS: index}
        stage.manifest["lora"] = {"r": config.r, "alpha": config.lora_alpha, "targets": data["target_modules"]}
    return Path(out)


def _jsonable(value):
    return sorted(value) if isinstance(value, (set, frozenset)) else str(value)


def _write_sidecars(path: Path, settings: dict, log: dict) -> None:
    (path / "settings.json").write_text(json.dumps(settings, indent=2, default=str) + "\n")
    (path / "training_log.json").write_text(json.dumps(log, indent=2, default=str) + "\n")


def load_adapter(path, base: dict | None = None, emulator_id: str | None = None):
    """Verify and read an adapter or LoRA artifact.

    Args:
        path: the artifact folder.
        base: if given, the base identity the adapter must belong to.
        emulator_id: if given, the emulator ``artifact_id`` it must have been trained on.

    Returns:
        ``(manifest, tensors)`` with tensors keyed in full-model numbering.

    Raises:
        ArtifactError: tampered files, or an adapter for another base model or emulator.
    """
    root = Path(path)
    manifest = read_manifest(root, ("adapter", "lora"))
    verify_files(root, manifest)
    if base is not None and not same_base(manifest["base"], base):
        raise ArtifactError(
            f"{root} was trained for base model '{manifest['base']['name_or_path']}' "
            f"(config {manifest['base']['config_hash'][:12]}, weights {manifest['base']['weight_fingerprint'][:12]}); "
            f"the model given is '{base['name_or_path']}' (config {base['config_hash'][:12]}, "
            f"weights {base['weight_fingerprint'][:12]}) — plug it only into the model its emulator was built from"
        )
    trained_on = manifest["emulator"]["artifact_id"]
    if emulator_id is not None and trained_on != emulator_id:
        raise ArtifactError(f"{root} was trained on emulator {trained_on[:16]}, not on this emulator "
                            f"({emulator_id[:16]}); use the emulator package it was trained with")
    weights = ADAPTER_WEIGHTS if manifest["kind"] == "adapter" else LORA_WEIGHTS
    tensors = load_tensors(root / weights)
    check_against(tensors, {k: v[1] for k, v in manifest["tensors"][weights].items()}, root / weights)
    check_finite(tensors, root / weights)
    return manifest, tensors


def expected_adapter_shapes(model, family: Family, indices) -> dict:
    """``{full name: shape}`` of the adapter layers ``indices`` in ``model``."""
    return {k: tuple(p.shape) for k, p in named_layer_parameters(model, family, indices).items()}


def copy_into_layers(model, family: Family, tensors: dict, where) -> None:
    """Copy full-adapter tensors (already in ``model``'s numbering) into its layers, strictly."""
    import torch

    indices = sorted({int(re.search(re.escape(family.layers) + r"\.(\d+)\.", k).group(1)) for k in tensors})
    params = named_layer_parameters(model, family, indices)
    check_against(tensors, {k: tuple(p.shape) for k, p in params.items()}, where)
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name].to(p.dtype))


def lora_config_from(manifest_dir, layers: list):
    """The artifact's LoRA config with ``layers_to_transform`` replaced by ``layers``."""
    from peft import LoraConfig

    data = json.loads((Path(manifest_dir) / LORA_CONFIG).read_text())
    data["layers_to_transform"] = list(layers)
    known = set(LoraConfig.__dataclass_fields__)
    return LoraConfig(**{k: v for k, v in data.items() if k in known and k not in ("peft_type", "task_type")},
                      task_type=data.get("task_type"))


def merge_lora(model, family: Family, path, tensors: dict, positions: dict):
    """Apply a LoRA artifact to ``model`` and merge it; returns the plain (merged) model.

    Args:
        positions: full-model layer index -> layer index in ``model`` (identity for the full model).
    """
    from peft import get_peft_model, set_peft_model_state_dict

    config_layers = json.loads((Path(path) / LORA_CONFIG).read_text())["layers_to_transform"]
    if sorted(set(config_layers) - set(positions)):
        raise ArtifactError(f"{path}: LoRA targets layers {config_layers}, not all of which exist here")
    peft_model = get_peft_model(model, lora_config_from(path, [positions[i] for i in config_layers]))
    local = reindex(tensors, family, positions)
    renamed = {local[k]: v for k, v in tensors.items()}
    result = set_peft_model_state_dict(peft_model, renamed)
    if getattr(result, "unexpected_keys", None):
        raise ArtifactError(f"{path}: LoRA tensors do not fit this model: {result.unexpected_keys[:3]}")
    lora_params = {k for k, _ in peft_model.named_parameters() if "lora_" in k}
    if len(lora_params) != len(tensors):
        raise ArtifactError(f"{path}: {len(tensors)} LoRA tensors for {len(lora_params)} LoRA parameters")
    return peft_model.merge_and_unload()
