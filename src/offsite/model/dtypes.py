"""Dtype names a user may give, and building a model skeleton without initialising its weights."""

from __future__ import annotations

import torch

from ..core.errors import OffsiteError

DTYPES = {"auto": "auto", "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(name):
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise OffsiteError(f"unknown dtype {name!r}; allowed: {', '.join(DTYPES)}")
    return DTYPES[name]


def no_init_weights():
    """transformers' context that turns every weight initialiser into a no-op (it moved in v5): for
    skeletons whose weights are assigned from files right after (package loading, streaming)."""
    try:
        from transformers.initialization import no_init_weights as context
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights as context
    return context()
