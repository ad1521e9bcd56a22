"""Gradient-preserving Compression Score (GCS) of GradOT, in closed form for rank-1 removals.

For a perturbation δ of a weight ``W (out, in)`` with K-FAC factors ``A (in, in)``, ``G (out, out)``
and mean gradient ``g (out, in)`` of the mean token loss (see :mod:`offsite.calibration.stats`),
three terms describe what removing δ does:

* ``shift(δ) = ||G δ A||_1``: K-FAC's Hessian-vector product, the first-order change of ``W``'s
  gradient (the paper's utility term: keep it small);
* ``gain(δ) = <g, δ>``: the first-order loss increase (the paper's privacy term: make it large);
* ``loss(δ) = <g, δ> + ½ tr(δᵀ G δ A)``: the second-order (K-FAC) estimate of the loss increase, in
  nats per calibration token. The quadratic part is a sum of squares and far less noisy than the
  first-order part, which averages signed per-token gradients that nearly cancel at a trained model.

Every removal GradOT considers is rank one, ``δ = −c a bᵀ``, so ``||G δ A||_1 = |c| ||G a||_1 ||A b||_1``
(the L1 norm of an outer product factorises), ``<g, δ> = −c aᵀ g b`` and ``tr(δᵀ G δ A) = c² (aᵀ G a)
(bᵀ A b)``: one matrix product per factor scores every candidate at once.

* Singular component k: ``a = u_k, b = v_k, c = s_k``.
* Intermediate channel j: row j of up/gate (``a = e_j``, ``b = w_j``) plus column j of down
  (``a = d_j``, ``b = e_j``). ``shift`` and ``gain`` sum the matrices' terms as the paper does (K-FAC
  is block-diagonal across matrices; Phi-3's fused gate_up loses two rows of one matrix, summed one by
  one: an upper bound). ``loss`` uses the down column alone: removing the channel changes the layer's
  function exactly as removing that column does (the channel's activation no longer reaches the
  output), so adding the up/gate terms would count the same change two or three times.

Two forms turn the terms into one score (lower = better to remove; the highest scores are kept):

* ``"relative"`` (default): ``shift_k / Σ shift − λ · curv_k / Σ curv``, sums over the selection's
  candidates (one matrix's components, one MLP's channels). Both terms are *shares of the same
  matrix's total effect*, so they are on one scale and λ is an exchange rate: λ = 1 removes a
  candidate when its share of the loss increase exceeds its share of the gradient change; λ = 0 is
  gradient fidelity alone; large λ removes what the loss needs most (privacy). ``curv`` is the
  quadratic part of ``loss``: the first-order part is mostly noise at a trained model (its rank
  correlation between two halves of the calibration text is about 0.5, the quadratic part's and
  the shift's above 0.97; ``bench/results/gcs_selection``), so it is left out unless
  ``first_order`` asks for it.
* ``"paper"``: ``shift − λ · gain``, each term divided by its mean absolute value over the candidates
  (the raw terms differ by orders of magnitude between layers, so a raw λ would mean something else in
  every matrix). This is the published score with that one normalisation.

Candidates are scored independently: the sum of single-removal shifts bounds the joint ``||G δ A||_1``
(triangle inequality), ``gain`` is additive, and ``loss`` ignores the cross terms between removed
components (zero for components orthogonal in the A and G metrics).
"""

from __future__ import annotations

import math

import torch

FORMS = ("relative", "paper")


BLOCK_ENTRIES = 1 << 22
"""Entries of one temporary block in :func:`column_l1` and :func:`block_norm` (16 MB in fp32)."""


