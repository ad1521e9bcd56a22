"""The family interface: everything offsite knows about one Hugging Face architecture.

A :class:`Family` is plain data naming *roles* (decoder layer list, attention and MLP linears,
norms, final norm) by their module paths. Generic functions in this module turn those names into
modules, so the rest of the library never spells out an HF module path or tests ``isinstance``
against an HF class. Families are looked up by ``config.model_type`` (see ``catalog.py``).
"""

from __future__ import annotations

import contextlib

import dataclasses
from typing import Iterable, Sequence

from torch import nn

from ..core.errors import OffsiteError


@dataclasses.dataclass(frozen=True)
class Experts:
    """Where a mixture-of-experts family keeps its experts and how their fused tensors lie
    (see :mod:`offsite.families.moe`).

    Attributes:
        path: path inside a decoder layer of the module holding the fused expert parameters.
        router: path inside a decoder layer of the router (kept whole by every method).
        in_out: each expert's matrices are stored ``(in, out)`` (GPT-OSS) rather than ``(out, in)``.
        interleaved: gate and up alternate along the fused dimension (GPT-OSS) rather than ``[gate; up]``.
        biases: the fused tensors have ``gate_up_proj_bias`` / ``down_proj_bias``.
        shared: path of a shared (always-on) expert, kept whole, or None.
        sparse_step: the config places experts by ``mlp_only_layers`` and ``decoder_sparse_step``
            (Qwen2/3-MoE): other layers hold a dense MLP, chosen by layer *index*, so
            :func:`set_layers` rewrites both when layers move.
    """

    path: str = "mlp.experts"
    router: str = "mlp.gate"
    in_out: bool = False
    interleaved: bool = False
    biases: bool = False
    shared: str | None = None
    sparse_step: bool = False


@dataclasses.dataclass(frozen=True)
class TextInside:
    """Where a multimodal checkpoint keeps its language model, so offsite can work on that alone.

    Attributes:
        text_config: config attribute holding the text model's config (a supported family's type).
        backbone: path, from the multimodal CausalLM root, of the text backbone (the text CausalLM's ``model``).
        head: path of the LM head.
    """

    text_config: str
    backbone: str
    head: str = "lm_head"


@dataclasses.dataclass(frozen=True)
class Family:
    """Roles of one architecture, as module paths.

    Attributes:
        model_type: the ``config.model_type`` this family serves.
        layers: dotted path from the CausalLM root to the decoder ``nn.ModuleList``.
        final_norm: dotted path from the CausalLM root to the norm applied after the last layer.
        attention: role -> path inside a decoder layer. Roles are ``q``, ``k``, ``v``, ``o`` for
            separate projections, or ``qkv`` + ``o`` for a fused projection.
        mlp: role -> path inside a decoder layer. Roles are ``gate``, ``up``, ``down``, or
            ``gate_up`` (fused, Phi-3) + ``down``, or ``up`` + ``down``.
        norms: paths of the norms inside a decoder layer.
        qkv_layout: how a fused ``qkv`` weight stacks its rows: ``"concat"`` ([q; k; v], Phi-3,
            GPT-2), ``"per_head"`` (each head's q, k, v rows together: GPT-NeoX, BLOOM) or
            ``"falcon"`` (depends on ``new_decoder_architecture``/``multi_query``). ``None`` when
            q/k/v are separate.
        conv1d: True when linears are GPT-2 ``Conv1D`` (weight stored ``[in, out]``).
        parallel_residual: attention and MLP read the same input (Phi, GPT-J, Falcon, NeoX).
        logit_softcap: config attribute of a final logit soft-cap ``c * tanh(logits / c)`` applied
            after the LM head (Gemma 2), or ``None``; see :mod:`offsite.families.head`.
        logit_divisor: config attribute the logits are divided by after the LM head (Granite's
            ``logits_scaling``), or ``None``.
        per_layer: config attributes that hold one entry per decoder layer (``layer_types``:
            sliding or full attention; SmolLM3's ``no_rope_layers``); they follow the layers when a
            method drops, shares or reorders them (:func:`set_layers`).
        experts: the layout of a mixture-of-experts family's fused experts (:class:`Experts`), or None.
        extra: other architecture notes shown by ``offsite families``.
    """

    model_type: str
    layers: str
    final_norm: str
    attention: dict
    mlp: dict
    norms: tuple
    qkv_layout: str | None = None
    conv1d: bool = False
    parallel_residual: bool = False
    logit_softcap: str | None = None
    logit_divisor: str | None = None
    per_layer: tuple = ("layer_types",)
    experts: Experts | None = None
    extra: str = ""

    @property
    def backbone(self) -> str:
        """Path of the base model the CausalLM wraps (``"model"``, ``"transformer"``, ``"gpt_neox"``).

        It holds the decoder layers, so it is the first component of :attr:`layers`; its output's
        ``last_hidden_state`` is what the LM head projects.
        """
        return self.layers.split(".", 1)[0]

    @property
    def layers_attr(self) -> str:
        """Last component of :attr:`layers` (``"layers"`` or ``"h"``), as PEFT's ``layers_pattern``."""
        return self.layers.rsplit(".", 1)[-1]

    @property
    def linear_roles(self) -> dict:
        """All linears of a decoder layer: ``{"attn.q": "self_attn.q_proj", "mlp.down": ...}``."""
        out = {f"attn.{r}": p for r, p in self.attention.items()}
        out.update({f"mlp.{r}": p for r, p in self.mlp.items()})
        return out

    @property
    def lora_targets(self) -> list:
        """Leaf module names LoRA targets by default: every linear of the decoder layer."""
        return sorted({p.rsplit(".", 1)[-1] for p in self.linear_roles.values()})

    def layer_param_prefix(self, index: int) -> str:
        """State-dict prefix of decoder layer ``index``, e.g. ``"model.layers.3."``."""
        return f"{self.layers}.{index}."


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    """Resolve a dotted path, with an error naming the path when it does not exist."""
    try:
        return root.get_submodule(path)
    except AttributeError as exc:
        raise OffsiteError(f"module path '{path}' not found in {type(root).__name__}: {exc}") from None


