"""Loading base models and tokenizers from a local folder or a Hugging Face hub id.

Hub ids go through the normal ``from_pretrained`` machinery (and its cache), so they work wherever
the hub is reachable; a local folder always works. A ``.gguf`` file is loaded dequantised
(:mod:`offsite.model.gguf_input`). Unsupported architectures are refused from the config alone, before any
weight is read.
"""

from __future__ import annotations

import os
from pathlib import Path


from ..core.errors import OffsiteError
from ..families import get_family
from .dtypes import resolve_dtype
from .gguf_input import gguf_config, gguf_tokenizer, is_gguf, load_gguf

def load_config(name_or_path: str):
    """Read a model config, with one clear error when the folder or hub id cannot be resolved."""
    from transformers import AutoConfig

    if is_gguf(name_or_path):
        return gguf_config(name_or_path)
    local = Path(name_or_path)
    if local.exists() and not (local / "config.json").is_file():
        raise OffsiteError(f"{name_or_path} exists but has no config.json; expected a Hugging Face model folder")
    try:
        return AutoConfig.from_pretrained(name_or_path)
    except OSError as exc:
        hint = " (the hub is offline here: HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") else ""
        raise OffsiteError(f"cannot load model '{name_or_path}': not a local folder and not resolvable as a hub id"
                           f"{hint}: {str(exc).splitlines()[0]}") from None


def load_model(name_or_path: str, dtype="auto", device: str | None = None, any_architecture: bool = False):
    """Load a supported causal LM and, when present, its tokenizer.

    Args:
        name_or_path: local folder, hub id, or ``.gguf`` file (dequantised; ``"auto"`` is fp32 there).
        dtype: ``"auto"`` (the checkpoint's dtype), ``"float32"``, ``"bfloat16"``, ``"float16"``.
        device: where to put the model (default CPU).
        any_architecture: accept a causal LM outside offsite's families (scoring an untouched model
            needs no knowledge of its layers); otherwise unsupported ones are refused before any
            weight is read.

    Returns:
        ``(model, tokenizer_or_None)``; the model is in eval mode.
    """
    from transformers import AutoModelForCausalLM

    if is_gguf(name_or_path):
        return load_gguf(name_or_path, dtype=dtype, device=device)
    config = load_config(name_or_path)
    if not any_architecture:
        get_family(config)  # refuse unsupported architectures before reading weights
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=resolve_dtype(dtype))
    if device:
        model.to(device)
    model.eval()
    return model, load_tokenizer(name_or_path)


def load_tokenizer(name_or_path: str):
    """The tokenizer stored with a model, or ``None`` when there is none."""
    from transformers import AutoTokenizer

    if is_gguf(name_or_path):
        return gguf_tokenizer(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError, TypeError):
        return None