def _block_width(length: int) -> int:
    """Columns (or rows) per block: about BLOCK_ENTRIES entries, a multiple of 64, at least 64."""
    return max(64, BLOCK_ENTRIES // max(1, length) // 64 * 64)


def column_l1(matrix: torch.Tensor) -> torch.Tensor:
    """``matrix.abs().sum(0)`` without an ``abs`` copy of the whole matrix, ``(rows, cols) -> (cols,)``.

    The MLP's K-FAC factors are f x f (67 MB each in fp32 at f = 4096, 1 GB at f = 16384), and a full
    ``abs()`` temporary next to the factors set a streamed build's peak. Blocks of whole columns keep
    each column's summation order, but not always the kernel's: measured on CPU, the result is
    bitwise the full expression's for most shapes (blocks a multiple of 64 wide) and differs in the
    last bit for some (a 300 x 513 matrix); the same input always gives the same result
    (tests/test_gradot.py).
    """
    step = _block_width(matrix.shape[0])
    return torch.cat([matrix[:, j:j + step].abs().sum(0) for j in range(0, matrix.shape[1], step)])


def block_norm(matrix: torch.Tensor, dim: int, dtype=torch.float64) -> torch.Tensor:
    """``matrix.to(dtype).norm(dim=dim)`` of a 2-D matrix, a block of whole columns (``dim=0``) or rows
    (``dim=1``) at a time: no full-precision copy of the matrix (equal up to the last bit, see
    :func:`column_l1`)."""
    step = _block_width(matrix.shape[dim])
    size = matrix.shape[1 - dim]
    blocks = (matrix[:, j:j + step] if dim == 0 else matrix[j:j + step] for j in range(0, size, step))
    return torch.cat([b.to(dtype).norm(dim=dim) for b in blocks])


def _share(x: torch.Tensor) -> torch.Tensor:
    return x / x.abs().sum().clamp_min(torch.finfo(x.dtype).tiny)


def component_terms(stats: dict, svd) -> dict:
    """``shift``, ``gain`` and ``loss`` of removing each singular component k, ``δ_k = −s_k u_k v_kᵀ``.

    Args:
        stats: ``{"A": (in, in), "G": (out, out), "grad": (out, in)}``.
        svd: ``(U (out, k), S (k,), Vh (k, in))`` of the matrix.

    Returns:
        ``{"shift", "gain", "curvature", "loss"}``, each ``(k,)`` (curvature = the quadratic part of loss).
    """
    u, s, vh = (t.to(stats["A"].dtype) for t in svd)
    gu, av = stats["G"] @ u, stats["A"] @ vh.T
    shift = s * gu.abs().sum(0) * av.abs().sum(0)
    curvature = 0.5 * s.square() * (u * gu).sum(0) * (vh.T * av).sum(0)
    if stats.get("grad") is None:  # gathered without the gradient: the first-order terms are not known
        return {"shift": shift, "curvature": curvature}
    gain = -s * torch.einsum("ok,oi,ki->k", u, stats["grad"], vh)
    return {"shift": shift, "gain": gain, "curvature": curvature, "loss": gain + curvature}


def product_column_l1(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``column_l1(a @ w.T)`` a block of ``w``'s rows at a time, ``(n, n), (m, n) -> (m,)``.

    Neither the ``(n, m)`` product nor ``w`` in ``a``'s dtype (a bf16 model's weights are widened to
    fp32) is made whole: at n = 1536, m = 4096 they are 25 MB each, at the peak of a streamed build.
    """
    step = _block_width(a.shape[0])
    return torch.cat([(a @ w[j:j + step].to(a.dtype).T).abs().sum(0) for j in range(0, w.shape[0], step)])


def channel_terms(row_parts: list, down_part: tuple) -> dict:
    """``shift``, ``gain`` (summed over the MLP's matrices) and ``loss`` (down column) per channel j.

    Args:
        row_parts: ``[(stats, W (blocks * channels, in), blocks)]`` for up/gate.
        down_part: ``(stats, W_down (out, channels))``.

    Returns:
        ``{"shift", "gain", "curvature", "loss"}``, each ``(channels,)``.
    """
    d_stats, d_w = down_part
    d_w = d_w.to(d_stats["A"].dtype)
    g_d = d_stats["G"] @ d_w
    shift = column_l1(g_d) * column_l1(d_stats["A"])
    curvature = 0.5 * (d_w * g_d).sum(0) * d_stats["A"].diagonal()
    channels = d_w.shape[1]
    first = d_stats.get("grad") is not None
    down_gain = -(d_stats["grad"] * d_w).sum(0) if first else None
    # The down matrix's fp32 copy and G @ W_down (out x channels each) are done with: freed before the
    # row matrices' products, which are the layer's peak in a streamed build.
    del d_w, g_d
    gain = down_gain
    for stats, w, blocks in row_parts:
        row_shift = column_l1(stats["G"]) * product_column_l1(stats["A"], w)
        shift = shift + row_shift.view(blocks, channels).sum(0)
        if first:
            gain = gain + (-(stats["grad"] * w.to(stats["A"].dtype)).sum(1)).view(blocks, channels).sum(0)
    if not first:  # gathered without the gradient: the first-order terms are not known
        return {"shift": shift, "curvature": curvature}
    return {"shift": shift, "gain": gain, "curvature": curvature, "loss": down_gain + curvature}


def scores(terms: dict, lam: float, form: str = "relative", first_order: bool = False) -> torch.Tensor:
    """GCS of every candidate from its terms (lower = better to remove), ``(n,)``; see the module doc.

    ``first_order`` (relative form only) adds ``<g, δ>`` to the loss term; without it the loss term is
    the quadratic part alone, the expected increase at a minimum of the calibration loss.
    """
    if form == "paper":
        shift, gain = terms["shift"], terms["gain"]
        return shift / shift.abs().mean().clamp_min(1e-300) - lam * gain / gain.abs().mean().clamp_min(1e-300)
    return _share(terms["shift"]) - lam * _share(terms["loss" if first_order else "curvature"])


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