def get_layers(model: nn.Module, family: Family) -> nn.ModuleList:
    """The decoder layer list of ``model``."""
    layers = get_submodule(model, family.layers)
    if not isinstance(layers, nn.ModuleList):
        raise OffsiteError(f"'{family.layers}' is a {type(layers).__name__}, expected nn.ModuleList")
    return layers


@contextlib.contextmanager
def skipping_layers(model: nn.Module, family: Family, skip: Iterable[int]):
    """Temporarily run ``model`` without the decoder layers at ``skip`` (LayerDrop-style training).

    Nothing is renumbered, so the caller must run without a KV cache (``use_cache=False``); the
    original layer list is restored on exit even when the body raises.
    """
    skip = set(skip)
    if not skip:
        yield model
        return
    layers = get_layers(model, family)
    parent_path, _, attr = family.layers.rpartition(".")
    parent = get_submodule(model, parent_path) if parent_path else model
    setattr(parent, attr, nn.ModuleList([m for i, m in enumerate(layers) if i not in skip]))
    try:
        yield model
    finally:
        setattr(parent, attr, layers)


def layer_linears(layer: nn.Module, family: Family) -> dict:
    """``{role: module}`` for every linear of one decoder layer (see :attr:`Family.linear_roles`)."""
    return {role: get_submodule(layer, path) for role, path in family.linear_roles.items()}


def set_layers(model: nn.Module, family: Family, layers: Sequence[nn.Module], origin: Sequence[int]) -> None:
    """Replace the decoder stack with ``layers`` and make the model consistent with it.

    ``origin[i]`` is the index that ``layers[i]`` had in the config being edited. Besides swapping
    the ModuleList this (1) renumbers every ``layer_idx`` attribute, because attention modules
    index the KV cache with it and ``generate()`` fails with an IndexError otherwise, (2) sets
    ``config.num_hidden_layers``, and (3) keeps the family's per-layer config lists
    (:attr:`Family.per_layer`: ``layer_types``, ``no_rope_layers``) aligned with the layers that remain,
    so each layer keeps the attention window and positions it had; in a family that places experts by
    layer index (Qwen2/3-MoE) ``mlp_only_layers`` is rewritten so each layer keeps its MLP kind.
    """
    if len(layers) != len(origin):
        raise OffsiteError(f"set_layers got {len(layers)} layers but {len(origin)} origin indices")
    parent_path, _, attr = family.layers.rpartition(".")
    parent = get_submodule(model, parent_path) if parent_path else model
    setattr(parent, attr, nn.ModuleList(list(layers)))
    for new_idx, layer in enumerate(layers):
        for mod in layer.modules():
            if hasattr(mod, "layer_idx"):
                mod.layer_idx = new_idx
    cfg = model.config
    if family.experts is not None and family.experts.sparse_step:
        dense = dense_mlp_layers(cfg)
        cfg.mlp_only_layers = [new for new, old in enumerate(origin) if old in dense]
        cfg.decoder_sparse_step = 1
    for name in family.per_layer:
        values = getattr(cfg, name, None)
        if isinstance(values, (list, tuple)) and len(values) == cfg.num_hidden_layers:
            setattr(cfg, name, [values[i] for i in origin])
    cfg.num_hidden_layers = len(layers)


def dense_mlp_layers(config) -> set:
    """Layer indices whose MLP is dense in a config that places experts by ``mlp_only_layers`` and
    ``decoder_sparse_step`` (transformers' own rule for Qwen2/3-MoE)."""
    step = int(getattr(config, "decoder_sparse_step", 1) or 1)
    only = set(getattr(config, "mlp_only_layers", None) or [])
    experts = int(getattr(config, "num_experts", 0) or 0)
    return {i for i in range(config.num_hidden_layers) if i in only or experts <= 0 or (i + 1) % step != 0}


def named_layer_parameters(model: nn.Module, family: Family, indices: Iterable[int]) -> dict:
    """``{full state-dict name: parameter}`` for the decoder layers at ``indices``."""
    layers = get_layers(model, family)
    out = {}
    for i in indices:
        for name, p in layers[i].named_parameters():
            out[family.layer_param_prefix(i) + name] = p
    return out


def count_parameters(module: nn.Module) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    seen, total = set(), 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def describe(family: Family) -> dict:
    """A JSON-able summary used by ``offsite families``."""
    return {
        "model_type": family.model_type,
        "layers": family.layers,
        "attention": family.attention,
        "mlp": family.mlp,
        "norms": list(family.norms),
        "final_norm": family.final_norm,
        "qkv_layout": family.qkv_layout,
        "conv1d": family.conv1d,
        "parallel_residual": family.parallel_residual,
        "experts": None if family.experts is None else dataclasses.asdict(family.experts),
        "notes": family.extra,
    }


__all__ = [
    "Family", "get_submodule", "get_layers", "layer_linears", "set_layers",
    "named_layer_parameters", "count_parameters", "describe",
]
