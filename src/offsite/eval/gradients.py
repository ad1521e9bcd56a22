"""Adapter-gradient agreement between the full model and an emulator (GradOT's utility proxy).

Offsite-tuning works when the adapter update computed through the emulator points where the full
model's would. This measures it directly: the gradient of the mean next-token loss on some text
w.r.t. the adapter layers' parameters, once through the full model and once through the emulator,
compared by cosine similarity (overall and per adapter layer).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core.device import model_device
from ..families import Family, get_layers


def adapter_gradient(model, family: Family, positions, batches) -> list:
    """Per-layer flattened gradients (float64) of the mean LM loss w.r.t. the layers at ``positions``.

    Args:
        model: a causal LM (its parameters' ``requires_grad`` flags are restored afterwards).
        family: its family.
        positions: decoder-layer positions in ``model``.
        batches: ``LongTensor (batch, seq)`` list; the loss is averaged over all their tokens.

    Returns:
        ``[(layer_numel,) tensor per position]``.
    """
    layers = get_layers(model, family)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    params = [list(layers[i].parameters()) for i in positions]
    device = model_device(model)
    try:
        for p, _ in flags:
            p.requires_grad_(False)
            p.grad = None
        for group in params:
            for p in group:
                p.requires_grad_(True)
        tokens = sum(ids[:, 1:].numel() for ids in batches)
        for ids in batches:
            ids = ids.to(device)
            logits = model(input_ids=ids, use_cache=False).logits
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum")
            (loss / tokens).backward()
        return [torch.cat([p.grad.detach().double().flatten() for p in group]) for group in params]
    finally:
        for p, flag in flags:
            p.grad = None
            p.requires_grad_(flag)


def adapter_gradient_cosine(full, emulator, family: Family, adapter: list, layer_map: list, batches) -> dict:
    """Cosine similarity of the adapter gradient through the emulator vs through the full model.

    Args:
        full: the full model.
        emulator: the emulator model.
        adapter: full-model indices of the adapter layers.
        layer_map: full-model index of each emulator layer.
        batches: text batches, ``LongTensor (batch, seq)``.

    Returns:
        ``{"overall": cos, "per_layer": {full_index: cos}}``.
    """
    emu_positions = [layer_map.index(i) for i in adapter]
    g_full = adapter_gradient(full, family, adapter, batches)
    g_emu = adapter_gradient(emulator, family, emu_positions, batches)
    cos = lambda a, b: float(F.cosine_similarity(a, b, dim=0))  # noqa: E731
    return {"overall": cos(torch.cat(g_full), torch.cat(g_emu)),
            "per_layer": {i: cos(a, b) for i, a, b in zip(adapter, g_full, g_emu)}}
