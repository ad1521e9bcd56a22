"""The emulator-builder interface and its registry.

Every method has the same shape: a config dataclass, ``plan()`` that decides the emulator's
structure as plain JSON-able data (saved in the manifest), ``apply()`` that turns the full model
into the emulator following the plan, and ``restructure()`` that rebuilds the emulator's module
shapes from the plan alone, so a package loads without calibration data. Methods register by name.
"""

from __future__ import annotations

import dataclasses

from ..errors import OffsiteError
from ..families import Family, get_layers, set_layers
from ..settings_types import check_types
from ..split import Split

_REGISTRY: dict = {}


class EmulatorBuilder:
    """Base class of emulator methods (the only other abstract class besides :class:`Family`)."""

    name: str = ""
    config_cls: type = None
    needs_calibration: bool = False
    supports_stream: bool = False
    """Whether ``build`` works on a streamed base model (``emulate --stream``)."""
    stream_refusal: str | None = None
    """Why a method without ``supports_stream`` cannot stream (said when ``--stream`` is refused)."""
    size_knob: str | None = None
    """The setting that sets the emulator's size (what ``offsite frontier`` sweeps), or None."""

    def size_points(self, middle: int) -> list:
        """Default values of :attr:`size_knob` for a split with ``middle`` middle layers (small to large)."""
        return []

    def make_config(self, **kwargs):
        """Build the method's config, refusing unknown settings and values of the wrong type.

        Types are checked against the config's field annotations (see :mod:`offsite.settings_types`):
        ``emulator_layers="abc"`` or ``2.5`` is refused, ``2.0`` becomes ``2``.

        Raises:
            OffsiteError: an unknown setting (with the known ones), a wrong type, or the method's own
                refusal of a value.
        """
        known = {f.name for f in dataclasses.fields(self.config_cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise OffsiteError(f"method '{self.name}' has no setting(s) {unknown}; known: {sorted(known)}")
        # The method's own checks go first: they know the allowed range ("alpha must be in [0, 1]"),
        # which says more than a type. The type check then refuses what they let through (2.5 for a
        # count) or crashed on (int("abc")).
        try:
            self.config_cls(**kwargs)
        except OffsiteError:
            raise
        except (TypeError, ValueError, OverflowError):
            pass  # a wrong type broke the method's check; check_types names it (or, if not, a bug re-raises)
        return self.config_cls(**check_types(self.config_cls, kwargs, f"method '{self.name}': setting"))

    def plan(self, model, family: Family, split: Split, config, calibration=None) -> dict:
        raise NotImplementedError

    def apply(self, model, family: Family, split: Split, plan: dict):
        """Default: keep the plan's layers (``plan["layers"]``) and drop the rest, in place."""
        keep_layers(model, family, [entry["source"] for entry in plan["layers"]])
        return model

    def build(self, model, family: Family, split: Split, config, calibration=None, tokenizer=None,
              stream=None) -> tuple:
        """Plan, then apply: ``(plan, emulator)``. The emulate workflow calls this.

        Methods whose emulator weights come out of training (distillation, ScaleOT's harmonizers)
        override it, because what they learn is not plain data that ``plan`` could return.

        Args:
            calibration: public calibration text (path) or ready batches, for methods that need it.
            tokenizer: the base model's tokenizer (to tokenise the calibration text), or None.
            stream: a :class:`offsite.streaming.StreamedModel` (methods with ``supports_stream``):
                ``model`` is its skeleton. The emulator returned may then keep layers on ``meta``:
                a layer the method changed must be parked (:meth:`~offsite.streaming.StreamedModel.park`),
                one it keeps as it is stays on disk, and the package writer reads both back.
        """
        plan = self.plan(model, family, split, config, calibration=calibration)
        return plan, self.apply(model, family, split, plan)

    def restructure(self, model, family: Family, plan: dict) -> None:
        """Reshape a freshly built emulator skeleton to match the plan (default: nothing to do)."""


def register(cls: type) -> type:
    """Class decorator registering a builder under ``cls.name``."""
    _REGISTRY[cls.name] = cls()
    return cls


def get_builder(name: str) -> EmulatorBuilder:
    if name not in _REGISTRY:
        raise OffsiteError(f"unknown emulator method {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def available_methods() -> list:
    return sorted(_REGISTRY)


def keep_layers(model, family: Family, sources: list) -> None:
    """Keep only the decoder layers at full-model indices ``sources`` (in that order)."""
    layers = get_layers(model, family)
    set_layers(model, family, [layers[i] for i in sources], sources)


def layer_entries(split: Split, kept_middle: list) -> list:
    """The plan's layer table: adapter layers plus the kept middle layers, in full-model order.

    Returns:
        ``[{"source": full_index, "role": "adapter" | "emulator"}, ...]``, one entry per emulator layer.
    """
    adapter = set(split.adapter)
    sources = sorted(set(split.adapter) | set(kept_middle))
    return [{"source": i, "role": "adapter" if i in adapter else "emulator"} for i in sources]


def layer_count_points(middle: int) -> list:
    """About a quarter, a half and three quarters of ``middle`` layers kept (distinct, 1..middle-1)."""
    return sorted({min(max(1, round(middle * f)), max(1, middle - 1)) for f in (0.25, 0.5, 0.75)})
