"""The language-model head as a step of its own: the hidden states before it, and the logits after.

A Hugging Face ``*ForCausalLM.forward`` runs its base model (the *backbone*: embeddings, decoder
layers, final norm) and projects **every** position through the LM head, ``(batch, seq, hidden) ->
(batch, seq, vocab)``. Fine-tuning on answers and scoring multiple choice only read a few of those
positions, and at a 49k-128k vocabulary the unread logits dominate memory and time. Splitting the
forward pass here lets :mod:`offsite.data.token_loss` run the backbone, pick the positions that count,
and project only those.

What happens between the backbone and the logits is the one HF internal this needs, and it is read
off the family: the backbone is the first component of :attr:`Family.layers` (``model``,
``transformer``, ``gpt_neox``), the head is ``model.get_output_embeddings()`` (bias included, as in
Phi and GPT-J), a final logit soft-cap (Gemma 2's ``final_logit_softcapping``) is
:attr:`Family.logit_softcap` and a logit divisor (Granite's ``logits_scaling``) :attr:`Family.logit_divisor`. ``tests/test_token_loss.py`` checks that the split forward gives the
model's own logits for every family in the catalog, so a family whose CausalLM does anything else
after its backbone (a logit scale, say) fails there instead of scoring wrongly.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.errors import OffsiteError
from . import get_family
from .base import Family, get_layers


def split_family(model: nn.Module) -> Family | None:
    """The family of ``model`` when its forward pass can be split at the head, else None.

    None means "use the model's own forward": an architecture outside the catalog, a wrapper whose
    paths are not the CausalLM's (a PEFT ``PeftModel``; offsite trains LoRA through the model it
    was injected into), or a model without an output embedding.
    """
    try:
        family = get_family(model)
        get_layers(model, family)  # the paths must be this model's own, not a wrapper's
        backbone = model.get_submodule(family.backbone)
    except (OffsiteError, AttributeError):
        return None
    head = getattr(model, "get_output_embeddings", lambda: None)()
    if backbone is model or not isinstance(head, nn.Module):
        return None
    return family


def final_hidden(model: nn.Module, family: Family, **inputs) -> torch.Tensor:
    """The backbone's last hidden states, the LM head's input: ``(batch, seq, hidden)``.

    Args:
        model: an HF causal LM of ``family``.
        family: from :func:`split_family`.
        **inputs: what the CausalLM's forward would get, minus ``labels`` (``input_ids``,
            ``attention_mask``, ``past_key_values``, ``use_cache``, ...).

    Returns:
        The hidden states; with ``use_cache`` the cache is left in ``past_key_values`` as the
        model updates it in place (a ``Cache`` object), so callers read it there.
    """
    out = model.get_submodule(family.backbone)(**inputs)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def project(model: nn.Module, family: Family, hidden: torch.Tensor) -> torch.Tensor:
    """Logits of ``hidden`` ``(..., hidden)`` -> ``(..., vocab)``, exactly as the model's forward makes them."""
    logits = model.get_output_embeddings()(hidden)
    divisor = getattr(model.config, family.logit_divisor, None) if family.logit_divisor else None
    if divisor is not None:  # Granite: logits / logits_scaling, as its forward does
        logits = logits / divisor
    cap = getattr(model.config, family.logit_softcap, None) if family.logit_softcap else None
    if cap is not None:  # the same three operations as HF, so the rounding is the same too
        logits = logits / cap
        logits = torch.tanh(logits)
        logits = logits * cap
    return logits
