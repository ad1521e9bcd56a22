"""ScaleOT stage 1, Dynamic LayerReplace: learn layer importance while training harmonizers.

Paper: Yao et al., ScaleOT, AAAI 2025 (arXiv 2412.09812), Sec. "Dynamic LayerReplace". Only the
outline is confirmed (scores learned by reinforcement learning, layers sampled within groups,
about half of each group replaced by harmonizers, scores and harmonizers updated together); the
policy, reward and update below are this library's choices.

One step on a calibration batch:

1. Partition the M middle layers into random groups of ``group_size`` (re-drawn every step, so
   scores of layers that never share a group stay comparable; a leftover single joins the last
   group). In each group of n, ``n // 2`` layers are replaced by their harmonizers.
2. Draw ``num_candidates`` candidate networks from the policy: per group, the kept layers are a
   Gumbel-top-k sample of the group's scores, i.e. a Plackett-Luce draw without replacement with
   log-probability ``sum_t s_t - logsumexp(s over the layers not yet drawn)``.
3. Run each candidate (originals frozen, harmonizers live) on the batch: LM loss ``L_j``. The
   harmonizers take an AdamW step on ``mean_j L_j``.
4. REINFORCE on the scores: reward ``r_j = -(L_j - mean L)`` (the mean over candidates is the
   baseline), ascent on ``mean_j r_j log pi(candidate_j)`` with Adam. A layer whose replacement
   hurts is kept by the better candidates, so its score rises; a layer a harmonizer imitates
   well drifts down.
"""

from __future__ import annotations

import time

import torch

from ....core.device import model_device
from ....core.precision import MASTER, base_dtype
from ....core.precision import policy as precision_policy
from ....core.progress import bar
from ....families import replace_layer
from ...calibrated import cycle, lm_loss


def random_groups(num: int, group_size: int, generator: torch.Generator) -> list:
    """A random partition of ``range(num)`` into groups of ``group_size`` (a lone leftover joins the last)."""
    order = torch.randperm(num, generator=generator).tolist()
    groups = [order[i:i + group_size] for i in range(0, num, group_size)]
    if len(groups) > 1 and len(groups[-1]) == 1:
        groups[-2].extend(groups.pop())
    return groups


def sample_candidate(scores: torch.Tensor, groups: list, generator: torch.Generator) -> tuple:
    """Draw which layers a candidate keeps, and the draw's log-probability.

    Args:
        scores: ``(M,)`` importance scores (requires grad for the policy gradient).
        groups: partition of ``range(M)``.

    Returns:
        ``(replaced, log_prob)``: sorted middle positions given to harmonizers, scalar tensor.
    """
    replaced, log_prob = [], scores.new_zeros(())
    for group in groups:
        keep = len(group) - len(group) // 2
        s = scores[group]
        gumbel = -torch.log(-torch.log(torch.rand(len(group), generator=generator).clamp(1e-9, 1 - 1e-9)))
        order = torch.argsort(s.detach() + gumbel.to(s.device), descending=True).tolist()
        remaining = list(range(len(group)))
        for idx in order[:keep]:
            log_prob = log_prob + s[idx] - torch.logsumexp(s[remaining], dim=0)
            remaining.remove(idx)
        replaced.extend(group[i] for i in order[keep:])
    return sorted(replaced), log_prob


def candidate_loss(model, family, middle: list, harmonizers: dict, replaced: list, ids: torch.Tensor):
    """LM loss with the middle positions ``replaced`` swapped for their harmonizers (then restored)."""
    originals = {}
    try:
        for p in replaced:
            originals[p] = replace_layer(model, family, middle[p], harmonizers[middle[p]])
        return lm_loss(model, ids)
    finally:
        for p, layer in originals.items():
            replace_layer(model, family, middle[p], layer)


def dynamic_layer_replace(model, family, middle: list, harmonizers: dict, batches: list, *, steps: int, lr: float,
                          score_lr: float, group_size: int, num_candidates: int, seed: int = 0,
                          precision=None) -> dict:
    """Train ``harmonizers`` and learn importance scores of the ``middle`` layers (in place).

    Args:
        model: the full model; its own parameters are frozen here.
        middle: full-model indices of the middle layers (M of them).
        harmonizers: ``{full index: HarmonizerLayer}``, trained in place.
        batches: calibration batches ``LongTensor (batch, seq)``, cycled.
        steps: policy/harmonizer steps; lr: harmonizer AdamW lr; score_lr: score Adam lr.
        group_size: layers per sampling group; num_candidates: candidate networks per step.
        precision: an :class:`offsite.core.precision.Policy`; default ``auto`` for the model's dtype. The
            harmonizers are cast to fp32 here (no-op when they are already) and stay fp32 masters:
            the caller casts them to the model's dtype once they are done (and cached).

    Returns:
        ``{"scores": {full index: float}, "steps", "seconds", "loss_first", "loss_final"}``.
    """
    model.eval()
    model.requires_grad_(False)
    params = [p for h in harmonizers.values() for p in h.parameters()]
    for p in params:
        p.requires_grad_(True)
    device = model_device(model)
    precision = precision or precision_policy("auto", base_dtype(model), device)
    # Harmonizers cast their input to their own dtype and back (harmonizer.py): no boundary hooks.
    precision.train(modules=harmonizers.values(), boundary=False)
    scores = torch.zeros(len(middle), device=device, dtype=MASTER, requires_grad=True)  # fp32 like every trained part
    h_opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    s_opt = torch.optim.Adam([scores], lr=score_lr)
    # A CPU generator on purpose: the same seed draws the same groups and candidates on every device
    # (only small (group,) noise vectors cross to the device; the draws are host-side choices anyway).
    generator = torch.Generator().manual_seed(seed)
    data, history, started = cycle(batches, device), [], time.time()
    steps_bar = bar(range(steps), "ScaleOT LayerReplace", "step")
    for _ in steps_bar:
        ids = next(data)
        groups = random_groups(len(middle), group_size, generator)
        losses, log_probs = [], []
        for _ in range(num_candidates):
            replaced, log_prob = sample_candidate(scores, groups, generator)
            with precision.autocast():
                loss = candidate_loss(model, family, middle, harmonizers, replaced, ids)
            precision.backward(loss / num_candidates)  # harmonizer gradients; the graph is freed per candidate
            losses.append(loss.item())
            log_probs.append(log_prob)
        precision.clip(h_opt, params, 1.0)
        precision.step(h_opt)
        h_opt.zero_grad(set_to_none=True)
        mean = sum(losses) / len(losses)
        rewards = [-(value - mean) for value in losses]
        policy_loss = -sum(r * lp for r, lp in zip(rewards, log_probs)) / num_candidates
        s_opt.zero_grad(set_to_none=True)
        if policy_loss.requires_grad:  # groups of one layer replace nothing: no policy to improve
            policy_loss.backward()
            s_opt.step()
        history.append(mean)
        steps_bar.set_postfix(loss=f"{mean:.3f}", refresh=False)  # shown at the next redraw: no extra writes
    for p in params:
        p.requires_grad_(False)
    tail = history[-max(1, len(history) // 10):]
    return {"scores": {i: float(s) for i, s in zip(middle, scores.detach().cpu())}, "steps": steps,
            "seconds": round(time.time() - started, 2), "loss_first": history[0] if history else None,
            "loss_final": sum(tail) / len(tail) if tail else None}

