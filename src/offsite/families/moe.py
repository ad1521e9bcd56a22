"""Mixture-of-experts layers: the fused expert layout, an exact unfused view, and per-expert pruning.

transformers (5.x) stores a sparse MoE block's experts **fused**: one ``gate_up_proj`` and one
``down_proj`` parameter over all experts, plus a router (``mlp.gate`` or ``mlp.router``) that picks
``top_k`` experts per token and weights their outputs. Families differ in how the fused tensors lie:

* Mixtral, Qwen2/3-MoE, OLMoE: ``gate_up_proj [E, 2I, H]`` (each expert's rows ``[gate; up]``, an
  ``(out, in)`` matrix) and ``down_proj [E, H, I]``; the expert computes ``act(gate) * up``.
* GPT-OSS: ``gate_up_proj [E, H, 2I]`` (``(in, out)``; gate and up *interleaved*: columns 0, 2, 4 ...
  are gate, 1, 3, 5 ... up), ``down_proj [E, I, H]``, both with biases, and a clamped, shifted
  gating (``GptOssExperts._apply_gate``).

:class:`offsite.families.base.Experts` declares that layout per family. Two things are built on it: :func:`unfused_experts`
swaps a layer's fused experts for :class:`UnfusedExperts`, which computes the same function through one
small module per expert projection, so per-linear statistics hooks (GradOT's K-FAC factors) see each
expert's own tokens; and :func:`prune_experts` keeps a chosen set of intermediate channels in every
expert. Every expert keeps the *same number* of channels, because the fused tensors are rectangular;
*which* channels is each expert's own choice. The router, a shared expert and its gate are never
touched here.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.nn import functional as F

from ..core.errors import OffsiteError
from .base import Experts, Family, get_submodule
from .linears import set_submodule


def experts_module(layer: nn.Module, family: Family) -> nn.Module | None:
    """The fused experts module of one decoder layer, or None (dense family, or a dense layer of an MoE one)."""
    if family.experts is None:
        return None
    try:
        module = get_submodule(layer, family.experts.path)
    except OffsiteError:
        return None
    return module if isinstance(getattr(module, "gate_up_proj", None), torch.Tensor) else None


def expert_matrices(module: nn.Module, spec: Experts, e: int) -> dict:
    """Expert ``e``'s three projections as ``(out, in)`` views, and their biases (or None).

    Returns:
        ``{"gate": (I, H), "up": (I, H), "down": (H, I), "gate_bias": (I,), "up_bias": (I,), "down_bias": (H,)}``.
    """
    gate_up, down = module.gate_up_proj[e], module.down_proj[e]
    if spec.in_out:
        gate_up, down = gate_up.T, down.T
    half = gate_up.shape[0] // 2
    gate, up = (gate_up[0::2], gate_up[1::2]) if spec.interleaved else (gate_up[:half], gate_up[half:])
    out = {"gate": gate, "up": up, "down": down, "gate_bias": None, "up_bias": None, "down_bias": None}
    if spec.biases:
        b = module.gate_up_proj_bias[e]
        out["gate_bias"], out["up_bias"] = (b[0::2], b[1::2]) if spec.interleaved else (b[:half], b[half:])
        out["down_bias"] = module.down_proj_bias[e]
    return out


CHANNEL_MULTIPLE = 8
"""Kept channels per expert are a multiple of this: transformers runs fused experts through
``torch.nn.functional.grouped_mm`` where it can, which needs 16-byte strides (8 bf16 or 4 fp32 values)."""


def aligned_channels(keep: int, channels: int) -> int:
    """``keep`` rounded to the nearest multiple of :data:`CHANNEL_MULTIPLE` (at least one multiple, at most ``channels``)."""
    return min(channels, max(CHANNEL_MULTIPLE, CHANNEL_MULTIPLE * round(keep / CHANNEL_MULTIPLE)))


def channel_count(module: nn.Module, spec: Experts) -> int:
    """Intermediate channels per expert (I)."""
    return int(module.down_proj.shape[1 if spec.in_out else 2])


class _Projection(nn.Module):
    """``x @ weight.T + bias`` on views of the fused tensors: a hook point with nothing of its own."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight, self.bias = weight, bias

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class UnfusedExperts(nn.Module):
    """The experts of one fused module, one :class:`_Projection` per expert and role; same outputs.

    Called like the fused module: ``(hidden (T, H), top_k_index (T, k), top_k_weights (T, k)) -> (T, H)``.
    """

    def __init__(self, fused: nn.Module, spec: Experts):
        super().__init__()
        self.fused, self.spec = [fused], spec  # a list: not a submodule, so its parameters are not listed twice
        self.count = int(fused.gate_up_proj.shape[0])
        self.projections = nn.ModuleDict()
        for e in range(self.count):
            m = expert_matrices(fused, spec, e)
            for role in ("gate", "up", "down"):
                self.projections[f"{e}_{role}"] = _Projection(m[role], m[f"{role}_bias"])

    def _gated(self, gate, up):
        fused = self.fused[0]
        if self.spec.interleaved:  # GPT-OSS: its own clamped gating reads the interleaved layout
            return fused._apply_gate(torch.stack((gate, up), dim=-1).flatten(-2))
        return fused.act_fn(gate) * up

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for e in range(self.count):
            token, slot = torch.where(top_k_index == e)
            if token.numel() == 0:
                continue  # an expert no token reaches runs nothing, as in the fused module
            x = hidden_states[token]
            p = {role: self.projections[f"{e}_{role}"] for role in ("gate", "up", "down")}
            y = p["down"](self._gated(p["gate"](x), p["up"](x))) * top_k_weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out

    def linears(self) -> dict:
        """``{"expert.<e>.<role>": projection}`` for statistics hooks."""
        return {f"expert.{key.replace('_', '.')}": m for key, m in self.projections.items()}


