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
    return sorted(linears, key=lambda e: (e["layer"], e["role"])), sorted(mlps, key=lambda e: e["layer"])


def layer_part(terms: dict, index: int) -> dict:
    """The terms of one layer's matrices (the shape :func:`select` takes)."""
    prefix = f"{index}."
    return {"attn": {k: v for k, v in terms["attn"].items() if k.startswith(prefix)},
            "mlp": {k: v for k, v in terms["mlp"].items() if k == str(index)}}


def compress_layer(layer, family, linears: list, mlps: list, svds: dict) -> None:
    """Apply one layer's plan entries in place: channel pruning, then each matrix's kept components
    (from ``svds["<layer>.<role>"]`` when the scoring already decomposed it, else decomposed here)."""
    for entry in mlps:
        prune_mlp_channels(layer, family, entry["channels"])
    for entry in linears:
        module = get_submodule(layer, family.linear_roles[entry["role"]])
        up, down = truncated_svd(linear_weight(module, family), components=entry["components"],
                                 svd=svds.pop(f"{entry['layer']}.{entry['role']}", None))
        new = make_low_rank(module, family, up, down) if "rank" in entry else make_dense(up @ down, getattr(module, "bias", None))
        replace_linear(layer, family, entry["role"], new)
