"""Strict checks of an adapter artifact against the model it is about to enter.

An adapter comes from the other party, so it is hostile input: its manifest and files may be
rewritten consistently (hashes recomputed, ``artifact_id`` recomputed), and only a comparison with
the model itself can tell an honest adapter from one that reaches into the middle layers. Every
check here runs before a single weight is copied and before anything is written.

* ``adapter`` artifacts must hold *exactly* the parameters of the manifest's split adapter layers:
  every parameter of every adapter layer, nothing else, with the model's shapes and dtypes (no
  silent cast: an fp16 adapter in an fp32 model is refused, with the ``--dtype`` that fits; the one
  exception is the exact upcast of an adapter in its own emulator's bf16/fp16 into an fp32 model).
* ``lora`` artifacts must have an ``adapter_config.json`` on the whitelist of :func:`check_lora_fields`
  and exactly the LoRA state dict PEFT itself creates on the model with that config. LoRA weights
  may be float32 or the base dtype: PEFT keeps adapter weights in float32 on bf16/fp16 bases, and
  either loads into the LoRA layers without loss.

A split that adapts every layer (``adapter_layers="all"``, the full fine-tuning baseline of the
report) is accepted: it is the same rule with an empty middle.
"""

from __future__ import annotations

import re

import torch

from ..core.errors import ArtifactError
from ..core.precision import dtype_name
from ..families import Family, get_layers
from ..model.dtypes import DTYPES

# LoraConfig fields whose value is free: they only size or scale the low-rank delta that lands on
# the targeted linears of the adapter layers, never anything else.
LORA_FREE = ("r", "lora_alpha", "lora_dropout", "use_rslora", "inference_mode", "peft_version")
# LoraConfig fields checked against the split, the family or the manifest in check_lora_fields.
LORA_CHECKED = ("peft_type", "task_type", "base_model_name_or_path", "target_modules", "layers_to_transform",
                "layers_pattern", "fan_in_fan_out", "init_lora_weights")
# Every other LoraConfig field must keep its default. Among them, those that would let a LoRA
# artifact carry or change weights outside its adapter layers:
#   modules_to_save          ships whole trained copies of any module (lm_head, embeddings, ...);
#   trainable_token_indices  trains rows of the embedding matrix;
#   layer_replication        duplicates decoder layers, changing the model's depth;
#   target_parameters        puts LoRA on raw nn.Parameters, wherever they live;
#   bias                     "all" / "lora_only" train biases (of every module for "all");
#   exclude_modules, rank_pattern, alpha_pattern  regexes over module names that offsite never
#                            re-indexes from emulator to full-model numbering;
#   init_lora_weights        pissa / olora / corda / eva / loftq rewrite the *base* weights at wrap
#                            time (checked: only True or False), with loftq_config, eva_config,
#                            corda_config, lora_ga_config at their defaults;
#   auto_mapping, revision, megatron_config, megatron_core  make a loader import a class or
#                            module, or fetch another base revision, by name;
#   use_dora, lora_bias, use_qalora, alora_invocation_tokens, velora_config, monteclora_config,
#   kasa_config, arrow_config, use_bdlora, ensure_weight_tying  other layer types and tying rules
#                            that offsite never trains, so nothing honest sets them.
# A field this peft does not know is refused too: its meaning cannot be judged.


def layer_index(name: str, family: Family):
    """Decoder-layer index that parameter ``name`` lies in, or None (embeddings, head, final norm)."""
    match = re.search(r"(^|\.)" + re.escape(family.layers) + r"\.(\d+)\.", name)
    return int(match.group(2)) if match else None


def adapter_layers(manifest: dict, positions: dict, num_layers: int, where, required=None) -> list:
    """The manifest's split adapter layers, checked against the model they will enter.

    Args:
        manifest: the adapter's manifest.
        positions: full-model layer index -> index of that layer in the model being plugged.
        num_layers: decoder layers of the full model.
        required: the adapter layers the model expects (an emulator's split), or None.

    Returns:
        Sorted full-model indices of the adapter layers.

    Raises:
        ArtifactError: the split is for another depth, or names layers the model does not have.
    """
    split = manifest["split"]
    layers = sorted(split["adapter"])
    if split["num_layers"] != num_layers:
        raise ArtifactError(f"{where}: the adapter's split is for a {split['num_layers']}-layer model; this one has "
                            f"{num_layers} layers")
    if required is not None and set(layers) != set(required):
        raise ArtifactError(f"{where}: the adapter's split names adapter layers {layers}, but this emulator's adapter "
                            f"layers are {sorted(required)}")
    absent = [i for i in layers if i not in positions]
    if absent:
        raise ArtifactError(f"{where}: the adapter's split names layers {absent}, which this model does not have")
    return layers


