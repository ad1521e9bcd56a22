"""The language model inside a multimodal checkpoint, written alone as a stock causal-LM folder.

A Gemma 3 checkpoint (``model_type`` ``gemma3``) is a vision tower, a projector and a Gemma 3 text
model (``gemma3_text``); offsite-tuning concerns the text model only. :func:`extract_text` copies its
backbone and head, tensor for tensor, into the text family's own CausalLM class and checks that both
give the same logits on text before writing, so every workflow then works on the result. Where the
text model lies is family knowledge (:data:`offsite.families.TEXT_INSIDE`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..artifacts.folder import atomic_folder
from ..core.errors import OffsiteError
from ..families import TEXT_INSIDE, get_family, get_submodule
from .dtypes import no_init_weights
from .loading import load_config, load_model


def extract_text(model: str, out, dtype: str = "auto") -> Path:
    """Write the language model of the multimodal checkpoint ``model`` to the new folder ``out``.

    Args:
        model: a multimodal folder or hub id whose ``model_type`` is in ``TEXT_INSIDE``.
        out: the folder to write (must not exist, or be empty); written atomically.
        dtype: load dtype (``"auto"``: the checkpoint's).

    Returns:
        ``out``.

    Raises:
        OffsiteError: the model is not a known multimodal wrapper, its text model is not a supported
            family, ``out`` is taken, or the copy does not reproduce the text logits.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OffsiteError(f"{out} already exists and is not an empty folder; pick another --out")
    config = load_config(model)
    inside = TEXT_INSIDE.get(getattr(config, "model_type", None))
    if inside is None:
        raise OffsiteError(f"{model} is model_type={config.model_type!r}; extract-text reads the multimodal types "
                           f"{', '.join(sorted(TEXT_INSIDE))}")
    text_config = getattr(config, inside.text_config)
    family = get_family(text_config)  # the text model must be a family offsite supports
    full, tokenizer = load_model(model, dtype=dtype, any_architecture=True)
    # Parameters on meta (assigned from the loaded model below, no copy); computed buffers (rotary tables) real.
    with init_empty_weights(include_buffers=False), no_init_weights():
        text = AutoModelForCausalLM.from_config(text_config, dtype=next(full.parameters()).dtype)
    sources = {family.backbone: get_submodule(full, inside.backbone), "lm_head": get_submodule(full, inside.head)}
    tensors = {}
    for name in text.state_dict():
        root, _, rest = name.partition(".")
        tensors[name] = sources[root].state_dict()[rest]
    text.load_state_dict(tensors, strict=True, assign=True)
    text.tie_weights()
    text.eval()
    ids = torch.arange(3, 3 + min(16, text_config.vocab_size - 3)).unsqueeze(0)
    with torch.no_grad():
        same = torch.equal(full(input_ids=ids).logits, text(input_ids=ids).logits)
    if not same:
        raise OffsiteError(f"the text model copied out of {model} does not give the multimodal model's logits on "
                           "text; this transformers version lays the model out differently than offsite expects")
    text.config.architectures = [type(text).__name__]
    with atomic_folder(out) as tmp:
        text.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out


__all__ = ["extract_text"]
