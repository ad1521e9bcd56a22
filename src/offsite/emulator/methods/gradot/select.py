"""GradOT's selection: the per-matrix terms it scores, the choice of kept components and channels,
and applying that choice to one layer (:mod:`.gradot` runs them over the calibration sweep).

Selection is per matrix (one attention projection's singular components, one MLP's channels), so a
layer can be compressed as soon as its own terms are known; :func:`select` is a pure function of
the terms and the config, which is what lets ``offsite frontier`` reuse cached terms for any size,
λ or form.
"""

from __future__ import annotations

import hashlib

import torch

from ....families import get_submodule, layer_linears
from ....families.linears import linear_weight, mlp_channel_blocks
from ....families.moe import aligned_channels, channel_count, expert_matrices, experts_module, prune_experts
from ...lowrank import make_dense, make_low_rank, prune_mlp_channels, replace_linear, truncated_svd, weight_svd
from . import gcs


def attention_terms(module, family, stats, need_stats: bool, svds: dict | None = None, key: str = "") -> dict:
    """What selecting one attention matrix's components needs: its shape and, for GCS, the terms.

    The SVD made for the terms is put in ``svds[key]`` when given, so applying the selection needs none.
    """
    w = linear_weight(module, family)
    entry = {"shape": list(w.shape)}
    if need_stats:
        svd = weight_svd(w)
        entry.update(gcs.component_terms(stats, svd))
        if svds is not None:
            svds[key] = svd
    return entry


def mlp_terms(layer, family, stats, need_stats: bool) -> dict:
    """One MLP's channel count, the magnitude baseline's channel norms and, for GCS, the terms."""
    linears = layer_linears(layer, family)
    down = linear_weight(linears["mlp.down"], family).detach()
    channels = down.shape[1]
    rows = [(stats.get(r), linear_weight(linears[r], family).detach(), b) for r, b in mlp_channel_blocks(family).items()]
    norm = gcs.block_norm(down, 0)
    for _, w, blocks in rows:
        norm = norm * gcs.block_norm(w, 1).view(blocks, channels).prod(0)
    entry = {"of": channels, "norm": norm}
    if need_stats:
        entry.update(gcs.channel_terms(rows, (stats["mlp.down"], down)))
    return entry


def expert_terms(layer, family, stats, need_stats: bool) -> dict:
    """Per-expert channel terms of one MoE layer: ``{"<e>": {"of", "norm"[, GCS terms]}}`` ({} for a dense layer).

    An expert is a SwiGLU MLP of its own (gate, up, down views of the fused tensors), scored like a
    dense MLP on the tokens the router sent it (statistics of ``expert.<e>.<role>``, gathered through
    :func:`offsite.families.moe.unfused_experts`). An expert that no calibration token reached has no
    statistics: it gets the magnitude baseline's channel norms only, and selection falls back to them.
    """
    fused = experts_module(layer, family)
    if fused is None:
        return {}
    out, channels = {}, channel_count(fused, family.experts)
    for e in range(int(fused.gate_up_proj.shape[0])):
        m = {k: (v.detach() if v is not None else None) for k, v in expert_matrices(fused, family.experts, e).items()}
        norm = gcs.block_norm(m["down"], 0) * gcs.block_norm(m["gate"], 1) * gcs.block_norm(m["up"], 1)
        entry = {"of": channels, "norm": norm}
        roles = [f"expert.{e}.{r}" for r in ("gate", "up", "down")]
        if need_stats and all(r in stats for r in roles):
            rows = [(stats[roles[0]], m["gate"], 1), (stats[roles[1]], m["up"], 1)]
            entry.update(gcs.channel_terms(rows, (stats[roles[2]], m["down"])))
        out[str(e)] = entry
    return out


