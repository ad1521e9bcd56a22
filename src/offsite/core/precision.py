"""Mixed-precision policy of every trained part: fp32 master weights beside checkpoint-dtype frozen ones.

Why one module: the adapter (or its LoRA), the OT-KD student and ScaleOT's harmonizers and
importance scores are all small trained parts inside a large frozen model. Trained in bf16 with no
fp32 copy, an update smaller than half a bf16 step (2**-8 of the weight) rounds away: most entries
never move and norm scales (~1.0) freeze entirely. Every training loop therefore follows the
policy written here:

1. Frozen parts (emulator layers, embeddings, head, the teacher or full model during calibration)
   stay in the checkpoint dtype (:func:`base_dtype`): no extra memory for what does not train.
2. Trained parameters are cast to fp32 in place (:meth:`Policy.train`) before the optimizer is
   built, so AdamW holds and updates fp32 master weights (and fp32 moments).
3. Compute (``precision``, one of :data:`PRECISIONS`):

   * ``auto``: on CUDA, fp16 autocast for fp16 models, else bf16 autocast where the GPU supports
     it, else none; on CPU, bf16 autocast for bf16 models, else none (bf16 autocast is slower than
     fp32 on CPUs without AMX, and CPU fp16 autocast is slow, so fp16 models on CPU compute each
     layer in its own dtype: the trained ones in fp32); elsewhere none.
   * ``fp32``: no autocast; every layer computes in its own parameters' dtype.
   * ``bf16`` / ``fp16``: autocast to that dtype (CPU autocast supports both; fp16 is slow there);
     refused on a model stored in the other 16-bit format, whose frozen layers would mix the two.

4. Layer boundaries: autocast does not cover every op (norms and residual adds follow type
   promotion) and is off in some of the cases above, so a trained layer beside frozen bf16/fp16
   ones is wrapped by two hooks: a forward pre-hook casts its floating inputs (hidden states,
   masks, rotary tables) to fp32 and a forward hook casts the hidden states it returns back to the
   frozen dtype. The residual stream therefore keeps the checkpoint dtype everywhere (as in the
   deployed model), and no dtype mismatch can reach a matmul whether autocast is on or off.
   Modules that already cast at their edges (PEFT's LoRA layers, ScaleOT's harmonizer) need none.
5. Loss scaling: wherever fp16 takes part (fp16 autocast or fp16 frozen weights) the loss is
   scaled by a ``torch.amp.GradScaler`` so small gradients do not underflow; an overflowing step is
   skipped and the scale halved, and only a step that overflows at scale < 1 is a divergence.
6. Saved artifacts return to the base dtype (:func:`for_saving`): the adapter's tensors, and the
   emulator weights after distillation or ScaleOT (:meth:`Trained.restore`), so a plugged bf16
   model is a bf16 checkpoint again. LoRA tensors stay fp32: that is PEFT's format on 16-bit
   bases, it plugs into the base read in bf16 or fp32 (the strict checks allow both), rounding
   would erase most of lora_A's small updates, and a merged model is in the base dtype anyway.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch

from .errors import OffsiteError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
MASTER = torch.float32  # dtype every trained parameter is held and updated in
_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``: how manifests, tables and messages name a dtype."""
    return str(dtype).replace("torch.", "")


def base_dtype(model: torch.nn.Module) -> torch.dtype:
    """The model's checkpoint dtype: its input embedding's (frozen in every workflow of offsite)."""
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embedding, "weight", None)
    if weight is None:
        weight = next((p for p in model.parameters() if p.is_floating_point()), None)
    return weight.dtype if weight is not None else MASTER


def for_saving(tensors: dict, dtype: torch.dtype) -> dict:
    """``{name: tensor}`` cast to ``dtype`` (the base dtype) for writing; no copy when it already is."""
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}


def _cast(value, dtype: torch.dtype):
    """Floating tensors in ``value`` (a tensor, or a tuple/list of them, nested) cast to ``dtype``."""
    if torch.is_tensor(value):
        return value.to(dtype) if value.is_floating_point() and value.dtype != dtype else value
    if isinstance(value, (tuple, list)) and not hasattr(value, "_fields"):  # named tuples are left alone
        return type(value)(_cast(v, dtype) for v in value)
    return value


class Trained:
    """Handle of the parts :meth:`Policy.train` cast to fp32: remove their hooks, or cast them back."""

    def __init__(self, modules: list, params: list, hooks: list, frozen: torch.dtype):
        self.modules, self.params, self.hooks, self.frozen = modules, params, hooks, frozen

    def release(self) -> None:
        """Remove the boundary hooks (the fp32 weights stay: they are written through :func:`for_saving`)."""
        for hook in self.hooks:
            hook.remove()
        self.hooks = []

    def restore(self) -> None:
        """Remove the hooks and cast the trained parts back to the frozen dtype (for a package's weights)."""
        self.release()
        with torch.no_grad():
            for module in self.modules:
                module.to(self.frozen)
            for p in self.params:
                p.data = p.data.to(self.frozen)


