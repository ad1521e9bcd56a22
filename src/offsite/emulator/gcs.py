"""Gradient-preserving Compression Score (GCS) of GradOT, in closed form for rank-1 removals.

For a perturbation δ of a weight ``W (out, in)`` with K-FAC factors ``A (in, in)``, ``G (out, out)``
and mean gradient ``g (out, in)`` (see :mod:`offsite.calibration.stats`)::

    GCS(δ) = ||G δ A||_1 − λ <g, δ>

``G δ A`` is K-FAC's Hessian-vector product: the first-order change of ``W``'s gradient (keep it
small: utility); ``<g, δ>`` (entrywise product summed) is the first-order loss increase (make it
large: privacy). Every removal GradOT considers is rank one, ``δ = −c a bᵀ``, so
``||G δ A||_1 = |c| ||G a||_1 ||A b||_1`` (the L1 norm of an outer product factorises) and
``<g, δ> = −c aᵀ g b``: one matrix product per factor scores every candidate at once.

* Removing singular component k: ``a = u_k, b = v_k, c = s_k``.
* Removing intermediate channel j: row j of up/gate (``a = e_j``, ``b = w_j``) plus column j of
  down (``a = d_j``, ``b = e_j``); the channel's score sums its matrices' terms (K-FAC is
  block-diagonal across matrices, and the L1 norm of a block-diagonal change is the sum). Phi-3's
  fused gate_up loses two rows of one matrix; their terms are summed (an upper bound).

Both terms are divided by their mean absolute value over the candidates of one selection (one
matrix, or one MLP), so λ is a dimensionless trade-off that means the same in every layer and
model (the raw terms differ by orders of magnitude between layers); within one selection this
only rescales λ. Candidates are scored independently and the lowest-GCS ones are removed: the sum
of single-removal scores is an upper bound of the joint ``||G δ A||_1`` (triangle inequality) and
exact for ``<g, δ>``, so keeping the highest scores minimises that bound.
"""

from __future__ import annotations

import math

import torch


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.abs().mean().clamp_min(torch.finfo(x.dtype).tiny)


def component_terms(stats: dict, svd) -> tuple:
    """Raw ``(||G δ_k A||_1, <g, δ_k>)`` for removing each singular component k, ``δ_k = −s_k u_k v_k^T``.

    Args:
        stats: ``{"A": (in, in), "G": (out, out), "grad": (out, in)}``.
        svd: ``(U (out, k), S (k,), Vh (k, in))`` of the matrix.

    Returns:
        Two ``(k,)`` tensors.
    """
    u, s, vh = (t.to(stats["A"].dtype) for t in svd)
    shift = s * (stats["G"] @ u).abs().sum(0) * (stats["A"] @ vh.T).abs().sum(0)
    gain = -s * torch.einsum("ok,oi,ki->k", u, stats["grad"], vh)
    return shift, gain


def component_scores(stats: dict, svd, lam: float) -> torch.Tensor:
    """Normalised GCS of removing each singular component (lower = better to remove), ``(k,)``."""
    shift, gain = component_terms(stats, svd)
    return _unit(shift) - lam * _unit(gain)


def channel_terms(row_parts: list, down_part: tuple) -> tuple:
    """Raw ``(||G δ_j A||_1, <g, δ_j>)`` summed over the MLP's matrices, for removing channel j.

    Exact for separate up/gate/down matrices. For a fused ``gate_up`` (``blocks`` = 2) the two
    removed rows of one matrix are scored one by one and summed: an upper bound of that matrix's
    joint L1 term (the exact value would cost one ``(out, in)`` product per channel).

    Args:
        row_parts: ``[(stats, W (blocks * channels, in), blocks)]`` for up/gate.
        down_part: ``(stats, W_down (out, channels))``.

    Returns:
        Two ``(channels,)`` tensors.
    """
    d_stats, d_w = down_part
    d_w = d_w.to(d_stats["A"].dtype)
    shift = (d_stats["G"] @ d_w).abs().sum(0) * d_stats["A"].abs().sum(0)
    gain = -(d_stats["grad"] * d_w).sum(0)
    channels = d_w.shape[1]
    for stats, w, blocks in row_parts:
        w = w.to(stats["A"].dtype)
        row_shift = stats["G"].abs().sum(0) * (stats["A"] @ w.T).abs().sum(0)
        row_gain = -(stats["grad"] * w).sum(1)
        shift = shift + row_shift.view(blocks, channels).sum(0)
        gain = gain + row_gain.view(blocks, channels).sum(0)
    return shift, gain


def channel_scores(row_parts: list, down_part: tuple, lam: float) -> torch.Tensor:
    """Normalised GCS of removing each intermediate channel (lower = better to remove), ``(channels,)``."""
    shift, gain = channel_terms(row_parts, down_part)
    return _unit(shift) - lam * _unit(gain)


def floor_count(full: int, fraction: float) -> int:
    """Components always kept: ``ceil(fraction * full)``, at least 1 (GradOT keeps the top 5%)."""
    return max(1, math.ceil(fraction * full))


def select_components(scores: torch.Tensor, keep: int, floor: int) -> list:
    """Indices (ascending) of the kept singular components.

    The top ``floor`` (largest singular values; indices 0..floor-1) always stay; the rest of the
    ``keep`` budget goes to the highest-scoring remaining components.
    """
    floor = min(floor, keep)
    rest = torch.argsort(scores[floor:], descending=True, stable=True)[:keep - floor] + floor
    return sorted(list(range(floor)) + rest.tolist())


def select_top(scores: torch.Tensor, keep: int) -> list:
    """Indices (ascending) of the ``keep`` highest scores."""
    return sorted(torch.argsort(scores, descending=True, stable=True)[:keep].tolist())
