"""Workflow: base model -> emulator package (model owner side)."""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

from ..artifacts import check_finite, guard_output, split_run_facts
from ..artifacts.shards import DEFAULT_MAX_SHARD_SIZE, parse_size
from ..core.device import resolve_device
from ..core.errors import OffsiteError
from ..core.progress import phase, showing
from ..emulator import BuildInputs, available_methods, get_builder
from ..emulator.disclosure import disclose, fingerprint_middle, guard_middle
from ..emulator.package import save_emulator
from ..families import count_parameters, describe, get_family
from ..model.fingerprint import weight_files
from ..model.gguf_input import is_gguf
from ..model.identity import model_identity
from ..model.loading import load_config, load_model, load_tokenizer
from ..model.split import make_split
from ..model.streaming import StreamedModel, conversion_refusal


DEFAULT_SPILL = "2GB"
"""``emulate --stream``: calibration activations held in memory before the rest go to disk."""


def settings_of(config) -> dict:
    """A method config's settings: its dataclass fields only, in declaration order (the order the
    manifest and settings.json list them in), never attributes a config derives in ``__post_init__``."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


def emulate(model: str, out, method: str = "uniform", adapter_layers="2,2", dtype: str = "auto",
            calibration=None, overwrite: bool = False, allow_verbatim_middle: bool = False, sign_key=None,
            device="auto", selection: dict | None = None, max_shard_size=DEFAULT_MAX_SHARD_SIZE,
            stream: bool | None = None, spill_above=DEFAULT_SPILL, **method_settings) -> Path:
    """Build an emulator package from a base model.

    Args:
        model: base model folder or hub id.
        out: destination folder (must not exist or be empty unless ``overwrite``).
        method: registered emulator method (``offsite emulate --help`` lists them).
        adapter_layers: ``"a,b"`` (first a, last b layers) or ``"idx:i,j,..."``.
        dtype: dtype to load the base model in.
        calibration: public calibration text file, for methods that need one.
        overwrite: replace ``out`` if it exists.
        allow_verbatim_middle: write the package even if middle layers leave verbatim (see
            :mod:`offsite.emulator.disclosure`); only for packages that are never shipped (full fine-tuning).
        sign_key: Ed25519 private key file (``offsite keygen``) to sign the package with.
        device: where the base model is loaded and the method runs (calibration, statistics,
            training): ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda:N"``, ... (see
            :mod:`offsite.core.device`). Not part of the package's identity; recorded under ``run``.
        max_shard_size: largest weight file (bytes, or e.g. ``"5GB"``); bigger emulators are written shard
            by shard in Hugging Face's sharded layout.
        stream: read the base model's decoder layers from its safetensors files one at a time instead of
            loading the model (:mod:`offsite.model.streaming`; methods with ``supports_stream``). The package
            is the same bitwise; recorded under ``run``. None (the default): stream whenever the method
            can and the model is a checkpoint of safetensors files, else load it whole and say why in
            one line (:func:`choose_stream`); True: stream or refuse; False: load the whole model. No emulator layer is held either: changed
            layers are parked in a scratch folder beside ``out`` (removed at the end), kept ones stay
            on disk, and each shard's tensors are read back only while it is written.
        spill_above: with ``stream``, calibration activations beyond this many bytes (or e.g.
            ``"2GB"``; None: never) go to that scratch folder too, so memory does not grow with depth.
        selection: how these settings were chosen (``offsite frontier``'s sweep), stored in the manifest.
        **method_settings: the method's own settings (e.g. ``emulator_layers=8``).

    Returns:
        The package folder.
    """
    started = time.time()
    where = resolve_device(device)  # an unavailable device is refused before any work
    builder = get_builder(method)
    config = builder.make_config(**method_settings)
    inputs = [model, calibration]
    guard_output(Path(out), "emulator", overwrite, inputs)  # refuse a bad --out before minutes of work
    parse_size(max_shard_size)  # and a bad shard size
    spill = None if spill_above is None else parse_size(spill_above, "spill_above", minimum=0)
    if stream is None:
        stream, why_not = choose_stream(model, builder)
        if why_not and showing():
            print(f"[offsite] loading the whole model: {why_not}", file=sys.stderr)
    if not stream and spill_above != DEFAULT_SPILL:
        raise OffsiteError("spill_above (--spill-above) applies to streamed builds only, and this build loads "
                           "the whole model (--no-stream, or a method or model that cannot stream)")
    if stream and not builder.supports_stream:
        streams = [m for m in available_methods() if get_builder(m).supports_stream]
        why = getattr(builder, "stream_refusal", None) or "it needs the model in memory"
        raise OffsiteError(f"--stream is not available for method '{method}' ({why}); "
                           f"methods that stream: {', '.join(streams)}")
    source = None
    with phase(f"load {model}" + (" (layers stay on disk)" if stream else "")):
        if stream:
            source = StreamedModel(model, dtype=dtype, device=where, scratch_parent=Path(out).absolute().parent,
                                   spill_bytes=spill)
            base, tokenizer = source.model, load_tokenizer(model)
        else:
            base, tokenizer = load_model(model, dtype=dtype, device=where)
    try:
        return _build_and_write(base, tokenizer, source, model, out, method, builder, config, adapter_layers,
                                dtype, calibration, overwrite, allow_verbatim_middle, sign_key, where, selection,
                                max_shard_size, inputs, started)
    finally:
        if source is not None:
            source.close()  # parked layers and spilled activations


def choose_stream(model: str, builder) -> tuple:
    """Whether a build streams by default: ``(True, None)``, or ``(False, why it loads the model whole)``.

    Streaming holds one decoder layer instead of the model and writes the same package, so it is
    the default wherever it applies: a method with ``supports_stream`` and a base model whose
    weights are ``.safetensors`` files (a folder, or a hub id in the local cache). A ``.gguf`` file
    or ``.bin`` weights must be loaded (dequantised, unpickled) whole.
    """
    if not builder.supports_stream:
        return False, f"method '{builder.name}' cannot stream ({builder.stream_refusal or 'it needs the model in memory'})"
    if is_gguf(model):
        return False, f"{model} is a .gguf file, which is dequantised whole (offsite models convert writes a folder that streams)"
    if not weight_files(model):
        return False, f"{model} has no .safetensors weight files to read layer by layer"
    why = conversion_refusal(load_config(model))
    if why:
        return False, why
    return True, None


def _build_and_write(base, tokenizer, source, model, out, method, builder, config, adapter_layers, dtype,
                     calibration, overwrite, allow_verbatim_middle, sign_key, where, selection, max_shard_size,
                     inputs, started) -> Path:
    """:func:`emulate` once the base model is loaded (in memory, or as ``source``, a streamed one)."""
    family = get_family(base)
    split = make_split(base.config.num_hidden_layers, adapter_layers)
    if source is not None:  # the resident part now; each layer as it is read
        source.check_finite()
    else:
        check_finite(base.state_dict(), f"base model {model}")  # checked where it lies: no CPU copy
    identity = model_identity(base, model)
    full_params = count_parameters(base)

    # now: builders edit the base model in place
    def layer_check(i, layer):  # the model's own tensor names in the message, as in memory
        prefix = family.layer_param_prefix(i)
        check_finite({prefix + k: v for k, v in layer.state_dict().items()}, f"base model {model}")

    layer_check = layer_check if source else None
    before = fingerprint_middle(base, family, split, stream=source, on_layer=layer_check)
    with phase(f"build the {method} emulator"):
        plan, emulator = builder.build(base, family, split, config,
                                       BuildInputs(calibration=calibration, tokenizer=tokenizer, stream=source))
    read = None if source is None else _checked_reader(source, plan, f"the {method} emulator built from {model}")
    disclosure = disclose(before, emulator, family, split, plan, read=read)
    disclosure["overridden"] = guard_middle(disclosure, builder, config, allow=allow_verbatim_middle)
    if source is None:
        check_finite(emulator.state_dict(), f"the {method} emulator built from {model}")

    stored_plan, plan_facts = split_run_facts(plan)  # build timings stay out of the identity
    record = {
        "base": identity,
        "family": describe(family)["model_type"],
        "split": split.to_dict(),
        "method": method,
        "config": settings_of(config),
        "plan": stored_plan,
        "parameters": {"full": full_params, "emulator": count_parameters(emulator)},
        "disclosure": disclosure,
        **({"selection": selection} if selection else {}),
    }
    settings = {"command": "emulate", "model": model, "method": method, "adapter_layers": str(adapter_layers),
                "dtype": dtype, "calibration": str(calibration) if calibration else None,
                "allow_verbatim_middle": allow_verbatim_middle, **settings_of(config)}
    with phase("write the package"):
        return save_emulator(out, emulator, tokenizer, record, settings, overwrite=overwrite, inputs=inputs,
                             sign_key=sign_key, max_shard_size=max_shard_size, read=read,
                             run={"seconds": round(time.time() - started, 2), "device": str(where),
                                  **({"stream": True} if source is not None else {}),
                                  **({"plan": plan_facts} if plan_facts else {})})


def _checked_reader(source, plan: dict, what: str):
    """Read emulator tensors back from a streamed build (its layers are on meta), refusing NaN/inf."""
    reader = source.emulator_reader([e["source"] for e in plan["layers"]])

    def read(names):
        values = reader(names)
        check_finite(values, what)
        return values
    return read