def _random_scores(seed: int, index: int, role: str, n: int) -> torch.Tensor:
    """Scores ``(n,)`` of the random baseline, drawn from (seed, layer, role) alone, so a selection
    does not depend on the order matrices are visited in or on the device."""
    digest = hashlib.sha256(f"{seed}|{index}|{role}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
    return torch.rand(n, generator=generator, dtype=torch.float64)


def select(terms: dict, config) -> tuple:
    """The plan's ``linears`` and ``mlp`` tables from the terms of every middle matrix (no model needed).

    Args:
        terms: ``{"attn": {"<layer>.<role>": {"shape", ...}}, "mlp": {"<layer>": {"of", "norm", ...}}}``
            as :meth:`GradOT.terms` returns it (GCS terms present when ``config.scoring == "gcs"``).
        config: sizes, scoring, λ, form and floor.
    """
    linears, mlps = [], []
    for key, t in terms["attn"].items():
        index, role = key.split(".", 1)
        out_f, in_f = t["shape"]
        rank, full = config.target_rank(out_f, in_f), min(out_f, in_f)
        if rank >= full:
            continue  # nothing to compress
        if config.scoring == "magnitude":
            kept = list(range(rank))
        else:
            scores = (_random_scores(config.seed, int(index), role, full) if config.scoring == "random"
                      else gcs.scores(t, config.lambda_attn, config.gcs_form, config.first_order))
            kept = gcs.select_components(scores, rank, gcs.floor_count(full, config.top_fraction))
        entry = {"layer": int(index), "role": role, "components": kept}
        linears.append({**entry, "rank": rank} if rank * (out_f + in_f) < out_f * in_f else {**entry, "shape": [out_f, in_f]})
    for key, t in terms["mlp"].items():
        keep = config.target_channels(t["of"])
        if keep >= t["of"]:
            continue
        if config.scoring == "magnitude":
            scores = t["norm"]
        elif config.scoring == "random":
            scores = _random_scores(config.seed, int(key), "mlp", t["of"])
        else:
            scores = gcs.scores(t, config.lambda_mlp, config.gcs_form, config.first_order)
        mlps.append({"layer": int(key), "channels": gcs.select_top(scores, keep), "of": t["of"]})
    mlps += _select_experts(terms.get("experts", {}), config)
    return sorted(linears, key=lambda e: (e["layer"], e["role"])), sorted(mlps, key=lambda e: e["layer"])


def _select_experts(terms: dict, config) -> list:
    """Plan entries ``{"layer", "experts": [kept channels of expert e], "of", "by_norm": [e...]}``, one per
    MoE layer: every expert keeps the same number of channels (the fused tensors are rectangular; the
    count rounded to :data:`offsite.families.moe.CHANNEL_MULTIPLE`), each its own, by its own scores; ``by_norm`` lists the experts no calibration token reached (scored by
    channel norm instead)."""
    layers = {}
    for key, t in terms.items():
        index, e = (int(x) for x in key.split("."))
        layers.setdefault(index, {})[e] = t
    out = []
    for index, experts in sorted(layers.items()):
        of = experts[0]["of"]
        keep = aligned_channels(config.target_channels(of), of)
        if keep >= of:
            continue
        kept, by_norm = [], []
        for e in range(len(experts)):
            t = experts[e]
            if config.scoring == "random":
                scores = _random_scores(config.seed, index, f"expert.{e}", of)
            elif config.scoring == "magnitude" or "shift" not in t:
                scores = t["norm"]
                by_norm += [e] if config.scoring == "gcs" else []
            else:
                scores = gcs.scores(t, config.lambda_mlp, config.gcs_form, config.first_order)
            kept.append(gcs.select_top(scores, keep))
        out.append({"layer": index, "experts": kept, "of": of, "by_norm": by_norm})
    return out


def layer_part(terms: dict, index: int) -> dict:
    """The terms of one layer's matrices (the shape :func:`select` takes)."""
    prefix = f"{index}."
    return {"attn": {k: v for k, v in terms["attn"].items() if k.startswith(prefix)},
            "mlp": {k: v for k, v in terms["mlp"].items() if k == str(index)},
            "experts": {k: v for k, v in terms.get("experts", {}).items() if k.startswith(prefix)}}


def compress_layer(layer, family, linears: list, mlps: list, svds: dict) -> None:
    """Apply one layer's plan entries in place: channel pruning, then each matrix's kept components
    (from ``svds["<layer>.<role>"]`` when the scoring already decomposed it, else decomposed here)."""
    for entry in mlps:
        if "experts" in entry:
            prune_experts(layer, family, entry["experts"])
        else:
            prune_mlp_channels(layer, family, entry["channels"])
    for entry in linears:
        module = get_submodule(layer, family.linear_roles[entry["role"]])
        up, down = truncated_svd(linear_weight(module, family), components=entry["components"],
                                 svd=svds.pop(f"{entry['layer']}.{entry['role']}", None))
        new = make_low_rank(module, family, up, down) if "rank" in entry else make_dense(up @ down, getattr(module, "bias", None))
        replace_linear(layer, family, entry["role"], new)
