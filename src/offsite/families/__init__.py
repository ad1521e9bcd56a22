"""Architecture families keyed on ``config.model_type`` (the only module that knows HF internals)."""

from __future__ import annotations

from ..core.errors import OffsiteError
from .base import (Family, count_parameters, describe, get_layers, get_submodule, layer_linears, skipping_layers,
                   named_layer_parameters, set_layers)
from .catalog import FAMILIES, TEXT_INSIDE, TINY_CONFIGS
from .layers import (capture_hidden, layer_call_attributes, layer_input_hidden, layer_output_hidden,
                     layer_returns_tuple, replace_layer)


def supported_model_types() -> list:
    """Sorted list of the ``config.model_type`` values offsite supports."""
    return sorted(FAMILIES)


def get_family(obj) -> Family:
    """The family of a model, a config, or a ``model_type`` string.

    Raises:
        OffsiteError: the architecture is not supported; the message lists the supported types.
    """
    config = getattr(obj, "config", obj)
    model_type = obj if isinstance(obj, str) else getattr(config, "model_type", None)
    if model_type in TEXT_INSIDE:
        raise OffsiteError(
            f"model_type={model_type!r} is a multimodal model; offsite tunes the language model inside it: "
            "write it alone with `offsite models extract-text MODEL --out DIR` and use DIR"
        )
    if model_type not in FAMILIES:
        raise OffsiteError(
            f"unsupported architecture model_type={model_type!r}; supported: {', '.join(supported_model_types())}"
        )
    return FAMILIES[model_type]


def tiny_config(model_type: str, num_layers: int = 6, **overrides):
    """A tiny HF config of ``model_type`` with ``num_layers`` decoder layers (tests, demos)."""
    from transformers import AutoConfig

    get_family(model_type)
    return AutoConfig.for_model(model_type, num_hidden_layers=num_layers, **{**TINY_CONFIGS[model_type], **overrides})


__all__ = [
    "Family", "FAMILIES", "TEXT_INSIDE", "get_family", "supported_model_types", "tiny_config", "get_layers", "set_layers",
    "skipping_layers",
    "layer_linears", "get_submodule", "named_layer_parameters", "count_parameters", "describe",
    "capture_hidden", "layer_call_attributes", "layer_input_hidden", "layer_output_hidden", "layer_returns_tuple",
    "replace_layer",
]
