"""CRaSh: Clustering, Removing and Sharing of layers by representation similarity (training-free).

Paper: Zhang, Ding, Qi, Zhu, Long, Zhou, "CRaSh: Clustering, Removing, and Sharing Enhance
Fine-tuning without Full Large Language Model", EMNLP 2023 (arXiv 2310.15477); the details follow
the released code (TsinghuaC3I/CRaSh).

Algorithm: (1) run the full model on public calibration text and pool every middle layer's output
over tokens (position-weighted mean, the option of the released configs) into an ``(N, hidden)``
matrix; (2) linear CKA between every pair of middle layers; (3) start with one cluster per layer
and repeatedly merge the *adjacent* pair whose boundary layers (left cluster's last, right
cluster's first) have the highest CKA, until K clusters remain; (4) keep one representative per
cluster, its middle element ``cluster[len // 2]`` as in the released code; (5) with ``share``,
every removed position is filled with the nearest kept representative (ties go right; adapter
layers are never repeated, the code's ``--only_repeat_non_trainable_layers``), restoring depth.

Departures and choices (settings where they matter): the calibration text is public text of the
model owner, not the task's validation set the released scripts use (the data owner's data is
private in real OT); only the middle layers are clustered because the adapter is fixed by the
split (the code picks adapters among the representatives); clusters are runs of consecutive
*middle* layers, so with ``idx:`` splits a cluster may straddle an adapter layer.

Storing shared layers: by default (``tie_shared``, which applies with ``share``) the positions that
repeat one layer share
its parameters instead (the same ``nn.Parameter`` objects; each position keeps its own module, so
its own ``layer_idx`` KV-cache slot): the package stores each distinct layer once, lists the tied
positions in ``plan["shared_positions"]`` (groups of emulator positions, the first holding the
weights), counts each parameter once in ``parameters.emulator``, and :meth:`Crash.restructure`
re-ties the groups on load. Such a package loads only with ``offsite.emulator.package.load_emulator``
(stock ``from_pretrained`` cannot tie decoder layers and would initialise the repeats randomly).
``tie_shared=false`` stores a copy per position instead: a stock Hugging Face checkpoint of the full
depth, at the cost of storing a representative once per position.
Adapter layers are never repeated, so never tied: the data owner trains exactly the same tensors.
"""

from __future__ import annotations

import copy
import dataclasses

import torch

from ...calibration import capture_boundaries_layerwise
from ...core.device import model_device
from ...core.errors import ArtifactError, OffsiteError
from ...core.progress import bar
from ...families import capture_hidden, get_layers, set_layers
from ..base import EmulatorBuilder, layer_count_points, layer_entries, register
from ..calibrated import CalibrationSettings, check_positive
from ..inputs import BuildInputs
from .uniform import default_emulator_layers

POOLINGS = ("mean_weighted", "mean", "last")