def split_layers(manifest: dict, model, family: Family, positions: dict, where, target_split=None) -> list:
    """:func:`adapter_layers` for ``model``: the full model, or an emulator with ``target_split``."""
    if target_split is None:
        return adapter_layers(manifest, positions, len(get_layers(model, family)), where)
    return adapter_layers(manifest, positions, target_split.num_layers, where, target_split.adapter)


def _dtype_hint(got: torch.dtype, loadable: bool) -> str:
    """How to get a model whose parameters have dtype ``got``, or why there is none."""
    name = dtype_name(got)
    if got not in {v for v in DTYPES.values() if isinstance(v, torch.dtype)}:
        return f"{name} is not a dtype a model is loaded in; the adapter layers must be floating-point weights"
    if not loadable:
        return "an adapter trained on this emulator package has its dtype"
    return f"load the base model in the matching dtype (plug/eval --dtype {name}) to use this adapter"


def check_full_adapter(manifest: dict, tensors: dict, model, family: Family, positions: dict, where,
                       target_split=None) -> dict:
    """Check an ``adapter`` artifact's tensors against ``model``; nothing is copied.

    Args:
        tensors: the artifact's tensors, keyed in full-model numbering.
        positions: full-model layer index -> layer index in ``model`` (identity for the full model).
        target_split: ``model``'s own :class:`~offsite.model.split.Split` when it is an emulator (its
            adapter layers must be the artifact's), or None for the full model.

    Returns:
        ``{full-model name: parameter of model}`` for every tensor, ready to copy.

    Raises:
        ArtifactError: a tensor outside the adapter layers, a missing or unknown parameter, or a
            shape or dtype that differs from the model's.
    """
    layers = split_layers(manifest, model, family, positions, where, target_split)
    for name in sorted(tensors):
        index = layer_index(name, family)
        if index is None:
            raise ArtifactError(f"{where}: tensor '{name}' lies outside the decoder layers; an adapter holds only "
                                f"its adapter layers {layers}")
        if index not in layers:
            raise ArtifactError(f"{where}: tensor '{name}' belongs to layer {index}, which is not an adapter layer "
                                f"of its split {layers}; an adapter may replace only its own adapter layers")
    stack = get_layers(model, family)
    expected = {}
    for full in layers:
        for name, p in stack[positions[full]].named_parameters():
            expected[family.layer_param_prefix(full) + name] = p
    missing = sorted(set(expected) - set(tensors))
    if missing:
        gaps = sorted({layer_index(k, family) for k in missing})
        raise ArtifactError(f"{where}: missing {len(missing)} tensor(s) of adapter layer(s) {gaps}, e.g. "
                            f"{missing[:3]}; an adapter must hold every parameter of every adapter layer")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise ArtifactError(f"{where}: {len(extra)} tensor(s) are not parameters of the model's adapter layers, e.g. "
                            f"{extra[:3]}")
    for name in sorted(expected):
        got, want = tensors[name], expected[name]
        if tuple(got.shape) != tuple(want.shape):
            raise ArtifactError(f"{where}: tensor '{name}' has shape {list(got.shape)}, the model's parameter "
                                f"{list(want.shape)}")
        if got.dtype != want.dtype and not _exact_upcast(got.dtype, want.dtype, manifest):
            raise ArtifactError(f"{where}: tensor '{name}' is {dtype_name(got.dtype)} but the model's parameter is "
                                f"{dtype_name(want.dtype)}; offsite never casts adapter weights silently — "
                                f"{_dtype_hint(got.dtype, target_split is None)}")
    return expected


