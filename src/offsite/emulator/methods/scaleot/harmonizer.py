"""ScaleOT's harmonizer: a small residual block that stands where a decoder layer stood.

Paper: Yao et al., "ScaleOT: Privacy-Utility-Scalable Offsite-Tuning with Dynamic LayerReplace and
Selective Rank Compression", AAAI 2025 (arXiv 2412.09812). The paper only says "lightweight
network"; the form here, ``h = x + up(act(down(norm(x))))`` with a bottleneck ``rank``, follows
the residual low-rank FFN that third-party notes describe (unconfirmed against the PDF).

Choices: ``up`` starts at zero, so a fresh harmonizer is the identity, i.e. exactly "drop this
layer" (LayerDrop is the starting point that training improves on); the norm is an RMSNorm with a
learnable scale, which every family's hidden states tolerate; the activation is GELU.

:class:`HarmonizerLayer` takes any call the family's model loop makes to a decoder layer (hidden
states first, then whatever positional and keyword arguments: masks, rotary tables, caches) and
returns what that family's layers return in the installed transformers
(``families.layer_returns_tuple``). It never touches the KV
cache, so cached generation is only exact when position 0 is not a harmonizer (the cache's
length is read from layer 0); with adapter layers at the bottom, as in OT, it never is.
"""

from __future__ import annotations

import torch
from torch import nn

from ....core.errors import OffsiteError
from ....families import layer_call_attributes, layer_input_hidden

DEFAULT_RANK = 64


class HarmonizerLayer(nn.Module):
    """``x + up(gelu(down(rmsnorm(x))))`` with the call convention of a decoder layer.

    Args:
        hidden_size: width of the hidden states.
        rank: bottleneck width (``down``: hidden -> rank, ``up``: rank -> hidden).
        returns_tuple: return ``(hidden,)`` instead of ``hidden`` (as BLOOM's and Falcon's layers do).
        attributes: plain attributes copied from the replaced layer (the model loop may read them).
    """

    def __init__(self, hidden_size: int, rank: int, returns_tuple: bool = False, attributes: dict | None = None):
        super().__init__()
        if rank < 1:
            raise OffsiteError(f"harmonizer rank must be >= 1, got {rank}")
        self.norm = nn.RMSNorm(hidden_size, eps=1e-6)
        self.down = nn.Linear(hidden_size, rank)
        self.act = nn.GELU()
        self.up = nn.Linear(rank, hidden_size)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.returns_tuple = returns_tuple
        for key, value in (attributes or {}).items():
            if not hasattr(self, key):
                setattr(self, key, value)

    def block(self, hidden: torch.Tensor) -> torch.Tensor:
        """The residual block on ``(batch, seq, hidden)``; same shape out."""
        normed = self.norm(hidden.to(self.down.weight.dtype))
        return hidden + self.up(self.act(self.down(normed))).to(hidden.dtype)

    def forward(self, *args, **kwargs):
        out = self.block(layer_input_hidden(args, kwargs))
        return (out,) if self.returns_tuple else out


def make_harmonizer(layer: nn.Module, hidden_size: int, rank: int, returns_tuple: bool) -> HarmonizerLayer:
    """A fresh (identity) harmonizer able to replace ``layer``, on its device and dtype.

    ``returns_tuple`` is the model's layer convention, ``families.layer_returns_tuple(model, family)``.
    """
    ref = next(layer.parameters(), None)
    module = HarmonizerLayer(hidden_size, rank, returns_tuple, layer_call_attributes(layer))
    if ref is not None:
        module.to(device=ref.device, dtype=ref.dtype)
    return module


def is_harmonizer(module: nn.Module) -> bool:
    return isinstance(module, HarmonizerLayer)
