"""Decoder layers as black boxes: their call convention, hidden-state capture, and swapping.

Emulator methods that train or measure layers (distillation, CRaSh, ScaleOT) need three things
without knowing HF internals: (1) the hidden states entering or leaving given layers during an
ordinary ``model(input_ids)`` call, (2) a module that can stand where a decoder layer stands, and
(3) a way to swap one layer for another. Hooks on the members of the decoder ``ModuleList`` give
(1) for every family, because each family's model loop calls ``layer(hidden_states, ...)`` and
reads the new hidden states from the result; only the *shape* of that result differs (a tensor,
or a tuple whose first item is the tensor: BLOOM and Falcon in transformers 5.24). That shape is
read off the installed transformers by :func:`layer_returns_tuple` rather than declared per family,
because it changes between releases (GPT-J returned a tuple up to 5.23 and a tensor from 5.24), and
a stand-in that guesses wrong is silently wrong: a loop that takes ``output[0]`` of a tensor reads
the first batch row. Running the model itself (rather than calling layers one by one) keeps position
embeddings, rotary tables, ALiBi and attention masks exactly as the model computes them.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..core.errors import OffsiteError
from .base import Family, get_layers
from .catalog import TINY_CONFIGS


def layer_input_hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states a decoder layer was called with, ``(batch, seq, hidden)``.

    Every family passes them first, positionally or as ``hidden_states=``.
    """
    if args:
        return args[0]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    raise OffsiteError("a decoder layer was called without hidden states (neither positional nor hidden_states=)")


def layer_output_hidden(output) -> torch.Tensor:
    """The hidden states a decoder layer returned, ``(batch, seq, hidden)`` (tensor or tuple[0])."""
    return output[0] if isinstance(output, (tuple, list)) else output


class _ProbeDone(Exception):
    """Raised from a probe hook to stop the forward pass once the first layer has answered."""


_RETURNS_TUPLE: dict[type, bool] = {}  # decoder-layer class -> its convention, for this process


def layer_returns_tuple(model: nn.Module, family: Family) -> bool:
    """Whether ``model``'s decoder layers return ``(hidden, ...)`` rather than ``hidden``.

    Probed once per layer class: a one-token forward pass that stops (by raising from a forward
    hook) as soon as the first transformers-defined layer returns, so it costs the embedding and
    one layer. Layers already replaced by offsite modules are skipped: the model loop, not the
    stand-in, fixes the convention. A model with weights on ``meta`` (a package skeleton before its
    weights are assigned, a streamed build) cannot run, and transformers >= 5.25 reads values while
    building masks, so it is probed through a one-layer twin of the family's tiny config instead,
    which must have the same layer class.
    """
    layers = get_layers(model, family)
    native = next((layer for layer in layers if type(layer).__module__.startswith("transformers")), None)
    if native is None:
        raise OffsiteError(f"no decoder layer of this {family.model_type} model comes from transformers; "
                           "the layer call convention cannot be read off")
    cls = type(native)
    if cls not in _RETURNS_TUPLE:
        if any(p.device.type == "meta" for p in model.parameters()):
            twin = _tiny_twin(family)
            native = next(iter(get_layers(twin, family)))
            if type(native) is not cls:
                raise OffsiteError(f"the {family.model_type} model's layers are {cls.__name__} but the family's "
                                   f"tiny config builds {type(native).__name__}; the layer call convention cannot "
                                   "be read off a model whose weights are not loaded")
            model = twin
        _RETURNS_TUPLE[cls] = _probe_returns_tuple(model, native, family)
    return _RETURNS_TUPLE[cls]


def _tiny_twin(family: Family) -> nn.Module:
    """A one-layer random model of the family's tiny config (a few thousand parameters)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(family.model_type, num_hidden_layers=1, **TINY_CONFIGS[family.model_type])
    with torch.random.fork_rng(devices=[]):  # a probe must not move the caller's random stream
        twin = AutoModelForCausalLM.from_config(config).eval()
    if any(p.device.type == "meta" for p in twin.parameters()):
        # Built inside the caller's init_empty_weights (a package skeleton): give it real, zero
        # storage. Only the type of the first layer's output is read, never a value.
        twin.to_empty(device="cpu")
        with torch.no_grad():
            for tensor in [*twin.parameters(), *twin.buffers()]:
                tensor.zero_()
    return twin


def _probe_returns_tuple(model: nn.Module, native: nn.Module, family: Family) -> bool:
    """Run ``model`` on one token until ``native`` returns; whether it returned a tuple."""
    seen = {}

    def hook(module, args, output):
        seen["tuple"] = isinstance(output, (tuple, list))
        raise _ProbeDone

    ref = next(model.parameters())
    handle = native.register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=ref.device), use_cache=False)
    except _ProbeDone:
        pass
    finally:
        handle.remove()
    if "tuple" not in seen:
        raise OffsiteError(f"probing the {family.model_type} decoder layers: the forward pass never reached "
                           f"a {type(native).__name__}")
    return seen["tuple"]


def layer_call_attributes(layer: nn.Module) -> dict:
    """Plain attributes of a decoder layer (``attention_type``, ``hidden_size``, ...).

    A module standing in for the layer copies them, because some model loops read attributes of
    the layer object (e.g. which attention mask to pass) before calling it.
    """
    return {k: v for k, v in vars(layer).items()
            if not k.startswith("_") and k != "training" and isinstance(v, (str, int, float, bool))}


def replace_layer(model: nn.Module, family: Family, index: int, module: nn.Module) -> nn.Module:
    """Put ``module`` at decoder position ``index``; returns the module that was there.

    Unlike :func:`set_layers` the depth is unchanged, so nothing is renumbered.
    """
    layers = get_layers(model, family)
    if not 0 <= index < len(layers):
        raise OffsiteError(f"layer position {index} is outside 0..{len(layers) - 1}")
    old = layers[index]
    layers[index] = module
    return old


@contextlib.contextmanager
def capture_hidden(model: nn.Module, family: Family, outputs_of=(), inputs_of=()):
    """Record hidden states at decoder positions during forward passes of ``model``.

    Args:
        outputs_of: positions whose *output* hidden states are recorded.
        inputs_of: positions whose *input* hidden states are recorded.

    Yields:
        A dict filled on every forward: ``{("out", i): tensor, ("in", j): tensor}``, each
        ``(batch, seq, hidden)``, overwritten by the next forward. Tensors keep their autograd
        graph, so they can enter a loss. Hooks are removed on exit, also on errors.
    """
    layers = get_layers(model, family)
    store, handles = {}, []

    def out_hook(pos):
        def hook(module, args, output):
            store[("out", pos)] = layer_output_hidden(output)
        return hook

    def in_hook(pos):
        def hook(module, args, kwargs):
            store[("in", pos)] = layer_input_hidden(args, kwargs)
        return hook

    try:
        for pos in outputs_of:
            handles.append(layers[pos].register_forward_hook(out_hook(pos)))
        for pos in inputs_of:
            handles.append(layers[pos].register_forward_pre_hook(in_hook(pos), with_kwargs=True))
        yield store
    finally:
        for handle in handles:
            handle.remove()


__all__ = ["layer_input_hidden", "layer_output_hidden", "layer_returns_tuple", "layer_call_attributes",
           "replace_layer", "capture_hidden"]
