"""Linear-level architecture knowledge: weight orientation, module replacement, MLP channel layout.

Kept apart from ``base.py`` (roles and layers) because only compressing emulators need it.
"""

from __future__ import annotations

from torch import nn

from .base import Family, get_submodule


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    """Replace the module at dotted ``path`` inside ``root`` with ``module``."""
    get_submodule(root, path)  # same error as a lookup when the path does not exist
    parent_path, _, attr = path.rpartition(".")
    parent = get_submodule(root, parent_path) if parent_path else root
    setattr(parent, attr, module)


def linear_weight(module: nn.Module, family: Family):
    """The weight of a decoder-layer linear in ``(out, in)`` orientation.

    GPT-2's ``Conv1D`` stores ``[in, out]`` (it computes ``x @ W + b``), so its weight comes back
    transposed (a view). ``nn.Linear``, and any replacement offsite installs, store ``(out, in)``.
    """
    if family.conv1d and not isinstance(module, nn.Linear):
        return module.weight.T
    return module.weight


def mlp_channel_blocks(family: Family) -> dict:
    """``{role: blocks}`` of the MLP linears whose *output rows* are intermediate channels.

    ``blocks`` is how many channel-sized blocks the rows stack: 2 for Phi-3's fused ``gate_up``
    (rows ``[gate; up]``, split by ``chunk(2)`` in its forward), else 1. The other MLP role,
    ``mlp.down``, reads the channels as its *input columns*. Removing row j of every block and
    column j of ``down`` removes exactly channel j's contribution, because every supported MLP
    activation (SiLU/GELU gating, GELU, ReLU) acts elementwise per channel.
    """
    return {f"mlp.{role}": (2 if role == "gate_up" else 1) for role in family.mlp if role != "down"}


__all__ = ["set_submodule", "linear_weight", "mlp_channel_blocks"]
