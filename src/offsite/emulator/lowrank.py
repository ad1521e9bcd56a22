"""Compressed replacements for decoder-layer linears: low-rank factors and pruned MLP channels.

Shared by every method that shrinks matrices (GradOT's rank decomposition and channel pruning,
ScaleOT's selective rank compression). Replacements are installed *inside* the HF decoder layer
(the attention/MLP modules only call their projections), so no HF forward is copied.

Choices:

* A low-rank matrix ``W ≈ up @ down`` (``up (out, r)``, ``down (r, in)``) is stored as two factors
  with singular values split evenly (``up = U sqrt(S)``, ``down = sqrt(S) V^T``), which keeps both
  factors on the same scale for fine-tuning-free use and for fp16/bf16 storage.
* GPT-2's ``Conv1D`` (weight ``[in, out]``) is replaced by :class:`LowRankLinear` or a plain
  ``nn.Linear`` (weight ``(out, in)``); forward results are identical.
* A fused ``qkv`` projection is factorised as *one* matrix ``(q+k+v rows, hidden)``: the rank is
  shared across q, k and v, whatever the row layout (concat, per-head interleaved, Falcon), since
  an SVD is indifferent to row order. Splitting would need the layout and three SVDs for no gain
  in what the emulator can express.
* Plan entries are plain data: ``{"layer": full_index, "role": "attn.q", "rank": r}`` for factors
  or ``{"layer": ..., "role": ..., "shape": [out, in]}`` for a dense ``nn.Linear``;
  :func:`restructure_linears` rebuilds those shapes on a fresh skeleton before a strict load.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import OffsiteError
from ..families import Family, get_layers, get_submodule
from ..families.linears import linear_weight, mlp_channel_blocks, set_submodule
from ..families.moe import resize_experts


class LowRankLinear(nn.Module):
    """``y = up @ (down @ x) + bias``: a linear of rank ``rank`` with the interface of ``nn.Linear``.

    Args:
        in_features, out_features: as ``nn.Linear``.
        rank: inner dimension, ``1 <= rank <= min(in, out)``.
        bias: keep a bias ``(out,)``.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, dtype=None, device=None):
        super().__init__()
        if not 1 <= rank <= min(in_features, out_features):
            raise OffsiteError(f"rank {rank} must be between 1 and min(out, in)={min(in_features, out_features)}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        kw = {"dtype": dtype, "device": device}
        self.down = nn.Parameter(torch.zeros(rank, in_features, **kw))
        self.up = nn.Parameter(torch.zeros(out_features, rank, **kw))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (..., in) -> (..., out)``."""
        return F.linear(F.linear(x, self.down), self.up, self.bias)

    def dense_weight(self) -> torch.Tensor:
        """The equivalent dense weight ``(out, in)``."""
        return self.up @ self.down

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, " \
               f"bias={self.bias is not None}"


def weight_svd(weight: torch.Tensor):
    """Thin SVD in float64: ``(U (out, k), S (k,), Vh (k, in))``, ``k = min(out, in)``, S descending."""
    return torch.linalg.svd(weight.detach().double(), full_matrices=False)


def truncated_svd(weight: torch.Tensor, rank: int | None = None, components=None, svd=None):
    """Low-rank factors of ``weight (out, in)`` from chosen singular components.

    Args:
        weight: the matrix, ``(out, in)``.
        rank: keep the top ``rank`` components (plain truncation), or
        components: indices (into descending singular values) of the components to keep.
        svd: a precomputed :func:`weight_svd` result.

    Returns:
        ``(up (out, r), down (r, in))`` in ``weight``'s dtype with ``up @ down ≈ weight``.
    """
    u, s, vh = svd if svd is not None else weight_svd(weight)
    if (rank is None) == (components is None):
        raise OffsiteError("truncated_svd takes exactly one of rank= or components=")
    full = s.numel()
    idx = torch.arange(rank) if components is None else torch.as_tensor(list(components), dtype=torch.long)
    if idx.numel() == 0 or idx.numel() > full or int(idx.min()) < 0 or int(idx.max()) >= full:
        raise OffsiteError(f"rank/components {idx.tolist()[:8]} invalid for a matrix of rank at most {full}")
    idx = idx.to(s.device)  # checked on the CPU above (no device sync); indexes the factors where they lie
    root = s[idx].sqrt()
    up, down = u[:, idx] * root, root[:, None] * vh[idx]
    return up.to(weight.dtype), down.to(weight.dtype)


def _bias(module: nn.Module):
    return getattr(module, "bias", None)


def make_low_rank(module: nn.Module, family: Family, up: torch.Tensor, down: torch.Tensor) -> LowRankLinear:
    """A :class:`LowRankLinear` with factors ``up (out, r)``, ``down (r, in)`` and ``module``'s bias."""
    bias = _bias(module)
    new = LowRankLinear(down.shape[1], up.shape[0], up.shape[1], bias is not None, up.dtype, up.device)
    with torch.no_grad():
        new.up.copy_(up)
        new.down.copy_(down)
        if bias is not None:
            new.bias.copy_(bias)
    return new


def make_dense(weight: torch.Tensor, bias) -> nn.Linear:
    """An ``nn.Linear`` holding ``weight (out, in)`` and ``bias (out,)`` or None."""
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype,
                    device=weight.device)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    return new


