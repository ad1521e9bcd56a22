"""Workflow: full model + adapter artifact -> plugged model (model owner side).

The output is a stock Hugging Face checkpoint (config, safetensors, tokenizer) that loads with
``AutoModelForCausalLM.from_pretrained`` and no offsite code, plus offsite's manifest. A LoRA
artifact is merged into the weights by default, or, with ``lora_mode="peft"``, exported as a PEFT
adapter folder for ``PeftModel.from_pretrained(full_model, dir)``.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from .adapters import LORA_CONFIG, LORA_WEIGHTS, copy_into_layers, load_adapter, merge_lora
from .artifacts import save_tensors, unique_state_dict, writing_artifact
from .errors import OffsiteError
from .families import get_family
from .identity import model_identity
from .loading import load_model

LORA_MODES = ("merge", "peft")


def plug_into(model, name_or_path: str, adapter) -> tuple:
    """Plug an adapter artifact into an already loaded full model, in memory.

    Returns:
        ``(model, adapter_manifest)``; the model is the same object for full adapters and the
        merged plain model for LoRA.

    Raises:
        ArtifactError: the adapter belongs to another base model, or its tensors do not fit.
    """
    family = get_family(model)
    manifest, tensors = load_adapter(adapter, base=model_identity(model, name_or_path))
    if manifest["kind"] == "adapter":
        copy_into_layers(model, family, tensors, Path(adapter))
    else:
        n = model.config.num_hidden_layers
        model = merge_lora(model, family, adapter, tensors, {i: i for i in range(n)})
    return model, manifest


def plug(model: str, adapter, out, lora_mode: str = "merge", dtype: str = "auto", overwrite: bool = False) -> Path:
    """Plug a fine-tuned adapter into the full model and write the result.

    Args:
        model: the full base model (folder or hub id) the emulator was built from.
        adapter: adapter or LoRA artifact from ``offsite finetune``.
        out: destination folder.
        lora_mode: for LoRA artifacts: ``merge`` (a plain HF checkpoint) or ``peft`` (a PEFT
            adapter folder keyed to the full model).
        dtype: dtype to load the base model in.

    Returns:
        The output folder.
    """
    if lora_mode not in LORA_MODES:
        raise OffsiteError(f"lora_mode {lora_mode!r} unknown; allowed: {', '.join(LORA_MODES)}")
    started = time.time()
    full, tokenizer = load_model(model, dtype=dtype)
    identity = model_identity(full, model)
    settings = {"command": "plug", "model": model, "adapter": str(adapter), "lora_mode": lora_mode, "dtype": dtype}
    record = {"base": identity, "family": full.config.model_type}

    if lora_mode == "peft":
        manifest, _ = load_adapter(adapter, base=identity)
        if manifest["kind"] != "lora":
            raise OffsiteError(f"{adapter} is a full adapter; --lora-mode peft applies to LoRA artifacts only")
        with writing_artifact(out, "peft", overwrite=overwrite) as stage:
            for name in (LORA_CONFIG, LORA_WEIGHTS):
                shutil.copy2(Path(adapter) / name, stage.path / name)
            _finish(stage, record, manifest, settings, started)
        return Path(out)

    plugged, manifest = plug_into(full, model, adapter)
    with writing_artifact(out, "plugged", overwrite=overwrite) as stage:
        plugged.config.architectures = [type(plugged).__name__]
        plugged.config.save_pretrained(stage.path)
        if getattr(plugged, "generation_config", None) is not None:
            plugged.generation_config.save_pretrained(stage.path)
        index = save_tensors(unique_state_dict(plugged), stage.path / "model.safetensors")
        if tokenizer is not None:
            tokenizer.save_pretrained(stage.path)
        stage.manifest["tensors"] = {"model.safetensors": index}
        _finish(stage, record, manifest, settings, started)
    return Path(out)


def _finish(stage, record: dict, adapter_manifest: dict, settings: dict, started: float) -> None:
    stage.manifest.update(record)
    stage.manifest["adapter"] = {"artifact_id": adapter_manifest["artifact_id"], "kind": adapter_manifest["kind"],
                                 "emulator": adapter_manifest["emulator"]}
    settings["seconds"] = round(time.time() - started, 2)
    (stage.path / "settings.json").write_text(json.dumps(settings, indent=2, default=str) + "\n")
