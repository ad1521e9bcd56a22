"""The emulator package: what the model owner ships to the data owner.

Folder layout (a stock Hugging Face checkpoint plus offsite's manifest)::

    config.json              the HF config with num_hidden_layers = emulator layers
    generation_config.json   when the base model has one
    model.safetensors        adapter layers + emulator middle + embeddings, final norm, head
    tokenizer files          when the base model has a tokenizer
    settings.json            the resolved settings of the run that made it
    manifest.json            kind=emulator, base identity, family, split, method, config, plan, hashes

A drop-only emulator loads with stock ``AutoModelForCausalLM.from_pretrained``; shape-changing
methods are rebuilt by :func:`load_emulator` from the plan, then loaded strictly.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .artifacts import (check_against, check_trusted, load_into, load_tensors, read_manifest, save_tensors,
                        unique_state_dict, verify_files, writing_artifact)
from .emulator import get_builder
from .errors import ArtifactError
from .families import Family, get_family
from .split import Split

WEIGHTS = "model.safetensors"


@dataclasses.dataclass
class Emulator:
    """A loaded emulator package.

    Attributes:
        model: the emulator as an HF causal LM (adapter layers + compressed middle).
        tokenizer: its tokenizer, or None.
        manifest: the package manifest.
        family: the architecture family.
        split: the adapter/middle split in full-model layer numbers.
        path: the folder it was loaded from.
    """

    model: object
    tokenizer: object
    manifest: dict
    family: Family
    split: Split
    path: Path

    @property
    def layer_map(self) -> list:
        """Full-model index of each emulator layer."""
        return [e["source"] for e in self.manifest["plan"]["layers"]]

    @property
    def adapter_positions(self) -> list:
        """Emulator-layer positions of the adapter layers."""
        return [i for i, e in enumerate(self.manifest["plan"]["layers"]) if e["role"] == "adapter"]

    @property
    def artifact_id(self) -> str:
        return self.manifest["artifact_id"]


def save_emulator(out, model, tokenizer, record: dict, settings: dict, overwrite: bool = False, inputs=(),
                  sign_key=None, run: dict | None = None) -> Path:
    """Write an emulator package atomically.

    Args:
        out: destination folder.
        model: the emulator model (already built by a method's ``apply``).
        tokenizer: tokenizer to ship, or None.
        record: manifest fields: ``base``, ``family``, ``split``, ``method``, ``config``, ``plan``.
        settings: resolved settings of the run, written as settings.json (no timings: they would
            make a bitwise-identical rebuild a different artifact).
        inputs: paths the build read (the output may not be, contain or lie in one).
        sign_key: Ed25519 private key file to sign the package with, or None.
        run: facts of this run kept out of the identity (e.g. ``{"seconds": 12.3}``).
    """
    with writing_artifact(out, "emulator", overwrite=overwrite, inputs=inputs, sign_key=sign_key) as stage:
        stage.run.update(run or {})
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(stage.path)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(stage.path)
        tensors = save_tensors(unique_state_dict(model), stage.path / WEIGHTS)
        if tokenizer is not None:
            tokenizer.save_pretrained(stage.path)
        (stage.path / "settings.json").write_text(json.dumps(settings, indent=2, default=str) + "\n")
        stage.manifest.update(record)
        stage.manifest["tensors"] = {WEIGHTS: tensors}
    return Path(out)


def load_emulator(path, device: str | None = None, trusted_keys=None) -> Emulator:
    """Load and verify an emulator package (hashes, layer table, tensor names and shapes, finite values).

    Args:
        path: the package folder.
        device: where to put the model.
        trusted_keys: public key files; when given, the package must be signed by one of them.

    Raises:
        ArtifactError: the folder is incomplete, tampered with, or inconsistent with its manifest.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    root = Path(path)
    manifest = read_manifest(root, "emulator")
    check_trusted(manifest, trusted_keys, root)
    verify_files(root, manifest)
    family = get_family(manifest["family"])
    split = Split.from_dict(manifest["split"])
    try:
        config = AutoConfig.from_pretrained(root)
    except (OSError, ValueError, KeyError, TypeError) as exc:  # transformers' errors for a broken config.json
        raise ArtifactError(f"{root}/config.json is not a usable model config ({str(exc).splitlines()[0]})") from None
    if config.model_type != manifest["family"]:
        raise ArtifactError(f"{root}: config.json is a '{config.model_type}' model, the manifest says "
                            f"'{manifest['family']}'")
    plan = manifest["plan"]
    if config.num_hidden_layers != len(plan["layers"]):
        raise ArtifactError(f"{root}: config has {config.num_hidden_layers} layers but the plan lists "
                            f"{len(plan['layers'])}")
    model = AutoModelForCausalLM.from_config(config)
    get_builder(manifest["method"]).restructure(model, family, plan)
    tensors = load_tensors(root / WEIGHTS)
    recorded = {k: v[1] for k, v in manifest["tensors"][WEIGHTS].items()}
    check_against(tensors, recorded, root / WEIGHTS)
    load_into(model, tensors, root / WEIGHTS)
    if device:
        model.to(device)
    model.eval()
    from .loading import load_tokenizer

    return Emulator(model, load_tokenizer(str(root)), manifest, family, split, root)
