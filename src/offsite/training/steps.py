"""How one optimizer step gets its gradients: one class per training mode, one call per step.

:func:`offsite.training.loop.train` owns what every mode shares (AdamW, the schedule, checkpoints,
validation, the divergence checks) and asks its step for the gradients of step ``n``:
``loss, norm = step.gradients(n, diverged)``. The step leaves the clipped gradients in ``.grad``
and returns the step's loss (summed over micro-batches) and the gradient norm before clipping.

* :class:`Plain`: ``grad_accum`` micro-batches, each cut into parts of similar length
  (:mod:`.parts`), loss backward under the precision policy, clipping to ``max_grad_norm``.
* :class:`Proximal`: Plain plus a loss term of the trained weights added once per micro-batch
  (FedProx's proximal term, :mod:`offsite.federate`).
* :class:`Sharded`: Plain over this process's shard of every micro-batch, losses weighted to the
  whole micro-batch's token mean and gradients summed over processes before clipping
  (:mod:`.distributed`).
* :class:`Private`: DP-SGD (:mod:`.dp`): the step's Poisson sample, per-example clipping and
  noise in place of the micro-batches and the batch clipping.

A new mode is one more class here with ``gradients`` (and ``attach`` when it wraps the optimizer).
"""

from __future__ import annotations

import math

from ..core.errors import OffsiteError
from ..data.token_loss import mean_loss
from .parts import split


class Plain:
    """Micro-batches of the shuffled training set, accumulated and clipped (the default mode).

    Args:
        model: the model being trained; params: ``{name: parameter}`` that train.
        precision: the run's :class:`offsite.core.precision.Policy`.
        batches: the run's batcher (micro-batch ``i`` -> padded batch of token ids ``(batch, seq)``).
        cfg: the run's ``FinetuneConfig``; budget: tokens per forward part (0: whole micro-batches).
    """

    keeps_best = True
    """Whether the loop may keep the weights of the best validation loss (not under DP-SGD)."""

    def __init__(self, model, params: dict, precision, batches, cfg, budget: int):
        self.model, self.params, self.precision, self.batches = model, params, precision, batches
        self.cfg, self.budget = cfg, budget
        self.autocast = precision.autocast()
        self.optimizer = None

    def attach(self, optimizer) -> None:
        self.optimizer = optimizer

    def gradients(self, step: int, diverged) -> tuple:
        """Clipped gradients of optimizer step ``step`` (0-based) in ``.grad``; returns ``(loss, norm)``.

        Args:
            diverged: ``diverged(what)`` -> the error that stops the run (raised here on a NaN loss,
                before backward: a NaN must never reach the weights).
        """
        cfg, loss_sum = self.cfg, 0.0
        for micro in range(cfg.grad_accum):
            batch = self.batches(step * cfg.grad_accum + micro)
            # Parts of similar length (.parts): no compute or activations for padding.
            for k, (part, share) in enumerate(split(batch, self.budget)):
                with self.autocast:  # the head only where a label is scored, unless cfg.logits is "full"
                    loss, anchor = mean_loss(self.model, part, cfg.logits)
                    loss = loss * share / cfg.grad_accum
                if k == 0:
                    loss = self.once_per_micro_batch(loss)
                loss, value = self.weigh(loss, part, anchor)
                del anchor  # not needed past here: free full logits before backward
                if not math.isfinite(value):
                    raise diverged(f"loss is {value}")
                self.precision.backward(loss)
                loss_sum += value
        self.reduce()
        return loss_sum, self.precision.clip(self.optimizer, self.params.values(), cfg.max_grad_norm)

    def once_per_micro_batch(self, loss):
        """A term added to the loss of each micro-batch's first part (none here)."""
        return loss

    def weigh(self, loss, part: dict, anchor) -> tuple:
        """``(loss to back-propagate, its value)`` of one part."""
        return loss, loss.item()

    def reduce(self) -> None:
        """What the accumulated gradients need before clipping (nothing in one process)."""


class Proximal(Plain):
    """Plain plus ``penalty()``, a scalar of the trained weights, added once per micro-batch (FedProx).

    The term is computed in fp32, outside autocast, and divided by ``grad_accum`` like the loss.
    """

    def __init__(self, model, params: dict, precision, batches, cfg, budget: int, penalty):
        super().__init__(model, params, precision, batches, cfg, budget)
        self.penalty = penalty

    def once_per_micro_batch(self, loss):
        return loss + self.penalty() / self.cfg.grad_accum


class Sharded(Plain):
    """Plain on this process's shard of every micro-batch (``batch_size`` is the global one).

    Args:
        group: the :class:`offsite.training.distributed.Group` of the run.
    """

    def __init__(self, model, params: dict, precision, batches, cfg, budget: int, group):
        super().__init__(model, params, precision, batches, cfg, budget)
        self.group = group

    def weigh(self, loss, part: dict, anchor) -> tuple:
        # Every process gets the same value, so all of them stop together on a NaN.
        return self.group.weigh(loss, part["labels"], anchor)

    def reduce(self) -> None:
        self.group.sum_grads(self.params.values())  # before clipping: every process clips the same gradients


class Private:
    """DP-SGD: the step's Poisson sample, clipped per example and noised (an :class:`offsite.training.dp.DPSGD`).

    The last weights are kept: choosing the best by the loss on private validation data is outside
    the guarantee.
    """

    keeps_best = False

    def __init__(self, dp, precision):
        self.dp, self.autocast = dp, precision.autocast()

    def attach(self, optimizer) -> None:
        self.dp.attach(optimizer)  # the schedule and checkpoints keep working on the AdamW underneath

    def gradients(self, step: int, diverged) -> tuple:
        loss = self.dp.backward(step, self.autocast, diverged)
        return loss, self.dp.privatize(step)  # clipped, summed, noised, averaged into .grad


def choose(model, params: dict, precision, batches, cfg, budget: int, private=None, group=None, penalty=None):
    """The step of a run: :class:`Private` with ``private``, :class:`Sharded` with ``group``,
    :class:`Proximal` with ``penalty``, else :class:`Plain`.

    Raises:
        OffsiteError: a penalty with DP-SGD or several processes (no mode combines them).
    """
    if penalty is not None and (private is not None or group is not None):
        raise OffsiteError("a loss penalty cannot be combined with DP-SGD or several processes")
    if private is not None:
        return Private(private, precision)
    if group is not None:
        return Sharded(model, params, precision, batches, cfg, budget, group)
    if penalty is not None:
        return Proximal(model, params, precision, batches, cfg, budget, penalty)
    return Plain(model, params, precision, batches, cfg, budget)