def pool_tokens(hidden: torch.Tensor, pooling: str) -> torch.Tensor:
    """``(batch, seq, hidden)`` -> ``(batch, hidden)``: ``mean``, ``last`` token, or ``mean_weighted``
    (weights 1..seq, later tokens count more: they have seen more context; SGPT/CRaSh style)."""
    if pooling == "mean":
        return hidden.mean(dim=1)
    if pooling == "last":
        return hidden[:, -1]
    if pooling == "mean_weighted":
        w = torch.arange(1, hidden.shape[1] + 1, device=hidden.device, dtype=hidden.dtype)
        return (hidden * (w / w.sum())[None, :, None]).sum(dim=1)
    raise OffsiteError(f"unknown pooling {pooling!r}; allowed: {', '.join(POOLINGS)}")


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two representations of the same N inputs.

    ``CKA = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)`` with column-centred ``Xc``, ``Yc``
    (equal to HSIC-based CKA with linear kernels). 1 for identical inputs, invariant to orthogonal
    transforms and isotropic scaling of either side.

    Args:
        x: ``(N, d1)``; y: ``(N, d2)``.
    """
    if x.shape[0] != y.shape[0] or x.shape[0] < 2:
        raise OffsiteError(f"CKA needs the same N >= 2 rows on both sides, got {x.shape[0]} and {y.shape[0]}")
    x = x.double() - x.double().mean(0, keepdim=True)
    y = y.double() - y.double().mean(0, keepdim=True)
    if x.shape[0] < max(x.shape[1], y.shape[1]):  # Gram form: N x N instead of d x d
        kx, ky = x @ x.T, y @ y.T
        cross, nx, ny = (kx * ky).sum(), kx.norm(), ky.norm()
    else:
        cross, nx, ny = (y.T @ x).pow(2).sum(), (x.T @ x).norm(), (y.T @ y).norm()
    if nx == 0 or ny == 0:
        return 0.0  # a constant representation carries no information to compare
    return float(cross / (nx * ny))


def cka_matrix(reps: list) -> torch.Tensor:
    """Symmetric ``(M, M)`` linear-CKA matrix of M representations ``(N, d)``."""
    m = len(reps)
    out = torch.eye(m, dtype=torch.float64)
    with bar(m * (m - 1) // 2, "CRaSh CKA", "pair") as pairs:
        for i in range(m):
            for j in range(i + 1, m):
                out[i, j] = out[j, i] = linear_cka(reps[i], reps[j])
                pairs.update()
    return out


def cluster_adjacent(similarity: torch.Tensor, k: int) -> list:
    """Agglomerate consecutive items into ``k`` contiguous clusters (CRaSh's "stacking" mode).

    Each round merges the adjacent pair of clusters with the highest similarity between the left
    cluster's last item and the right cluster's first item (ties: the leftmost pair).

    Returns:
        ``k`` lists of item positions, in order, covering ``0..M-1``.
    """
    m = similarity.shape[0]
    if not 1 <= k <= m:
        raise OffsiteError(f"CRaSh needs 1 <= K <= {m} clusters (the middle layers), got K={k}")
    clusters = [[i] for i in range(m)]
    while len(clusters) > k:
        scores = [float(similarity[a[-1], b[0]]) for a, b in zip(clusters, clusters[1:])]
        best = max(range(len(scores)), key=lambda i: (scores[i], -i))
        clusters[best:best + 2] = [clusters[best] + clusters[best + 1]]
    return clusters


def nearest_kept(position: int, kept: list) -> int:
    """The kept index closest to ``position`` (ties: the one on the right)."""
    return min(kept, key=lambda k: (abs(k - position), -k))


def middle_representations(model, family, split, batches: list, pooling: str, stream=None) -> list:
    """Pooled output of every middle layer over the calibration batches: M tensors ``(N, hidden)``.

    With ``stream`` (a streamed base model) the forward runs layer by layer and keeps only the
    current boundary (:func:`offsite.calibration.capture_boundaries_layerwise`).
    """
    middle = list(split.middle)
    pooled = {i: [] for i in middle}
    if stream is not None:
        def on_output(i, b, out):
            if i in pooled:
                pooled[i].append(pool_tokens(out.float(), pooling))

        capture_boundaries_layerwise(model, family, batches, stream, with_grads=False, on_output=on_output,
                                     retain=False)
        return [torch.cat(pooled[i]) for i in middle]
    device = model_device(model)
    with torch.no_grad(), capture_hidden(model, family, outputs_of=middle) as store:
        for ids in bar(batches, "CRaSh forward", "batch"):
            model(input_ids=ids.to(device), use_cache=False)
            for i in middle:
                # kept on the model's device: CKA below runs there too (only its scalars leave)
                pooled[i].append(pool_tokens(store[("out", i)].float(), pooling))
    return [torch.cat(pooled[i]) for i in middle]


@dataclasses.dataclass
class CrashConfig:
    """Settings of CRaSh (clustering, removing, sharing)."""

    emulator_layers: int | None = None
    """Clusters K = distinct middle layers kept; default 70% of the middle (uniform.DEFAULT_KEEP_FRACTION)."""
    share: bool = False
    """Repeat kept layers in the removed positions, restoring the original depth."""
    tie_shared: bool = True
    """With share: store each repeated layer once and tie its positions on load (the package costs its
    distinct layers only; loads with offsite's load_emulator, not stock from_pretrained). False: a
    copy per position, a stock HF checkpoint. Without share it has nothing to tie."""
    pooling: str = "mean_weighted"
    """Token pooling of layer outputs before CKA: mean_weighted, mean or last."""
    seq_len: int = 128
    """Tokens per calibration window."""
    num_sequences: int = 64
    """Calibration windows (rows N of the CKA matrices)."""
    batch_size: int = 8
    """Calibration windows per forward pass."""
    seed: int = 0
    """Seed of the window draw."""

    def __post_init__(self):
        CalibrationSettings.of(self)
        if self.emulator_layers is not None:
            check_positive("emulator_layers (K clusters)", self.emulator_layers)
        if self.pooling not in POOLINGS:
            raise OffsiteError(f"unknown pooling {self.pooling!r}; allowed: {', '.join(POOLINGS)}")
        if not isinstance(self.share, bool):
            raise OffsiteError(f"share must be true or false, got {self.share!r}")
        if not isinstance(self.tie_shared, bool):
            raise OffsiteError(f"tie_shared must be true or false, got {self.tie_shared!r}")


@register
class Crash(EmulatorBuilder):
    name = "crash"
    size_knob = "emulator_layers"

    def size_points(self, middle: int) -> list:
        return layer_count_points(middle)

    config_cls = CrashConfig
    needs_calibration = True
    supports_stream = True  # CKA needs layer outputs only: a layer-by-layer forward; kept layers stay on disk

    def plan(self, model, family, split, config, inputs=None, on_layer=None) -> dict:
        """Cluster the middle layers by the CKA of their outputs on the calibration text; keep one per cluster.

        With ``inputs.stream`` the outputs come from a layer-by-layer forward, and the kept layers stay
        on disk until the package is written (``apply`` only rearranges them).
        """
        inputs = BuildInputs() if inputs is None else inputs
        middle = list(split.middle)
        k = default_emulator_layers(len(middle)) if config.emulator_layers is None else config.emulator_layers
        if not 1 <= k <= len(middle):  # refuse before reading any calibration text
            raise OffsiteError(f"CRaSh needs 1 <= K <= {len(middle)} clusters (the middle layers), got K={k}")
        batches = inputs.batches(self.name, CalibrationSettings.of(config))
        if sum(b.shape[0] for b in batches) < 2:
            raise OffsiteError("CRaSh compares layers over calibration windows and needs at least 2")
        similarity = cka_matrix(middle_representations(model, family, split, batches, config.pooling,
                                                       inputs.stream))
        clusters = [[middle[p] for p in c] for c in cluster_adjacent(similarity, k)]
        reps = [c[len(c) // 2] for c in clusters]
        if config.share:
            adapter = set(split.adapter)
            layers = [{"source": i, "role": "adapter"} if i in adapter else
                      {"source": nearest_kept(i, reps), "role": "emulator", "position_of": i}
                      for i in range(split.num_layers)]
        else:
            layers = layer_entries(split, reps)
        plan = {"layers": layers, "emulator_layers": k, "clusters": clusters, "representatives": reps,
                "share": config.share, "pooling": config.pooling,
                "cka": [[round(float(v), 5) for v in row] for row in similarity]}
        if config.tie_shared:
            plan["shared_positions"] = shared_positions(layers)
        return plan

    def apply(self, model, family, split, plan, inputs=None):
        """Keep the plan's sources; a source used again (sharing) is an independent copy, or, when the
        plan has ``shared_positions``, a module of its own holding the very same parameters."""
        layers = get_layers(model, family)
        sources = [e["source"] for e in plan["layers"]]
        tied = "shared_positions" in plan
        modules, used = [], set()
        for src in sources:
            if src not in used:
                modules.append(layers[src])
            elif tied:  # new modules (own layer_idx), the same Parameter objects: nothing is copied
                modules.append(copy.deepcopy(layers[src], {id(p): p for p in layers[src].parameters()}))
            else:
                modules.append(copy.deepcopy(layers[src]))
            used.add(src)
        set_layers(model, family, modules, sources)
        return model

    def restructure(self, model, family, plan: dict) -> None:
        """Re-tie the plan's ``shared_positions``: every position of a group takes the first one's parameters."""
        layers = get_layers(model, family)
        for group in plan.get("shared_positions", []):
            for pos in group[1:]:
                tie_parameters(layers[pos], layers[group[0]], f"emulator layer {pos} (tied to {group[0]})")


def shared_positions(layers: list) -> list:
    """Groups of emulator positions that repeat one middle layer, each in order (adapters never repeat).

    Args:
        layers: the plan's layer table.

    Returns:
        ``[[position, ...], ...]`` with two or more positions per group, groups ordered by first position.
    """
    groups: dict = {}
    for pos, entry in enumerate(layers):
        if entry["role"] == "emulator":
            groups.setdefault(entry["source"], []).append(pos)
    return sorted(g for g in groups.values() if len(g) > 1)


def tie_parameters(target: torch.nn.Module, source: torch.nn.Module, where: str) -> None:
    """Make every parameter of ``target`` the same object as ``source``'s parameter of that name.

    Raises:
        ArtifactError: the two modules do not have the same parameter names and shapes.
    """
    mine = dict(target.named_parameters())
    theirs = dict(source.named_parameters())
    if {k: tuple(v.shape) for k, v in mine.items()} != {k: tuple(v.shape) for k, v in theirs.items()}:
        raise ArtifactError(f"{where}: its parameters differ in names or shapes from the layer it is tied to")
    for name, param in theirs.items():
        path, _, attr = name.rpartition(".")
        (target.get_submodule(path) if path else target)._parameters[attr] = param
