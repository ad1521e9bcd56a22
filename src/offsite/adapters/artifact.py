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

from ..artifacts import (check_against, check_finite, check_trusted, load_tensors, read_manifest, save_tensors,
                         verify_files, writing_artifact)
from ..core.errors import ArtifactError
from ..core.precision import base_dtype, dtype_name, for_saving
from ..families import Family, get_family, get_layers, named_layer_parameters
from ..model.identity import same_base
from .checks import check_full_adapter, check_lora_fields, check_lora_tensors, layer_index, lora_config, split_layers

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
    weights = {k: v for table in m["tensors"].values() for k, v in table.items()}  # every shard
    dtypes = sorted({entry[0] for entry in weights.values() if entry[0].startswith(("float", "bfloat"))})
    return {"base": m["base"], "family": m["family"], "split": m["split"],
            "emulator": {"artifact_id": m["artifact_id"], "method": m["method"], "path": str(emulator.path),
                         "dtype": dtypes[0] if len(dtypes) == 1 else None}}


def save_full_adapter(out, emulator, settings: dict, log: dict, overwrite=False, inputs=(), sign_key=None,
                      dp: dict | None = None) -> Path:
    """Write the (trained) adapter layers of ``emulator.model`` as an ``adapter`` artifact.

    ``inputs`` are the paths the run read (the output may not be, contain or lie in one);
    ``sign_key`` an Ed25519 private key file to sign it with; ``dp`` the DP-SGD guarantee of the
    run (:meth:`offsite.training.dp.DPSGD.record`), written as the manifest's ``dp``.
    """
    to_full = dict(zip(emulator.adapter_positions, emulator.split.adapter))
    params = named_layer_parameters(emulator.model, emulator.family, emulator.adapter_positions)
    names = reindex(params, emulator.family, to_full)
    tensors = {names[k]: v.detach() for k, v in params.items()}
    # Trained as fp32 masters (offsite.core.precision); written in the base dtype, which plug requires.
    tensors = for_saving(tensors, base_dtype(emulator.model))
    with writing_artifact(out, "adapter", overwrite=overwrite, inputs=inputs, sign_key=sign_key) as stage:
        index = save_tensors(tensors, stage.path / ADAPTER_WEIGHTS)
        _write_sidecars(stage, settings, log)
        stage.manifest.update(adapter_record(emulator))
        stage.manifest["tensors"] = {ADAPTER_WEIGHTS: index}
        _record_dp(stage, dp)
    return Path(out)


def save_lora_adapter(out, emulator, peft_model, settings: dict, log: dict, overwrite=False, inputs=(),
                      sign_key=None, dp: dict | None = None) -> Path:
    """Write a PEFT LoRA trained on the emulator as a ``lora`` artifact in full-model numbering (``dp``: as
    :func:`save_full_adapter`)."""
    from peft import get_peft_model_state_dict

    config = peft_model.peft_config["default"]
    to_full = dict(zip(emulator.adapter_positions, emulator.split.adapter))
    state = get_peft_model_state_dict(peft_model)
    names = reindex(state, emulator.family, to_full)
    tensors = {names[k]: v.detach() for k, v in state.items()}
    # LoRA stays in its fp32 masters: PEFT's own format on 16-bit bases, it plugs into the base read in
    # either dtype, and merging casts the delta into the base weights' dtype anyway (offsite.core.precision).
    with writing_artifact(out, "lora", overwrite=overwrite, inputs=inputs, sign_key=sign_key) as stage:
        index = save_tensors(tensors, stage.path / LORA_WEIGHTS)
        data = config.to_dict()
        data["layers_to_transform"] = [to_full[i] for i in config.layers_to_transform]
        data["base_model_name_or_path"] = emulator.manifest["base"]["name_or_path"]
        data["target_modules"] = sorted(data["target_modules"])
        (stage.path / LORA_CONFIG).write_text(json.dumps(data, indent=2, sort_keys=True, default=_jsonable) + "\n")
        _write_sidecars(stage, settings, log)
        stage.manifest.update(adapter_record(emulator))
        stage.manifest["tensors"] = {LORA_WEIGHTS: index}
        stage.manifest["lora"] = {"r": config.r, "alpha": config.lora_alpha, "targets": data["target_modules"]}
        _record_dp(stage, dp)
    return Path(out)


