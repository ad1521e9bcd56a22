"""OT-KD: uniform layer drop refined by knowledge distillation against the original middle.

Paper: Xiao, Lin, Han, "Offsite-Tuning: Transfer Learning without Full Model" (arXiv 2302.04870);
the recipe follows the released code (``run_clm.py --train_module student``).

Algorithm: the student is the uniform-drop emulator (same kept layers as ``--method uniform``).
On public calibration text, the student is trained with
``loss = lm_weight * LM + kd_weight * mean(((h_T - h_S) / rms(h_T))**2)``, where ``h_T`` is the
hidden state leaving the teacher's (the original model's) middle and ``h_S`` the student's, both
fed the same input (the frozen bottom adapter's output). Only the student's middle layers train;
adapter layers, embeddings, final norm and head stay frozen. OT uses kd_weight 30, lm_weight 1.

Departures (each a setting): the budget is CPU-minutes (``steps`` x ``batch_size`` windows of
``seq_len`` tokens from the calibration text) instead of a Pile shard for an epoch; lr 1e-4 with a
short warmup and cosine decay, as OT, but over far fewer steps; dropout is off during distillation
(short budgets gain nothing from the noise). With adapter layers inside the stack (``idx:``
splits) the middle has several segments: the KD term averages over the hidden state entering each
adapter layer that follows middle layers (and the stack's output if it ends with middle layers);
with the OT split ``a,b`` this is exactly OT's single middle output.

How the teacher runs: its middle outputs are computed once per calibration batch while planning
(the teacher is frozen and in eval mode, so they are the very values OT's per-step teacher forward
gives; they are kept in ``inputs.learned``, not in the plan), ``apply`` cuts the base model down to
the student in place, and ``train`` distils it. Memory is the model plus the targets,
``windows x seq x hidden`` per KD point, instead of two models; and with ``emulate --stream`` the
targets come from the layer-by-layer forward (:mod:`offsite.calibration.layerwise`), so only the
student's layers are ever in memory.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time

import torch

from ...calibration import capture_boundaries_layerwise
from ...core.device import model_device
from ...core.errors import OffsiteError
from ...core.precision import base_dtype, policy as precision_policy
from ...core.progress import bar
from ...core.schedule import lr_lambda
from ...families import capture_hidden, get_layers
from ..base import EmulatorBuilder, layer_count_points, layer_entries, register
from ..calibrated import CalibrationSettings, check_fraction, check_positive, normalised_mse
from ..inputs import BuildInputs
from .uniform import uniform_middle


@dataclasses.dataclass
class DistillConfig:
    """Settings of OT-KD (distilled uniform-drop emulator)."""

    emulator_layers: int | None = None
    """Middle layers the student keeps (uniform positions); default 70% of the middle (uniform.DEFAULT_KEEP_FRACTION)."""
    steps: int = 100
    """Distillation steps (one calibration batch each)."""
    lr: float = 1e-4
    """Peak learning rate (AdamW, warmup then cosine)."""
    warmup_steps: int = 10
    """Linear warmup steps."""
    kd_weight: float = 30.0
    """Weight of the normalised-MSE hidden-state loss (OT: 30)."""
    kd_scale: str = "token"
    """How the hidden-state error is normalised: "token" (each position by its own rms) or "global"
    (OT: one rms over the whole batch, which a first-token massive activation dominates)."""
    lm_weight: float = 1.0
    """Weight of the language-modelling loss (OT: 1)."""
    batch_size: int = 4
    """Calibration windows per step."""
    seq_len: int = 128
    """Tokens per calibration window."""
    num_sequences: int = 256
    """Calibration windows drawn from the text (cycled over the steps)."""
    max_grad_norm: float = 1.0
    """Gradient clipping."""
    seed: int = 0
    """Seed of the window draw."""

    def __post_init__(self):
        check_positive("steps", self.steps)
        CalibrationSettings.of(self)
        check_positive("warmup_steps", self.warmup_steps, allow_zero=True)
        if self.emulator_layers is not None:
            check_positive("emulator_layers", self.emulator_layers, allow_zero=True)
        check_fraction("lr", self.lr, high=1.0)
        for name in ("kd_weight", "lm_weight", "max_grad_norm"):
            if not math.isfinite(float(getattr(self, name))) or float(getattr(self, name)) < 0:
                raise OffsiteError(f"{name} must be a finite number >= 0, got {getattr(self, name)!r}")
        if self.kd_scale not in ("token", "global"):
            raise OffsiteError(f"kd_scale must be 'token' or 'global', got {self.kd_scale!r}")
        if self.kd_weight == 0 and self.lm_weight == 0:
            raise OffsiteError("kd_weight and lm_weight are both 0: there is nothing to train on")


def kd_points(sources: list, split) -> list:
    """Where the middle hands over to the adapter, as ``(kind, full_index)`` capture points.

    ``("in", j)``: the input of adapter layer j whose predecessor is a middle layer;
    ``("out", L-1)``: the stack's output when the last layer is a middle layer.
    """
    middle, points = set(split.middle), []
    for j in split.adapter:
        if j > 0 and (j - 1) in middle:
            points.append(("in", j))
    if (split.num_layers - 1) in middle:
        points.append(("out", split.num_layers - 1))
    return points


def kd_plan(split, plan: dict) -> tuple:
    """Where the student is matched to the teacher, from the split and the plan's layer table.

    Returns:
        ``(points, student_points, skipped)``: the KD points as full-model capture points
        (:func:`kd_points`), the same points in the student (emulator positions), and why there is
        nothing to distil (no middle layer kept, or none handing over to the adapter), else None.
    """
    sources = [e["source"] for e in plan["layers"]]
    points = kd_points(sources, split)
    position = {src: pos for pos, src in enumerate(sources)}
    student_points = [(k, position[i]) if k == "in" else (k, len(sources) - 1) for k, i in points]
    if not any(e["role"] == "emulator" for e in plan["layers"]):
        return points, student_points, "no middle layer to train"
    return points, student_points, None if points else "no middle output to match"


def teacher_targets(model, family, batches: list, points: list, precision, stream=None) -> list:
    """The teacher's hidden states at the KD ``points`` for every calibration batch, computed once.

    Args:
        model: the base model (frozen, eval mode); with ``stream`` its streamed skeleton.
        batches: ``LongTensor (batch, seq)`` list.
        points: ``(kind, full_index)`` from :func:`kd_points`.
        precision: the run's policy; targets are computed under its autocast, as the student trains.
        stream: a :class:`offsite.model.streaming.StreamedModel`, or None for a model in memory.

    Returns:
        ``targets[b][k]``: ``(batch, seq, hidden)`` at point k for batch b, on the model's device.
    """
    # the hidden state entering adapter layer j is the one leaving layer j-1
    leaving = [i - 1 if kind == "in" else i for kind, i in points]
    targets = [[None] * len(points) for _ in batches]
    with torch.no_grad(), precision.autocast():
        if stream is not None:
            def on_output(i, b, out):
                for k, where in enumerate(leaving):
                    if where == i:
                        targets[b][k] = out

            capture_boundaries_layerwise(model, family, batches, stream, with_grads=False, on_output=on_output,
                                         retain=False)
            return targets
        device = model_device(model)
        with capture_hidden(model, family, **_hooks(points)) as store:
            for b, ids in enumerate(batches):
                _body(model)(input_ids=ids.to(device), use_cache=False)
                targets[b] = [store[p].detach() for p in points]
    return targets


def _body(model):
    """The decoder stack without the LM head (its logits are not needed for targets)."""
    return getattr(model, model.base_model_prefix, model)


def distill_gap(student, family, batches: list, targets: list, student_points: list,
                scale: str = "token") -> float:
    """Mean normalised MSE between student middle outputs and the teacher's ``targets`` (no grad)."""
    total = 0.0
    with torch.no_grad():
        for ids, target in zip(batches, targets):
            total += _kd_loss(student, family, ids, target, student_points, scale).item()
    return total / len(batches)