def _exact_upcast(got: torch.dtype, want: torch.dtype, manifest: dict) -> bool:
    """A bf16/fp16 adapter may go into an fp32 model when it has the dtype of the emulator it was
    trained on: every bf16/fp16 value is exactly an fp32 value, so nothing is rounded (a model owner
    who emulated in bf16 to ship a smaller package plugs into its fp32 checkpoint). Any other
    difference is refused."""
    return (want == torch.float32 and got in (torch.bfloat16, torch.float16)
            and manifest.get("emulator", {}).get("dtype") == dtype_name(got))


def check_lora_fields(data, manifest: dict, family: Family, where, layer_modules=None) -> dict:
    """Check a LoRA artifact's ``adapter_config.json`` against the whitelist documented above.

    Args:
        data: the parsed ``adapter_config.json``.
        manifest: the artifact's manifest (split and base name).
        layer_modules: leaf names of the modules inside one decoder layer; when given, every
            ``target_modules`` entry must be one of them.

    Returns:
        ``data``, unchanged.

    Raises:
        ArtifactError: naming the first field that is not allowed or does not fit the split.
    """
    import peft
    from peft import LoraConfig

    if not isinstance(data, dict):
        raise ArtifactError(f"{where}: adapter_config.json must be a JSON object")
    defaults = LoraConfig().to_dict()
    unknown = sorted(set(data) - set(defaults))
    if unknown:
        raise ArtifactError(f"{where}: adapter_config.json has fields {unknown} that the installed peft "
                            f"{peft.__version__} does not define; refusing what cannot be judged")
    for key in sorted(set(defaults) - set(LORA_FREE) - set(LORA_CHECKED)):
        # peft writes target_parameters=[] for models with fused experts (Mixtral, Qwen-MoE): no parameter
        # targeted, the same as its default None.
        empty = key == "target_parameters" and data.get(key) == [] and defaults[key] is None
        if key in data and data[key] != defaults[key] and not empty:
            raise ArtifactError(f"{where}: adapter_config.json sets {key}={data[key]!r}; an offsite LoRA keeps it at "
                                f"{defaults[key]!r} (it could carry or change weights outside the adapter layers, "
                                "or is a LoRA variant offsite does not train)")
    _check_free_fields(data, where)
    layers = sorted(manifest["split"]["adapter"])
    wanted = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "fan_in_fan_out": family.conv1d,
              "base_model_name_or_path": manifest["base"]["name_or_path"]}
    for key, value in wanted.items():
        if data.get(key) != value:
            raise ArtifactError(f"{where}: adapter_config.json has {key}={data.get(key)!r}; expected {value!r}")
    if data.get("init_lora_weights", True) not in (True, False):
        raise ArtifactError(f"{where}: adapter_config.json has init_lora_weights={data['init_lora_weights']!r}; only "
                            "true or false are allowed (other initialisations rewrite the base weights)")
    targets = data.get("target_modules")
    # A string is a regex that PEFT matches on full module names, bypassing layers_to_transform;
    # a dotted entry names one module directly, also bypassing it. Only plain leaf names stay
    # confined to the listed layers.
    if (not isinstance(targets, list) or not targets
            or any(not isinstance(t, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", t) for t in targets)):
        raise ArtifactError(f"{where}: adapter_config.json target_modules={targets!r}; expected a non-empty list of "
                            "plain module names (e.g. ['q_proj', 'v_proj']), no regex and no dotted paths")
    foreign = sorted(set(targets) - set(layer_modules)) if layer_modules is not None else []
    if foreign:
        raise ArtifactError(f"{where}: adapter_config.json target_modules {foreign} name no module of a decoder layer; "
                            "a LoRA may change only its adapter layers")
    chosen = data.get("layers_to_transform")
    if (not isinstance(chosen, list) or any(not isinstance(i, int) or isinstance(i, bool) for i in chosen)
            or len(set(chosen)) != len(chosen) or set(chosen) != set(layers)):
        raise ArtifactError(f"{where}: adapter_config.json layers_to_transform={chosen!r}, but the split's adapter "
                            f"layers are {layers}; a LoRA may change only its adapter layers")
    if data.get("layers_pattern") not in (family.layers_attr, [family.layers_attr]):
        raise ArtifactError(f"{where}: adapter_config.json layers_pattern={data.get('layers_pattern')!r}; this "
                            f"{family.model_type} model's decoder layers are '{family.layers_attr}'")
    return data


def _check_free_fields(data: dict, where) -> None:
    """Types and ranges of the :data:`LORA_FREE` fields, so odd values fail here, not inside PEFT."""
    number = (int, float)
    rules = {"r": (lambda v: isinstance(v, int) and v >= 1, "a positive integer"),
             "lora_alpha": (lambda v: isinstance(v, number) and v > 0, "a positive number"),
             "lora_dropout": (lambda v: isinstance(v, number) and 0 <= v < 1, "a number in [0, 1)"),
             "use_rslora": (lambda v: isinstance(v, bool), "true or false"),
             "inference_mode": (lambda v: isinstance(v, bool), "true or false"),
             "peft_version": (lambda v: v is None or isinstance(v, str), "a version string")}
    for key, (ok, what) in rules.items():
        # bool is an int in Python; a LoRA rank or alpha of `true` is a forgery, not a number
        if key in data and (not ok(data[key]) or (key in ("r", "lora_alpha", "lora_dropout")
                                                  and isinstance(data[key], bool))):
            raise ArtifactError(f"{where}: adapter_config.json has {key}={data[key]!r}; expected {what}")


def check_lora_tensors(tensors: dict, expected: dict, layers: list, family: Family, base_dtype, where) -> None:
    """Compare a LoRA artifact's tensors with the state dict PEFT builds on the model.

    Args:
        tensors: the artifact's tensors (full-model numbering).
        expected: PEFT's LoRA state dict for the model and config, renamed to full-model numbering.
        layers: the split's adapter layers.
        base_dtype: dtype of the model's weights.

    Raises:
        ArtifactError: a tensor outside the adapter layers, missing or extra keys, a shape that
            differs, or a dtype other than float32 or the base dtype.
    """
    for what, names in (("the artifact holds", tensors), ("PEFT would create", expected)):
        outside = sorted(k for k in names if layer_index(k, family) not in layers)
        if outside:
            raise ArtifactError(f"{where}: {what} LoRA tensor '{outside[0]}' outside the adapter layers {layers} "
                                f"({len(outside)} such); a LoRA may change only its adapter layers")
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        parts = ([f"missing {len(missing)} e.g. {missing[:3]}"] if missing else []) + \
                ([f"unexpected {len(extra)} e.g. {extra[:3]}"] if extra else [])
        raise ArtifactError(f"{where}: the LoRA tensors are not the state dict PEFT creates with this "
                            f"adapter_config.json: {'; '.join(parts)}")
    # PEFT keeps LoRA weights in float32 on bf16/fp16 bases (autocast_adapter_dtype), and a LoRA
    # saved from a model without that upcast holds the base dtype; both load without loss.
    allowed = {torch.float32, base_dtype}
    for name in sorted(expected):
        got = tensors[name]
        if tuple(got.shape) != tuple(expected[name].shape):
            raise ArtifactError(f"{where}: LoRA tensor '{name}' has shape {list(got.shape)}, PEFT creates "
                                f"{list(expected[name].shape)}")
        if got.dtype not in allowed:
            raise ArtifactError(f"{where}: LoRA tensor '{name}' is {dtype_name(got.dtype)}; LoRA weights must be "
                                f"float32 or the base model's dtype ({dtype_name(base_dtype)})")


def lora_config(data: dict, layers: list):
    """A ``LoraConfig`` from a checked ``adapter_config.json`` with ``layers_to_transform=layers``.

    Args:
        data: the config, already passed through :func:`check_lora_fields`.
        layers: decoder-layer indices in the model being wrapped (emulator positions or full).
    """
    from peft import LoraConfig

    # peft_type is set by LoraConfig itself (the JSON holds it as a plain string, not the enum);
    # base_model_name_or_path, already checked, is left for PEFT to take from the wrapped model,
    # which may be the emulator rather than the base.
    fields = {k: v for k, v in data.items() if k not in ("peft_type", "layers_to_transform", "base_model_name_or_path")}
    return LoraConfig(**fields, layers_to_transform=list(layers))