def _record_dp(stage, dp: dict | None) -> None:
    """The DP-SGD guarantee in the manifest, inside the identity (a run without it adds nothing)."""
    if dp is not None:
        stage.manifest["dp"] = dp


def _jsonable(value):
    return sorted(value) if isinstance(value, (set, frozenset)) else str(value)


def _write_sidecars(stage, settings: dict, log: dict) -> None:
    """settings.json and training_log.json; wall times go to the manifest's ``run``, outside the identity."""
    log = dict(log)
    if "seconds" in log:
        stage.run["seconds"] = log.pop("seconds")
    (stage.path / "settings.json").write_text(json.dumps(settings, indent=2, default=str) + "\n")
    (stage.path / "training_log.json").write_text(json.dumps(log, indent=2, default=str) + "\n")


def load_adapter(path, base: dict | None = None, emulator_id: str | None = None, trusted_keys=None):
    """Verify and read an adapter or LoRA artifact.

    Args:
        path: the artifact folder.
        base: if given, the base identity the adapter must belong to.
        emulator_id: if given, the emulator ``artifact_id`` it must have been trained on.
        trusted_keys: public key files; when given, the adapter must be signed by one of them.

    Returns:
        ``(manifest, tensors)`` with tensors keyed in full-model numbering.

    Raises:
        ArtifactError: tampered files, or an adapter for another base model or emulator.
    """
    root = Path(path)
    manifest = read_manifest(root, ("adapter", "lora"))
    check_trusted(manifest, trusted_keys, root)
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
    listed = manifest["tensors"][weights]
    check_against(tensors, {k: v[1] for k, v in listed.items()}, root / weights)
    for name in sorted(tensors):
        # The model checks refuse a wrong dtype anyway; a table that misstates one is itself a forgery.
        if listed[name][0] != dtype_name(tensors[name].dtype):
            raise ArtifactError(f"{root / weights}: tensor '{name}' is {tensors[name].dtype} but the manifest "
                                f"says {listed[name][0]}")
    check_finite(tensors, root / weights)
    return manifest, tensors


def expected_adapter_shapes(model, family: Family, indices) -> dict:
    """``{full name: shape}`` of the adapter layers ``indices`` in ``model``."""
    return {k: tuple(p.shape) for k, p in named_layer_parameters(model, family, indices).items()}


def copy_into_layers(model, family: Family, manifest: dict, tensors: dict, where, positions=None,
                     target_split=None) -> None:
    """Copy an ``adapter`` artifact's tensors into ``model`` after :func:`check_full_adapter`.

    Args:
        tensors: the artifact's tensors, in full-model numbering.
        positions: full-model layer index -> layer index in ``model``; default the identity.
        target_split: ``model``'s split when it is an emulator, None for the full model.
    """
    import torch

    positions = positions or {i: i for i in range(len(get_layers(model, family)))}
    params = check_full_adapter(manifest, tensors, model, family, positions, where, target_split)
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name])  # same shape, same dtype or an exact bf16/fp16 -> fp32 upcast (checked)


def read_lora_config(path) -> dict:
    """The parsed ``adapter_config.json`` of a LoRA artifact (verified by its manifest already)."""
    try:
        return json.loads((Path(path) / LORA_CONFIG).read_text())
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{path}: {LORA_CONFIG} is not readable JSON ({type(exc).__name__})") from None