def replace_linear(layer: nn.Module, family: Family, role: str, module: nn.Module) -> None:
    """Install ``module`` as the linear ``role`` (e.g. ``"attn.q"``) of one decoder layer."""
    if role not in family.linear_roles:
        raise OffsiteError(f"unknown linear role {role!r} for {family.model_type}; roles: {sorted(family.linear_roles)}")
    set_submodule(layer, family.linear_roles[role], module)


def prune_mlp_channels(layer: nn.Module, family: Family, keep) -> None:
    """Keep only the intermediate channels ``keep`` (sorted indices) of a layer's MLP, in place.

    Rows of ``up``/``gate`` (both halves of a fused ``gate_up``) and columns of ``down`` are
    kept; the replacements are ``nn.Linear``.
    """
    keep = torch.as_tensor(sorted(int(k) for k in keep), dtype=torch.long)
    linears = {r: get_submodule(layer, family.linear_roles[r]) for r in family.linear_roles}
    down = linear_weight(linears["mlp.down"], family)
    channels = down.shape[1]
    if keep.numel() == 0 or int(keep[0]) < 0 or int(keep[-1]) >= channels or len(set(keep.tolist())) != keep.numel():
        raise OffsiteError(f"kept MLP channels must be distinct indices in 0..{channels - 1}, at least one")
    keep = keep.to(down.device)  # checked on the CPU above; the slicing then stays on the weights' device
    with torch.no_grad():
        for role, blocks in mlp_channel_blocks(family).items():
            module = linears[role]
            rows = torch.cat([keep + b * channels for b in range(blocks)])
            bias = _bias(module)
            replace_linear(layer, family, role, make_dense(linear_weight(module, family)[rows].clone(),
                                                           None if bias is None else bias[rows].clone()))
        replace_linear(layer, family, "mlp.down", make_dense(down[:, keep].clone(), _bias(linears["mlp.down"])))


def restructure_linears(model: nn.Module, family: Family, plan: dict) -> None:
    """Reshape a fresh emulator skeleton's linears as the plan's ``"linears"`` / ``"mlp"`` entries say.

    ``plan["layers"]`` maps emulator positions to full-model indices; entries name full-model
    indices. Values are placeholders: a strict load of the saved tensors follows.
    """
    position = {e["source"]: pos for pos, e in enumerate(plan["layers"])}
    layers = get_layers(model, family)
    for entry in plan.get("mlp", []):
        layer = layers[position[entry["layer"]]]
        if "experts" in entry:
            resize_experts(layer, family, len(entry["experts"][0]))
        else:
            prune_mlp_channels(layer, family, range(len(entry["channels"])))
    for entry in plan.get("linears", []):
        layer = layers[position[entry["layer"]]]
        old = get_submodule(layer, family.linear_roles[entry["role"]])
        w = linear_weight(old, family)
        out_f, in_f = entry.get("shape", w.shape)
        if "rank" in entry:
            new = LowRankLinear(in_f, out_f, int(entry["rank"]), _bias(old) is not None, w.dtype, w.device)
        else:
            new = make_dense(torch.zeros(out_f, in_f, dtype=w.dtype, device=w.device), _bias(old))
        replace_linear(layer, family, entry["role"], new)
