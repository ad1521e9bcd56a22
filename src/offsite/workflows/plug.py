"""Workflow: full model + adapter artifact -> plugged model (model owner side).

The output is a stock Hugging Face checkpoint (config, safetensors, tokenizer) that loads with
``AutoModelForCausalLM.from_pretrained`` and no offsite code, plus offsite's manifest. Weights past
``max_shard_size`` are written shard by shard in Hugging Face's sharded layout (see
:mod:`offsite.artifacts.shards`); a model that fits stays one ``model.safetensors``. A LoRA
artifact is merged into the weights by default, or, with ``lora_mode="peft"``, exported as a PEFT
adapter folder for ``PeftModel.from_pretrained(full_model, dir)``.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from ..adapters.artifact import LORA_CONFIG, LORA_WEIGHTS, check_lora, load_adapter
from ..adapters.plugging import plug_into
from ..artifacts import (DEFAULT_MAX_SHARD_SIZE, check_trusted, guard_output, parse_size, read_manifest, save_sharded,
                         sha256_file, tensor_aliases, verify_files, writing_artifact)
from ..core.device import resolve_device
from ..core.errors import ArtifactError, OffsiteError
from ..core.progress import phase
from ..families import get_family, get_layers
from ..model.identity import model_identity
from ..model.loading import load_model, load_tokenizer
from ..model.offload import claimed_adapter_layers
from ..model.streaming import StreamedModel

LORA_MODES = ("merge", "peft")


def check_against_emulator(adapter, emulator, trusted_keys=None) -> None:
    """Require that ``adapter`` was trained on the emulator package ``emulator`` with its split.

    The adapter's manifest is the data owner's claim; the package the model owner built (and
    kept) is not. Checking the emulator id and the split against it closes the one gap the
    adapter's own manifest cannot: a forged split that names a middle layer as an adapter layer.
    """
    emu = read_manifest(emulator, "emulator")
    check_trusted(emu, trusted_keys, emulator)
    verify_files(emulator, emu)
    mine = read_manifest(adapter, ("adapter", "lora"))
    if mine["emulator"]["artifact_id"] != emu["artifact_id"]:
        raise ArtifactError(f"{adapter} was trained on emulator {mine['emulator']['artifact_id'][:16]}, not on the "
                            f"package {emulator} ({emu['artifact_id'][:16]})")
    if sorted(mine["split"]["adapter"]) != sorted(emu["split"]["adapter"]):
        raise ArtifactError(f"{adapter} claims adapter layers {mine['split']['adapter']}, but its emulator {emulator} "
                            f"has adapter layers {emu['split']['adapter']}")


def plug(model: str, adapter, out, lora_mode: str = "merge", dtype: str = "auto", overwrite: bool = False,
         emulator=None, trusted_keys=None, sign_key=None, device="auto",
         max_shard_size=DEFAULT_MAX_SHARD_SIZE, stream: bool = False) -> Path:
    """Plug a fine-tuned adapter into the full model and write the result.

    Args:
        model: the full base model (folder or hub id) the emulator was built from.
        adapter: adapter or LoRA artifact from ``offsite finetune``.
        out: destination folder.
        lora_mode: for LoRA artifacts: ``merge`` (a plain HF checkpoint) or ``peft`` (a PEFT
            adapter folder keyed to the full model).
        dtype: dtype to load the base model in.
        overwrite: replace ``out`` if it is an artifact of the same kind (never an input).
        emulator: the emulator package the adapter was trained on (recommended): its id and
            split must match the adapter's.
        trusted_keys: public key files; when given, the adapter (and ``emulator``) must be signed
            by one of them.
        sign_key: Ed25519 private key file to sign the output with.
        device: where the full model is loaded and the adapter copied or merged (``"auto"``:
            CUDA when present; see :mod:`offsite.core.device`); the output is written from CPU copies and
            the device is recorded under ``run``, outside the identity (a full adapter's copy gives
            the same bytes on every device; a LoRA merge may differ in the last bits across devices).
        max_shard_size: bytes per weight file of a merged output (int, or a string like ``"5GB"``);
            each shard is copied to CPU only while it is written.
        stream: never load the full model (:mod:`offsite.model.streaming`): only the adapter layers are
            read into memory and plugged, every other tensor is copied from the base checkpoint's
            files shard by shard, so memory is the embeddings, the adapter layers and about two
            shards. The output is the same bitwise; recorded under ``run``.

    Returns:
        The output folder.
    """
    if lora_mode not in LORA_MODES:
        raise OffsiteError(f"lora_mode {lora_mode!r} unknown; allowed: {', '.join(LORA_MODES)}")
    started = time.time()
    parse_size(max_shard_size)  # a bad size is refused before any work
    where = resolve_device(device)  # an unavailable device is refused before any work
    inputs = [model, adapter, emulator]
    guard_output(Path(out), "peft" if lora_mode == "peft" else "plugged", overwrite, inputs)
    if emulator is not None:
        check_against_emulator(adapter, emulator, trusted_keys)
    source = None
    with phase(f"load {model}" + (" (layers stay on disk)" if stream else "")):
        if stream:
            source = StreamedModel(model, dtype=dtype, device=where)
            full, tokenizer = source.model, load_tokenizer(model)
            # The layers the adapter replaces or merges into; its manifest is verified by plug_into below.
            for index in claimed_adapter_layers(adapter, full.config.num_hidden_layers):
                source.materialize(index)
        else:
            full, tokenizer = load_model(model, dtype=dtype, device=where)
    identity = model_identity(full, model)
    settings = {"command": "plug", "model": model, "adapter": str(adapter), "lora_mode": lora_mode, "dtype": dtype,
                "emulator": str(emulator) if emulator else None}
    record = {"base": identity, "family": full.config.model_type}
    write = dict(overwrite=overwrite, inputs=inputs, sign_key=sign_key)

    if lora_mode == "peft":
        manifest, tensors = load_adapter(adapter, base=identity, trusted_keys=trusted_keys)
        if manifest["kind"] != "lora":
            raise OffsiteError(f"{adapter} is a full adapter; --lora-mode peft applies to LoRA artifacts only")
        # The export is copied byte for byte, so it is checked against the full model first,
        # exactly as the merge path checks it: PeftModel.from_pretrained would trust it blindly.
        check_lora(full, get_family(full), adapter, manifest, tensors)
        with writing_artifact(out, "peft", **write) as stage:
            for name in (LORA_CONFIG, LORA_WEIGHTS):
                shutil.copyfile(Path(adapter) / name, stage.path / name)
                if sha256_file(stage.path / name) != manifest["files"][name]:
                    raise ArtifactError(f"{adapter}/{name} changed while it was being exported; run plug again")
            stage.manifest["tensors"] = {LORA_WEIGHTS: manifest["tensors"][LORA_WEIGHTS]}
            _finish(stage, record, manifest, settings, started, where, streamed=source is not None)
        return Path(out)

    with phase("plug the adapter in"):
        plugged, manifest = plug_into(full, model, adapter, trusted_keys=trusted_keys, identity=identity)
    family = get_family(plugged)
    with phase("write the plugged model"), writing_artifact(out, "plugged", **write) as stage:
        plugged.config.architectures = [type(plugged).__name__]
        plugged.config.save_pretrained(stage.path)
        if getattr(plugged, "generation_config", None) is not None:
            plugged.generation_config.save_pretrained(stage.path)
        distinct, _ = tensor_aliases(plugged)
        read = None if source is None else source.emulator_reader(list(range(len(get_layers(plugged, family)))))
        tables = save_sharded({name: t.detach() for name, t in distinct.items()}, stage.path, max_shard_size,
                              read=read)
        if tokenizer is not None:
            tokenizer.save_pretrained(stage.path)
        stage.manifest["tensors"] = tables
        _finish(stage, record, manifest, settings, started, where, streamed=source is not None)
    return Path(out)


def _finish(stage, record: dict, adapter_manifest: dict, settings: dict, started: float, device,
            streamed: bool = False) -> None:
    stage.manifest.update(record)
    stage.manifest["adapter"] = {"artifact_id": adapter_manifest["artifact_id"], "kind": adapter_manifest["kind"],
                                 "emulator": adapter_manifest["emulator"]}
    stage.run.update(seconds=round(time.time() - started, 2), device=str(device), **({"stream": True} if streamed else {}))
    (stage.path / "settings.json").write_text(json.dumps(settings, indent=2, default=str) + "\n")