def check_lora_config(path, manifest: dict) -> dict:
    """Check a LoRA artifact's ``adapter_config.json`` without a model (what ``verify`` can do).

    The whitelist of :func:`~offsite.adapters.checks.check_lora_fields` against the manifest's
    split and family; ``plug`` and ``load_for_eval`` add the checks that need the model.

    Returns:
        The parsed config.

    Raises:
        ArtifactError: a field off the whitelist or not fitting the split.
    """
    return check_lora_fields(read_lora_config(path), manifest, get_family(manifest["family"]), Path(path))


def lora_config_from(manifest_dir, layers: list):
    """The artifact's LoRA config with ``layers_to_transform`` replaced by ``layers`` (no checks)."""
    return lora_config(read_lora_config(manifest_dir), layers)


def wrap_checked_lora(model, family: Family, path, manifest: dict, tensors: dict, positions: dict,
                      target_split=None):
    """Wrap ``model`` with the artifact's LoRA config once the config and tensors pass every check.

    The expected tensors are the LoRA state dict PEFT itself creates on ``model`` with the
    artifact's config, so the artifact must match what PEFT would make, key for key.

    Args:
        positions: full-model layer index -> layer index in ``model``.
        target_split: ``model``'s split when it is an emulator, None for the full model.

    Returns:
        The ``PeftModel`` (LoRA freshly initialised, artifact tensors not yet loaded).

    Raises:
        ArtifactError: the config is off the whitelist or the tensors are not PEFT's; ``model``
            is unwrapped again first.
    """
    from peft import get_peft_model, get_peft_model_state_dict

    where = Path(path)
    layers = split_layers(manifest, model, family, positions, where, target_split)
    stack = get_layers(model, family)
    leaves = {n.rsplit(".", 1)[-1] for n, _ in stack[positions[layers[0]]].named_modules() if n}
    data = check_lora_fields(read_lora_config(path), manifest, family, where, leaves)
    base_dtype = next(model.parameters()).dtype
    try:
        peft_model = get_peft_model(model, lora_config(data, [positions[i] for i in layers]))
    except (TypeError, ValueError) as exc:  # PEFT's own refusal of a config: still hostile input, one error
        raise ArtifactError(f"{where}: PEFT cannot apply this {LORA_CONFIG} to the model ({exc})") from None
    try:
        state = get_peft_model_state_dict(peft_model)
        to_full = {positions[i]: i for i in layers}
        # Keys outside the layers keep their name, so the check reports them rather than reindex.
        inside = reindex([k for k in state if layer_index(k, family) in to_full], family, to_full)
        expected = {inside.get(k, k): v for k, v in state.items()}
        check_lora_tensors(tensors, expected, layers, family, base_dtype, where)
    except BaseException:
        peft_model.unload()  # put the original modules back: the caller's model stays usable
        raise
    return peft_model


def check_lora(model, family: Family, path, manifest: dict, tensors: dict) -> None:
    """Run :func:`wrap_checked_lora`'s checks against the full ``model`` and leave it unwrapped."""
    n = len(get_layers(model, family))
    wrap_checked_lora(model, family, path, manifest, tensors, {i: i for i in range(n)}).unload()


def merge_lora(model, family: Family, path, manifest: dict, tensors: dict, positions: dict, target_split=None):
    """Apply a LoRA artifact to ``model`` after every check and merge it; returns the plain model.

    Args:
        positions: full-model layer index -> layer index in ``model`` (identity for the full model).
        target_split: ``model``'s split when it is an emulator, None for the full model.
    """
    from peft import set_peft_model_state_dict

    peft_model = wrap_checked_lora(model, family, path, manifest, tensors, positions, target_split)
    local = reindex(tensors, family, positions)
    result = set_peft_model_state_dict(peft_model, {local[k]: v for k, v in tensors.items()})
    if getattr(result, "unexpected_keys", None):  # cannot happen after the check; never merge if it does
        raise ArtifactError(f"{path}: LoRA tensors do not fit this model: {result.unexpected_keys[:3]}")
    return peft_model.merge_and_unload()