@dataclasses.dataclass
class Policy:
    """The resolved policy of one run (see the module docstring); build it with :func:`policy`.

    Attributes:
        frozen: dtype of the frozen weights (the checkpoint's).
        device_type: ``"cuda"``, ``"cpu"``, ...
        compute: autocast dtype, or None when autocast is off.
        scaler: loss scaler when fp16 takes part, else None.
    """

    frozen: torch.dtype
    device_type: str
    compute: torch.dtype | None
    scaler: torch.amp.GradScaler | None

    def autocast(self):
        """Context manager for forward passes (and the loss): autocast to ``compute``, or nothing."""
        if self.compute is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.compute)

    def train(self, modules=(), params=(), boundary: bool = True) -> Trained:
        """Hold trained parts in fp32, in place (same Parameter objects), before the optimizer exists.

        Args:
            modules: whole trained modules (decoder layers, harmonizers): parameters and floating
                buffers become fp32.
            params: loose trained parameters (LoRA weights, scores) cast in place.
            boundary: hook the ``modules`` so inputs enter in fp32 and hidden states leave in the
                frozen dtype; pass False for modules that cast at their own edges.

        Returns:
            The :class:`Trained` handle (hooks to remove, parts to cast back).
        """
        modules, params = list(modules), list(params)
        hooks = []
        with torch.no_grad():
            for module in modules:
                module.to(MASTER)
                if boundary and self.frozen != MASTER:  # an fp32 model needs no boundary
                    hooks.append(module.register_forward_pre_hook(_enter, with_kwargs=True))
                    hooks.append(module.register_forward_hook(_leaving(self.frozen)))
            for p in params:
                p.data = p.data.to(MASTER)
        return Trained(modules, params, hooks, self.frozen)

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``, through the loss scaler when there is one."""
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def clip(self, optimizer, params, max_norm: float) -> float:
        """Unscale the gradients (when scaled), clip them to ``max_norm``; returns their total norm."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    def overflow_skips(self) -> bool:
        """Whether a non-finite gradient norm now is fp16 overflow the scaler absorbs by skipping the step.

        True while the scale is still >= 1: gradients that overflow even unscaled are a divergence.
        """
        return self.scaler is not None and self.scaler.get_scale() >= 1.0

    def step(self, optimizer) -> None:
        """``optimizer.step()``; with loss scaling the scaler skips overflowing steps and adapts its scale."""
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)
        self.scaler.update()

    def state(self) -> dict | None:
        """JSON-able loss-scaler state for checkpoints (None without a scaler)."""
        return None if self.scaler is None else dict(self.scaler.state_dict())

    def load_state(self, state: dict | None) -> None:
        """Inverse of :meth:`state` (a checkpoint resumes with the scale it had)."""
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


def _enter(module, args: tuple, kwargs: dict):
    """Forward pre-hook: floating inputs of a trained layer (hidden states, masks, rotary) in fp32."""
    return _cast(args, MASTER), {k: _cast(v, MASTER) for k, v in kwargs.items()}


def _leaving(frozen: torch.dtype):
    def hook(module, args, output):
        """Forward hook: the hidden states (a tensor, or the first element of a tuple) back in ``frozen``."""
        if isinstance(output, tuple) and output and torch.is_tensor(output[0]):
            return (_cast(output[0], frozen),) + output[1:]
        return _cast(output, frozen) if torch.is_tensor(output) else output

    return hook


def policy(precision: str, frozen: torch.dtype, device) -> Policy:
    """Resolve ``precision`` for weights frozen in ``frozen`` on ``device`` (rules: module docstring).

    Args:
        precision: one of :data:`PRECISIONS`.
        frozen: the frozen weights' dtype, usually :func:`base_dtype` of the model.
        device: ``torch.device`` or name where the run computes.

    Raises:
        OffsiteError: unknown precision, or one the device cannot run (bf16 on a GPU without it,
            autocast on a device type torch has none for).
    """
    if precision not in PRECISIONS:
        raise OffsiteError(f"precision {precision!r} unknown; allowed: {', '.join(PRECISIONS)}")
    kind = torch.device(device).type
    cuda_bf16 = kind == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if precision == "auto":
        if kind == "cuda":
            precision = "fp16" if frozen == torch.float16 else "bf16" if cuda_bf16 else "fp32"
        else:
            precision = "bf16" if kind == "cpu" and frozen == torch.bfloat16 else "fp32"
    compute = _AUTOCAST.get(precision)
    if compute is not None and not torch.amp.autocast_mode.is_autocast_available(kind):
        raise OffsiteError(f"precision {precision}: torch has no autocast for device '{kind}'; use fp32 or auto")
    if precision == "bf16" and kind == "cuda" and not cuda_bf16:
        raise OffsiteError("precision bf16: this GPU does not support bfloat16; use fp16 or fp32")
    if compute is not None and frozen in _AUTOCAST.values() and compute != frozen:
        # The frozen layers would mix two 16-bit formats (weights in one, matmul outputs in the other).
        have = "bf16" if frozen == torch.bfloat16 else "fp16"
        raise OffsiteError(f"precision {precision} on a model stored in {have}: the frozen layers would mix two "
                           f"16-bit formats; use auto, fp32 or {have}, or build the emulator with "
                           f"--dtype {'bfloat16' if precision == 'bf16' else 'float16'}")
    fp16 = compute == torch.float16 or frozen == torch.float16
    return Policy(frozen, kind, compute, torch.amp.GradScaler(kind) if fp16 else None)
