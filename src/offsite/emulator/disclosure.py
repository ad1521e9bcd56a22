"""How much of the base model's middle leaves in an emulator package (the privacy guard at the source).

Offsite-tuning only protects the model owner while the *middle* layers stay home: the emulator
package ships them dropped, compressed or retrained, never as they are. A wrong split or setting
(keeping all middle layers, ``adapter_layers="all"``) silently ships the whole model instead, so
the emulate workflow measures what leaves and refuses the obvious leaks before anything is written.

Every parameter tensor of the base model's middle layers gets one disposition, by parameter count:

* ``verbatim``: a tensor with the same shape, dtype and bytes exists anywhere in the emulator
  (found by content, so a layer moved to another position or repeated by CRaSh's sharing counts,
  and counts once, because each *base* tensor is counted once).
* ``low_rank``: the linear it belongs to became factors (:class:`LowRankLinear`), or the plan says
  it was replaced by a dense truncated-SVD product (``plan["linears"]`` / ScaleOT's ``plan["src"]``).
* ``pruned``: its layer ships, and the tensor under the same name has a smaller shape (channels cut).
* ``modified``: its layer ships and the tensor has the same shape but other values (distilled,
  trained), or it turned into something this module does not recognise (the cautious guess:
  it leaves in some derived form).
* ``not_shipped``: no emulator position carries its layer (dropped, or stood in for by a new
  harmonizer, whose small weights are not the base layer's).

Fingerprints of the middle are taken *before* the builder runs, because builders edit the base
model in place (dropping layers, swapping linears, overwriting a Conv1D weight with its SVD).
Digests instead of clones keep the extra memory at one tensor at a time.

The guard refuses (1) a middle that leaves entirely verbatim, which includes an empty middle, and
(2) for a builder whose ``compresses_kept_layers`` promises it, any kept middle layer that leaves
verbatim. ``compresses_kept_layers`` is a class attribute: ``True``, or the name of a numeric
setting whose positive value turns the compression on (ScaleOT: ``"beta"``); absent means no promise.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib

import torch

from ..core.errors import OffsiteError
from ..families import get_layers, get_submodule, layer_linears, named_layer_parameters
from .lowrank import LowRankLinear
from .methods.scaleot.harmonizer import is_harmonizer

KINDS = ("verbatim", "low_rank", "pruned", "modified", "not_shipped")
ALLOW_HINT = ("To write it anyway (only for a package that is never shipped, such as the full fine-tuning "
              "baseline), pass allow_verbatim_middle=True (CLI: --allow-verbatim-middle).")


@dataclasses.dataclass(frozen=True)
class TensorPrint:
    """Fingerprint of one base middle-layer parameter.

    Attributes:
        layer: full-model index of its decoder layer.
        local: name inside the layer, e.g. ``"self_attn.q_proj.weight"``.
        role: the family's linear role it belongs to (``"attn.q"``), or None (norms and the like).
        key: ``(shape, dtype, digest)``, equal for bitwise-equal tensors.
        numel: number of elements.
    """

    layer: int
    local: str
    role: str | None
    key: tuple
    numel: int


def tensor_key(tensor: torch.Tensor) -> tuple:
    """``(shape, dtype, blake2b of the raw bytes)`` of a tensor of any shape (one CPU copy at a time)."""
    data = tensor.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy()
    return tuple(tensor.shape), str(tensor.dtype), hashlib.blake2b(data, digest_size=16).hexdigest()


def fingerprint_middle(model, family, split, stream=None, on_layer=None) -> list:
    """Fingerprints of every middle-layer parameter of the *unmodified* base model.

    Call before the builder runs: builders change the base model in place.

    Args:
        stream: a :class:`offsite.model.streaming.StreamedModel` (``model`` is its skeleton): each middle
            layer is read, fingerprinted and released in turn.
        on_layer: ``on_layer(index, layer)`` called while each middle layer holds its values (the workflow
            checks them for NaN there, so a streamed layer is read once for both).

    Returns:
        A list of :class:`TensorPrint`, in layer order.
    """
    layers = get_layers(model, family)
    prints = []
    for i in split.middle:
        with stream.layer(i) if stream is not None else contextlib.nullcontext():
            role_of = {id(p): role for role, module in layer_linears(layers[i], family).items()
                       for p in module.parameters()}
            prefix = family.layer_param_prefix(i)
            for name, p in named_layer_parameters(model, family, [i]).items():
                prints.append(TensorPrint(i, name[len(prefix):], role_of.get(id(p)), tensor_key(p), p.numel()))
            if on_layer is not None:
                on_layer(i, layers[i])
    return prints


def _shipped_keys(emulator, prints: list, read=None) -> set:
    """Keys of the emulator's parameters that could match a base middle tensor (same shape and dtype).

    ``read(names) -> {name: tensor}`` supplies the values of parameters on ``meta`` (a streamed build),
    one tensor at a time.
    """
    wanted = {pr.key[:2] for pr in prints}
    seen, keys = set(), set()
    for name, p in emulator.named_parameters():
        if id(p) in seen or (tuple(p.shape), str(p.dtype)) not in wanted:
            continue
        seen.add(id(p))
        keys.add(tensor_key(read([name])[name] if p.is_meta else p))
    return keys


def _classify(pr: TensorPrint, shipped: set, layer, family, compressed: set) -> str:
    """Disposition of one base tensor; ``layer`` is the emulator layer carrying its layer, or None."""
    if pr.key in shipped:
        return "verbatim"
    if layer is None:
        return "not_shipped"
    now = dict(layer.named_parameters()).get(pr.local)
    if now is None:
        try:
            linear = get_submodule(layer, family.linear_roles[pr.role]) if pr.role else None
        except OffsiteError:  # the carrier is built differently: the tensor left in some other form
            linear = None
        return "low_rank" if isinstance(linear, LowRankLinear) else "modified"
    if tuple(now.shape) != pr.key[0]:
        return "pruned"
    if (pr.layer, pr.role) in compressed and pr.local.endswith("weight"):
        return "low_rank"  # stored as the dense rank-r product: same shape, values from the SVD
    return "modified"


def _layer_disposition(counts: dict) -> str:
    """One kind when the layer is homogeneous, else the kinds present, largest share first, joined by '+'."""
    present = sorted((k for k in KINDS if counts.get(k)), key=lambda k: (-counts[k], KINDS.index(k)))
    return "+".join(present) if present else "not_shipped"


def disclose(prints: list, emulator, family, split, plan: dict, read=None) -> dict:
    """How the base middle leaves in ``emulator``.

    Args:
        prints: :func:`fingerprint_middle` of the base model, taken before the build.
        emulator: the built emulator model.
        plan: the builder's plan; ``plan["layers"][pos]["source"]`` is the full index at position pos.
        read: for a streamed build, ``read(names) -> {name: tensor}`` for the parameters on ``meta``.

    Returns:
        ``{"middle_parameters": N, "parameters": {kind: count}, "fractions": {kind: count / N},
        "layers": [{"layer", "disposition", "parameters", "by_kind", "positions"}, ...]}``. With an
        empty middle (N = 0) every layer is an adapter layer and the fractions say ``verbatim`` 1.0.
    """
    emu_layers = get_layers(emulator, family)
    if len(emu_layers) != len(plan["layers"]):
        raise OffsiteError(f"the plan lists {len(plan['layers'])} emulator layers but the emulator has "
                           f"{len(emu_layers)}; cannot tell what leaves")
    positions: dict = {}
    for pos, entry in enumerate(plan["layers"]):
        # a harmonizer stands where a layer stood, but holds new weights, not that layer's
        if entry.get("module") != "harmonizer" and not is_harmonizer(emu_layers[pos]):
            positions.setdefault(entry["source"], []).append(pos)
    compressed = {(e["layer"], e["role"]) for e in plan.get("linears", []) + plan.get("src", [])}
    shipped = _shipped_keys(emulator, prints, read)
    per_layer = {i: dict.fromkeys(KINDS, 0) for i in split.middle}
    for pr in prints:
        carrier = emu_layers[positions[pr.layer][0]] if pr.layer in positions else None
        per_layer[pr.layer][_classify(pr, shipped, carrier, family, compressed)] += pr.numel
    totals = {k: sum(c[k] for c in per_layer.values()) for k in KINDS}
    total = sum(totals.values())
    fractions = {k: (totals[k] / total if total else float(k == "verbatim")) for k in KINDS}
    rows = [{"layer": i, "disposition": _layer_disposition(c), "parameters": sum(c.values()),
             "by_kind": {k: v for k, v in c.items() if v}, "positions": positions.get(i, [])}
            for i, c in per_layer.items()]
    return {"middle_parameters": total, "parameters": totals, "fractions": fractions, "layers": rows}


def promises_compression(builder, config) -> bool:
    """Whether ``builder`` with ``config`` promises to compress every middle layer it keeps."""
    promise = getattr(builder, "compresses_kept_layers", False)
    if isinstance(promise, str):  # the name of the setting that switches the compression on
        return bool(getattr(config, promise))
    return bool(promise)


def verbatim_problems(disclosure: dict, method: str, promised: bool) -> list:
    """What about ``disclosure`` the guard refuses, one sentence each (empty: nothing to refuse)."""
    problems = []
    rows, counts = disclosure["layers"], disclosure["parameters"]
    if not rows:
        problems.append("the split has no middle layers (every decoder layer is an adapter layer, e.g. "
                        "adapter_layers='all'), so the package would be the whole base model")
    elif counts["verbatim"] == disclosure["middle_parameters"]:
        problems.append(f"the emulator would ship the whole middle of the base model verbatim (layers "
                        f"{', '.join(str(r['layer']) for r in rows)}: all {disclosure['middle_parameters']:,} "
                        f"middle parameters bit for bit), so the package would be the whole base model")
    unchanged = [r["layer"] for r in rows if r["disposition"] == "verbatim"]
    if promised and unchanged:
        problems.append(f"method '{method}' promises to compress every middle layer it keeps, but middle "
                        f"layer(s) {', '.join(map(str, unchanged))} would leave verbatim (unchanged)")
    return problems


def guard_middle(disclosure: dict, builder, config, allow: bool = False) -> list:
    """Refuse an emulator that ships middle layers verbatim, unless ``allow``.

    Returns:
        The problems found, empty unless ``allow`` overrode them; the workflow keeps them in the
        manifest as ``disclosure["overridden"]``, so a package written with the flag says so.

    Raises:
        OffsiteError: naming what would leave and how to allow it explicitly.
    """
    problems = verbatim_problems(disclosure, builder.name, promises_compression(builder, config))
    if problems and not allow:
        raise OffsiteError(f"emulate refused: {'; and '.join(problems)}. Nothing was written. {ALLOW_HINT}")
    return problems


def format_fractions(fractions: dict) -> str:
    """``"verbatim 50.0%, low rank 0%, ..."`` for ``offsite inspect``."""
    def pct(value: float) -> str:
        if not value:
            return "0%"
        return "<0.1%" if value < 0.0005 else f"{100 * value:.1f}%"

    return ", ".join(f"{k.replace('_', ' ')} {pct(fractions.get(k, 0.0))}" for k in KINDS)
