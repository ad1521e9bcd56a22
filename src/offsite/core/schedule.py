"""Learning-rate schedules and optimizer state as safetensors (checkpoints never pickle)."""

from __future__ import annotations

import math

import torch

from .errors import OffsiteError

SCHEDULES = ("cosine", "linear", "constant")


def lr_lambda(schedule: str, warmup: int, total: int):
    """Multiplier of the peak lr at a given step: linear warmup, then cosine/linear decay to 0."""
    if schedule not in SCHEDULES:
        raise OffsiteError(f"unknown schedule {schedule!r}; allowed: {', '.join(SCHEDULES)}")

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant" or total <= warmup:
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress

    return factor


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple:
    """Flatten an optimizer's state into ``({name: tensor}, param_groups)`` for safetensors + JSON."""
    state = optimizer.state_dict()
    tensors = {}
    for idx, slots in state["state"].items():
        for key, value in slots.items():
            tensors[f"{idx}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return tensors, state["param_groups"]


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict, param_groups: list) -> None:
    """Inverse of :func:`optimizer_tensors`."""
    state: dict = {}
    for name, value in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})