@contextlib.contextmanager
def unfused_experts(layer: nn.Module, family: Family):
    """Run ``layer``'s experts through :class:`UnfusedExperts` inside the block.

    Yields:
        ``{"expert.<e>.gate" | ".up" | ".down": module}`` (empty for a layer without fused experts).
        The fused module is put back on exit, also on errors.
    """
    fused = experts_module(layer, family)
    if fused is None:
        yield {}
        return
    view = UnfusedExperts(fused, family.experts)
    set_submodule(layer, family.experts.path, view)
    try:
        yield view.linears()
    finally:
        set_submodule(layer, family.experts.path, fused)


def prune_experts(layer: nn.Module, family: Family, keep) -> None:
    """Keep, in expert ``e``, only the intermediate channels ``keep[e]`` (the same count in every expert).

    Rows of gate and up (and their biases) and columns of down are kept, in the family's layout; the
    module stays the transformers class with smaller parameters. The router is untouched.
    """
    fused, spec = experts_module(layer, family), family.experts
    if fused is None:
        raise OffsiteError(f"this {family.model_type} layer has no fused experts to prune")
    count, channels = int(fused.gate_up_proj.shape[0]), channel_count(fused, spec)
    keep = [sorted(int(c) for c in k) for k in keep]
    sizes = {len(k) for k in keep}
    if len(keep) != count or len(sizes) != 1 or 0 in sizes or any(
            len(set(k)) != len(k) or k[0] < 0 or k[-1] >= channels for k in keep):
        raise OffsiteError(f"expert pruning needs, for each of the {count} experts, the same number (at least one) "
                           f"of distinct channel indices in 0..{channels - 1}")
    index = torch.tensor(keep, dtype=torch.long, device=fused.down_proj.device)  # (E, k)
    # Positions of the kept channels along the fused gate_up dimension, per expert: (E, 2k).
    if spec.interleaved:
        rows = torch.stack((2 * index, 2 * index + 1), dim=-1).flatten(1)
    else:
        rows = torch.cat((index, index + channels), dim=1)
    fused_dim, down_dim = (2, 1) if spec.in_out else (1, 2)
    with torch.no_grad():
        gate_up = _take(fused.gate_up_proj, rows, fused_dim)
        down = _take(fused.down_proj, index, down_dim)
        _set_param(fused, "gate_up_proj", gate_up)
        _set_param(fused, "down_proj", down)
        if spec.biases:
            _set_param(fused, "gate_up_proj_bias", torch.gather(fused.gate_up_proj_bias, 1, rows).clone())
    if hasattr(fused, "intermediate_size"):
        fused.intermediate_size = len(keep[0])


def _take(tensor: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """Per-expert index selection along ``dim`` (1 or 2) of an ``(E, a, b)`` tensor; ``index`` is ``(E, k)``."""
    shape = list(tensor.shape)
    shape[dim] = index.shape[1]
    expand = index[:, :, None] if dim == 1 else index[:, None, :]
    return torch.gather(tensor, dim, expand.expand(shape)).clone()


def _set_param(module: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(module, name)
    setattr(module, name, nn.Parameter(value, requires_grad=old.requires_grad))


def resize_experts(layer: nn.Module, family: Family, channels: int) -> None:
    """Give a fresh skeleton layer's experts ``channels`` intermediate channels each (placeholder values)."""
    fused = experts_module(layer, family)
    prune_experts(layer, family, [range(channels)] * int(fused.gate_up_proj.shape[0]))


__all__ = ["experts_module", "expert_matrices", "channel_count", "UnfusedExperts", "unfused_experts",
           "prune_experts", "resize_experts", "aligned_channels", "CHANNEL_MULTIPLE"]
