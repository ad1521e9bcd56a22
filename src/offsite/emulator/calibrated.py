"""Small pieces shared by the emulator methods that learn from public calibration text.

Distillation, CRaSh, ScaleOT and GradOT all read calibration windows (``offsite.calibration``), run
the full model on them and compare hidden states or gather statistics; these helpers keep that
plumbing in one place, and :class:`CalibrationSettings` is the one declaration of how the windows
are drawn.
"""

from __future__ import annotations

import dataclasses
import itertools

import torch

from ..calibration.text import calibration_batches, resolve_calibration
from ..core.errors import OffsiteError
from ..core.settings_types import check_range


@dataclasses.dataclass(frozen=True)
class CalibrationSettings:
    """How a calibrated method draws its windows from the calibration text: the one declaration of
    these four settings (names, types and rules) for every method that reads calibration text.

    Each such method's config carries them as flat fields of the same names (``--set seq_len=64``),
    at the method's own defaults; :meth:`of` reads them back (and checks them) from a config. The
    fields stay in each config, at their places, because a package lists its settings in field order:
    declaring them in a shared base class would move them to the front and change every package.

    Attributes:
        seq_len: tokens per calibration window.
        num_sequences: windows drawn from the text.
        batch_size: windows per forward pass (or per training step).
        seed: seed of the window draw.
    """

    seq_len: int
    num_sequences: int
    batch_size: int
    seed: int

    def __post_init__(self):
        for name in ("seq_len", "num_sequences", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise OffsiteError(f"calibration {name} must be a positive integer, got {value!r}")

    @classmethod
    def of(cls, config) -> "CalibrationSettings":
        """The calibration settings of a method's ``config`` (any object with the four attributes).

        Raises:
            OffsiteError: a count that is not a positive integer (configs call this from their
                ``__post_init__``, so ``make_config`` refuses it before any work).
        """
        return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls)})


def load_calibration(calibration, tokenizer, method: str, settings: CalibrationSettings) -> list:
    """Calibration batches for ``method``.

    Args:
        calibration: a text file (``.txt``/``.gz``/``.jsonl``), None for the default public corpus,
            or ready batches (a list of ``LongTensor (batch, seq)``, e.g. from the Python API).
        tokenizer: the base model's tokenizer (needed for a file).
        settings: how many windows of how many tokens, in batches of what size, from which seed.

    Returns:
        A non-empty list of ``LongTensor (batch, seq_len)``.

    Raises:
        OffsiteError: no calibration available, missing/empty file, or too little text.
    """
    if isinstance(calibration, (list, tuple)):
        if not calibration or not all(torch.is_tensor(b) and b.dtype == torch.long and b.ndim == 2
                                      for b in calibration):
            raise OffsiteError(f"method '{method}': calibration batches must be a non-empty list of 2-D LongTensors")
        return list(calibration)

    path = resolve_calibration(calibration, method)
    return calibration_batches(path, tokenizer, seq_len=settings.seq_len, num_sequences=settings.num_sequences,
                               batch_size=settings.batch_size, seed=settings.seed)


def cycle(batches: list, device) -> "itertools.cycle":
    """Endless iterator over ``batches`` moved to ``device`` (the list is small: calibration windows)."""
    moved = [b.to(device) for b in batches]
    return itertools.cycle(moved)


def lm_loss(model, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``model`` on ``ids (batch, seq)`` (every token a label)."""
    return model(input_ids=ids, labels=ids, use_cache=False).loss


def normalised_mse(student: torch.Tensor, teacher: torch.Tensor, scale: str = "global") -> torch.Tensor:
    """OT's distillation loss: ``mean(((teacher - student) / rms(teacher))**2)``.

    ``scale="global"`` (OT): ``rms(teacher) = sqrt(mean(teacher**2))`` over all elements.
    ``scale="token"``: each position's error is divided by that position's own rms over the hidden
    size. Real LMs write a *massive activation* at the first token (SmolLM2-135M: norm ~22 700 at
    token 0 against ~160 elsewhere from layer 11 on, bench/results/real_diagnose), which holds over
    99% of a global rms's energy; a global scale then spends the whole loss on copying that one
    position. The scale is detached (it is a scale, not a target), so either way the loss is 1.0 for
    a student that outputs zeros and 0.0 for a perfect copy.

    Args:
        student, teacher: ``(batch, seq, hidden)`` hidden states.
        scale: ``"global"`` or ``"token"``.
    """
    teacher = teacher.float()
    if scale == "token":
        rms = teacher.pow(2).mean(dim=-1, keepdim=True).sqrt()
    elif scale == "global":
        rms = teacher.pow(2).mean().sqrt()
    else:
        raise OffsiteError(f"kd scale must be 'global' or 'token', got {scale!r}")
    return ((teacher - student.float()) / rms.clamp_min(1e-12).detach()).pow(2).mean()


def check_fraction(name: str, value, *, low: float = 0.0, high: float = 1.0, high_open: bool = False) -> float:
    """``value`` as a float in ``[low, high]`` (or ``[low, high)``), else a clear OffsiteError."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise OffsiteError(f"{name} must be a number, got {value!r}") from None
    check_range(name, value, at_least=low, **({"below": high} if high_open else {"at_most": high}))
    return value


def check_positive(name: str, value, *, allow_zero: bool = False) -> None:
    """Refuse a non-integer or non-positive count with the setting's name."""
    if not isinstance(value, int) or isinstance(value, bool) or value < (0 if allow_zero else 1):
        raise OffsiteError(f"{name} must be an integer >= {0 if allow_zero else 1}, got {value!r}")