def _kd_loss(student, family, ids, target: list, student_points, scale: str, lm_out: list | None = None):
    """KD term for one batch against its teacher ``target``; with ``lm_out`` a list, the LM loss is appended."""
    with capture_hidden(student, family, **_hooks(student_points)) as s_store:
        out = student(input_ids=ids, labels=ids if lm_out is not None else None, use_cache=False)
    if lm_out is not None:
        lm_out.append(out.loss)
    terms = [normalised_mse(s_store[s], t, scale) for s, t in zip(student_points, target)]
    return torch.stack(terms).mean()


def _hooks(points: list) -> dict:
    return {"outputs_of": [i for k, i in points if k == "out"], "inputs_of": [i for k, i in points if k == "in"]}


@register
class Distill(EmulatorBuilder):
    name = "distill"
    size_knob = "emulator_layers"

    def size_points(self, middle: int) -> list:
        return layer_count_points(middle)

    config_cls = DistillConfig
    needs_calibration = True
    supports_stream = True  # the teacher's targets come from a layer-by-layer forward; the student is in memory

    def plan(self, model, family, split, config, inputs=None, on_layer=None) -> dict:
        """The student's structure (uniform drop), and the teacher's targets for :meth:`train`.

        The targets (the original middle's outputs at the KD points, per calibration batch) go to
        ``inputs.learned["targets"]``; with ``inputs.stream`` they come from the layer-by-layer forward.
        """
        inputs = BuildInputs() if inputs is None else inputs
        batches = inputs.batches(self.name, CalibrationSettings.of(config))
        kept = uniform_middle(split, config.emulator_layers)
        plan = {"layers": layer_entries(split, kept), "emulator_layers": len(kept)}
        points, _, skipped = kd_plan(split, plan)
        if skipped is None:
            model.eval()  # the teacher runs without dropout (its weights stay as they are)
            precision = precision_policy("auto", base_dtype(model), model_device(model))
            inputs.learned["targets"] = teacher_targets(model, family, batches, points, precision, inputs.stream)
        return plan

    def apply(self, model, family, split, plan, inputs=None):
        """Cut the base model down to the student, in place. Streamed, the student's layers are read into
        memory first when it will train (they train there, and stay until the package is written)."""
        stream = None if inputs is None else inputs.stream
        if stream is not None and kd_plan(split, plan)[2] is None:
            for entry in plan["layers"]:
                stream.materialize(entry["source"])
        return super().apply(model, family, split, plan, inputs).eval()

    def train(self, emulator, family, split, config, plan, inputs) -> dict:
        """Distil the student's middle layers against the teacher's targets (from :meth:`plan`).

        Returns:
            The distillation record (stored as ``plan["distill"]``): steps, weights, the KD points,
            the first/final losses and the gap to the teacher before and after; or, with nothing to
            train, why.
        """
        points, s_points, skipped = kd_plan(split, plan)
        record = {"steps": 0, "kd_weight": config.kd_weight, "lm_weight": config.lm_weight,
                  "kd_scale": config.kd_scale, "points": [f"{k}:{i}" for k, i in points]}
        if skipped is not None:
            record["skipped"] = skipped
            return record
        emulator.requires_grad_(False)
        batches, targets = inputs.batches(self.name, CalibrationSettings.of(config)), inputs.learned["targets"]
        precision = precision_policy("auto", base_dtype(emulator), model_device(emulator))
        layers = get_layers(emulator, family)
        middle = [layers[pos] for pos, e in enumerate(plan["layers"]) if e["role"] == "emulator"]
        trainable = [p for layer in middle for p in layer.parameters()]
        # moved once: calibration batches are CPU token ids and the probe runs before and after training
        probe = [b.to(model_device(emulator)) for b in batches[: min(2, len(batches))]]
        record["gap_before"] = distill_gap(emulator, family, probe, targets, s_points, config.kd_scale)

        for p in trainable:
            p.requires_grad_(True)
        # The middle layers train as fp32 masters beside the frozen parts in the checkpoint dtype
        # (offsite.core.precision); cast before AdamW is built so its state is fp32 too.
        trained = precision.train(modules=middle)
        optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda("cosine", config.warmup_steps,
                                                                          config.steps))
        data = itertools.cycle([(ids.to(model_device(emulator)), target) for ids, target in zip(batches, targets)])
        started, history = time.time(), []
        steps_bar = bar(range(config.steps), "distill", "step")
        for _ in steps_bar:
            lm = []
            ids, target = next(data)
            with precision.autocast():
                kd = _kd_loss(emulator, family, ids, target, s_points, config.kd_scale, lm_out=lm)
                loss = config.lm_weight * lm[0] + config.kd_weight * kd
            precision.backward(loss)
            precision.clip(optimizer, trainable, config.max_grad_norm)
            precision.step(optimizer)
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            history.append((lm[0].item(), kd.item()))
            steps_bar.set_postfix(lm=f"{history[-1][0]:.3f}", kd=f"{history[-1][1]:.4f}", refresh=False)
        emulator.requires_grad_(False)
        trained.restore()  # the package holds the base dtype (a bf16 checkpoint gives a bf16 emulator)
        tail = history[-max(1, len(history) // 10):]
        record.update(steps=config.steps, seconds=round(time.time() - started, 2),
                      lm_first=history[0][0], kd_first=history[0][1],
                      lm_final=sum(h[0] for h in tail) / len(tail), kd_final=sum(h[1] for h in tail) / len(tail),
                      gap_after=distill_gap(emulator, family, probe, targets, s_points, config.kd_scale))
        return record
