"""Load whatever ``offsite eval`` is pointed at: a model, an emulator package, or either + adapter."""

from __future__ import annotations

from pathlib import Path

from ..adapters.artifact import copy_into_layers, load_adapter, merge_lora
from ..adapters.plugging import plug_into
from ..artifacts import MANIFEST, check_trusted, read_manifest, verify_files
from ..core.device import resolve_device
from ..core.errors import OffsiteError
from ..emulator.package import load_emulator
from ..model.gguf_input import refuse_stream
from ..model.loading import load_config, load_model
from ..model.offload import claimed_adapter_layers, load_offloaded


def load_for_eval(model: str, adapter: str | None = None, dtype: str = "auto", trusted_keys=None, device="auto",
                  stream: bool = False):
    """Load a model for scoring.

    Args:
        model: an HF folder or hub id (base or plugged model), or an emulator package folder.
        adapter: optional adapter/LoRA artifact. On an emulator package it gives "emulator FT" (it
            must have been trained on that emulator); on a full model it gives "plug-in" in memory.
        dtype: dtype for HF models.
        trusted_keys: public key files; when given, every artifact read must be signed by one.
        device: where the model is put before any adapter is applied (``"auto"``: CUDA when
            present; see :mod:`offsite.core.device`), so adapters are copied or merged there.
        stream: a full model or plugged folder keeps its decoder layers on disk, each read while it
            runs (:mod:`offsite.model.offload`); a plug-in's adapter layers are loaded and stay. Emulator
            packages always load in memory.

    Returns:
        ``(model, tokenizer, info)`` where ``info`` says what was loaded (kind, paths, layer map).
    """
    where = resolve_device(device)
    root = Path(model)
    kind = read_manifest(root)["kind"] if (root / MANIFEST).is_file() else "model"
    if kind == "model" and trusted_keys and adapter is None:
        # Deleting manifest.json must not turn a required signature into no check at all.
        raise OffsiteError(f"{model} is not an offsite artifact (no {MANIFEST}), so it carries no signature; "
                           "--trusted-key accepts only signed emulator packages or plugged folders here")
    if kind == "emulator" and stream:
        raise OffsiteError(f"{model} is an emulator package: --stream applies to full models and plugged folders "
                           "(an emulator loads in memory); drop --stream")
    if kind == "emulator":
        emu = load_emulator(root, device=where, trusted_keys=trusted_keys)
        info = {"kind": "emulator", "path": str(root), "layers": emu.layer_map, "adapter": adapter}
        if adapter is None:
            return emu.model, emu.tokenizer, info
        manifest, tensors = load_adapter(adapter, base=emu.manifest["base"], emulator_id=emu.artifact_id,
                                         trusted_keys=trusted_keys)
        to_emulator = dict(zip(emu.split.adapter, emu.adapter_positions))
        # Checked against the emulator's own split and layers, as plug checks against the full model.
        if manifest["kind"] == "adapter":
            copy_into_layers(emu.model, emu.family, manifest, tensors, Path(adapter), to_emulator, emu.split)
            return emu.model, emu.tokenizer, {**info, "kind": "emulator+adapter"}
        merged = merge_lora(emu.model, emu.family, adapter, manifest, tensors, to_emulator, emu.split)
        return merged.eval(), emu.tokenizer, {**info, "kind": "emulator+lora"}
    if kind not in ("model", "plugged"):
        raise OffsiteError(f"{model} is a '{kind}' artifact; eval takes a model folder, hub id, plugged folder "
                           "or emulator package (pass adapters with --adapter)")
    if kind == "plugged":
        plugged = read_manifest(root)
        check_trusted(plugged, trusted_keys, root)
        verify_files(root, plugged)
    if stream:
        refuse_stream(model)
        keep = [] if adapter is None else claimed_adapter_layers(adapter, load_config(model).num_hidden_layers)
        full, tokenizer = load_offloaded(model, dtype=dtype, device=where, keep=keep)
    else:
        # An untouched full model or a plugged folder is scored as lm-eval would score any causal LM;
        # only plugging an adapter in needs the architecture's family.
        full, tokenizer = load_model(model, dtype=dtype, device=where, any_architecture=adapter is None)
    info = {"kind": kind, "path": str(model), "adapter": adapter, **({"stream": True} if stream else {})}
    if adapter is not None:
        full, _ = plug_into(full, model, adapter, trusted_keys=trusted_keys)
        info["kind"] = "plug-in"
    return full.eval(), tokenizer, info
