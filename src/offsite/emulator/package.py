"""The emulator package: what the model owner ships to the data owner.

Folder layout (a stock Hugging Face checkpoint plus offsite's manifest)::

    config.json              the HF config with num_hidden_layers = emulator layers
    generation_config.json   when the base model has one
    model.safetensors        adapter layers + emulator middle + embeddings, final norm, head; or, past
                             max_shard_size, model-0000i-of-0000N.safetensors shards plus
                             model.safetensors.index.json (Hugging Face's sharded layout)
    tokenizer files          when the base model has a tokenizer
    settings.json            the resolved settings of the run that made it
    manifest.json            kind=emulator, base identity, family, split, method, config, plan, hashes

A drop-only emulator loads with stock ``AutoModelForCausalLM.from_pretrained``; shape-changing
methods are rebuilt by :func:`load_emulator` from the plan, then loaded strictly.

Loading never materialises a random model: the skeleton is built with its parameters on the
``meta`` device (buffers such as rotary ``inv_freq`` are computed for real, as the architecture's
constructor does), and the verified tensors are then *assigned* as its parameters, so the weights
exist in memory once and no initialiser runs. Tied weights (an LM head tied to the embeddings,
decoder positions that share one layer's parameters) are stored once and re-tied on load.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ..artifacts import (DEFAULT_MAX_SHARD_SIZE, WEIGHTS, check_table, check_trusted, load_into, load_tensors,
                         parse_size, read_manifest, save_sharded, tensor_aliases, verify_files, weight_files,
                         writing_artifact)
from ..core.errors import ArtifactError
from ..families import Family, get_family
from ..model.dtypes import no_init_weights
from ..model.loading import load_tokenizer
from ..model.split import Split
from . import get_builder


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
                  sign_key=None, run: dict | None = None, max_shard_size=DEFAULT_MAX_SHARD_SIZE, read=None) -> Path:
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
        max_shard_size: bytes per weight file (int, or a string like ``"5GB"``); weights that fit
            stay one ``model.safetensors``, larger ones are written shard by shard (see
            :mod:`offsite.artifacts.shards`). Tied tensors are written once.
        read: for a streamed build, whose emulator layers are on ``meta``: ``read(names) -> {name:
            tensor}`` (:meth:`offsite.model.streaming.StreamedModel.emulator_reader`), called shard by shard.
    """
    parse_size(max_shard_size)  # refused before anything is staged
    with writing_artifact(out, "emulator", overwrite=overwrite, inputs=inputs, sign_key=sign_key) as stage:
        stage.run.update(run or {})
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(stage.path)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(stage.path)
        distinct, _ = tensor_aliases(model)
        tensors = save_sharded({name: t.detach() for name, t in distinct.items()}, stage.path, max_shard_size,
                               read=read)
        if tokenizer is not None:
            tokenizer.save_pretrained(stage.path)
        (stage.path / "settings.json").write_text(json.dumps(settings, indent=2, default=str) + "\n")
        stage.manifest.update(record)
        stage.manifest["tensors"] = tensors
    return Path(out)


def build_skeleton(config, method: str, family: Family, plan: dict):
    """The emulator's module structure with every parameter on the ``meta`` device, no values.

    Built under accelerate's ``init_empty_weights(include_buffers=False)``: parameters are created
    on ``meta``, while buffers (rotary ``inv_freq``, causal masks) are computed on the CPU exactly as
    the architecture's constructor computes them. Initialisers are switched off (there is nothing to
    initialise), the method's ``restructure`` reshapes the skeleton to the plan (its new modules land
    on ``meta`` too), then HF's own weight tying is applied.

    Args:
        config: the package's HF config.
        method: the emulator method that built the package.
        family: its architecture family.
        plan: the manifest's plan.

    Returns:
        The skeleton, ready for :func:`~offsite.artifacts.load_into` with ``assign=True``.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False), no_init_weights():
        model = AutoModelForCausalLM.from_config(config)
        get_builder(method).restructure(model, family, plan)
    model.tie_weights()  # outside: accelerate re-wraps every parameter set inside, which would undo a tie
    return model


def load_emulator(path, device: str | None = None, trusted_keys=None) -> Emulator:
    """Load and verify an emulator package (hashes, layer table, tensor names, shapes, dtypes, finite values).

    The weights are read file by file (one file, or every shard), each checked against its
    manifest table, then assigned into a ``meta`` skeleton (see :func:`build_skeleton`): no random
    initialisation and no second copy of the weights.

    Args:
        path: the package folder.
        device: where to put the model.
        trusted_keys: public key files; when given, the package must be signed by one of them.

    Raises:
        ArtifactError: the folder is incomplete, tampered with, or inconsistent with its manifest.
    """
    from transformers import AutoConfig

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
    model = build_skeleton(config, manifest["method"], family, plan)
    files = weight_files(manifest)
    if not files:
        raise ArtifactError(f"{root}: the package holds no weight file; expected {WEIGHTS} or its shards")
    tensors = {}
    for rel in files:
        part = load_tensors(root / rel)
        check_table(part, manifest["tensors"][rel], root / rel)
        twice = sorted(set(part) & set(tensors))
        if twice:
            raise ArtifactError(f"{root / rel}: tensor '{twice[0]}' is also in another weight file")
        tensors.update(part)
    load_into(model, tensors, root / files[0] if len(files) == 1 else root, assign=True)
    if device:
        model.to(device)
    model.eval()

    return Emulator(model, load_tokenizer(str(root)), manifest, family, split, root)
