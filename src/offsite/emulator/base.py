"""The emulator-builder interface and its registry.

Every method has the same shape, and :meth:`EmulatorBuilder.build` (defined once, here) runs it:

1. ``plan()`` decides the emulator as plain JSON-able data (saved in the manifest). It reads the
   model (weights, a calibration forward) but never changes its weights or structure; what it
   learns that is not plain data goes to ``inputs.learned``. A layer-wise method calls
   ``on_layer(index, part, scratch)`` as soon as a layer's part of the plan is decided, and the build
   applies that layer right away (:meth:`EmulatorBuilder.apply_layer`), so peak memory holds one
   layer's working data.
2. ``apply()`` turns the full model into the emulator following the plan; called alone with a
   manifest's plan (no inputs) it rebuilds the emulator from plain data.
3. ``train()`` trains the emulator (OT-KD's distillation); its record is stored in the plan under
   the method's name. Most methods train nothing.

``restructure()`` rebuilds the emulator's module shapes from the plan alone, so a package loads
without calibration data. Methods register by name.
"""

from __future__ import annotations


from ..core.errors import OffsiteError
from ..core.settings_types import build_settings
from ..families import Family, get_layers, set_layers
from ..model.split import Split
from .inputs import BuildInputs

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

        Types are checked against the config's field annotations (see :mod:`offsite.core.settings_types`):
        ``emulator_layers="abc"`` or ``2.5`` is refused, ``2.0`` becomes ``2``.

        Raises:
            OffsiteError: an unknown setting (with the known ones), a wrong type, or the method's own
                refusal of a value.
        """
        return build_settings(self.config_cls, kwargs, f"method '{self.name}'")

    def plan(self, model, family: Family, split: Split, config, inputs: BuildInputs | None = None,
             on_layer=None) -> dict:
        """Decide the emulator: plain JSON-able data, leaving the model's weights and structure as they are.

        Args:
            model: the base model (with ``inputs.stream``, its streamed skeleton).
            inputs: calibration, tokenizer and stream (None: :class:`BuildInputs` defaults); a method
                may put what it learns that is not plain data in ``inputs.learned``.
            on_layer: ``on_layer(index, part, scratch)``, called by a layer-wise method as soon as the
                plan of full-model layer ``index`` is decided (``part``, the data
                :meth:`apply_layer` takes; ``scratch``, working data that spares it recomputing
                some, e.g. the SVDs the decision was made from). None: nothing is applied early.
        """
        raise NotImplementedError

    def apply(self, model, family: Family, split: Split, plan: dict, inputs: BuildInputs | None = None):
        """Turn ``model`` into the emulator the plan describes, in place; returns it.

        Default: keep the plan's layers (``plan["layers"]``) and drop the rest. ``inputs`` is None when
        a plan is applied alone (e.g. from a manifest); layers in ``inputs.applied`` are left as
        they are (the build applied them while planning).
        """
        keep_layers(model, family, [entry["source"] for entry in plan["layers"]])
        return model

    def apply_layer(self, layer, family: Family, index: int, part: dict, scratch) -> None:
        """Apply the plan of full-model layer ``index`` (``part``) to ``layer``, in place (layer-wise methods)."""
        raise NotImplementedError(f"method '{self.name}' does not plan layer by layer")

    def train(self, emulator, family: Family, split: Split, config, plan: dict, inputs: BuildInputs):
        """Train the applied emulator in place; returns the training record, or None (default: no training).

        ``plan`` is the decided plan (the build stores the record in it under the method's name);
        ``inputs`` holds the calibration batches and what ``plan`` learned.
        """
        return None

    def build(self, model, family: Family, split: Split, config, inputs: BuildInputs | None = None) -> tuple:
        """Plan, apply, train: ``(plan, emulator)``. The emulate workflow calls this; no method overrides it.

        A layer-wise method's layers are applied while it plans: each one as soon as its part of the
        plan is known. With ``inputs.stream`` that layer is read from disk, applied and parked
        (:meth:`~offsite.model.streaming.StreamedModel.park`); the emulator returned may then keep layers on
        ``meta``: one the method kept as it is stays on disk, and the package writer reads both back.

        Args:
            model: the base model, changed in place into the emulator.
            inputs: calibration, tokenizer and stream (None: no calibration given, no tokenizer,
                the model in memory).
        """
        inputs = BuildInputs() if inputs is None else inputs
        stream = inputs.stream

        def on_layer(index, part, scratch):
            layer = stream.materialize(index) if stream is not None else get_layers(model, family)[index]
            self.apply_layer(layer, family, index, part, scratch)
            if stream is not None:
                stream.park(index)  # to the scratch folder: the package writer reads it back
            inputs.applied.add(index)

        plan = self.plan(model, family, split, config, inputs, on_layer=on_layer)
        emulator = self.apply(model, family, split, plan, inputs)
        record = self.train(emulator, family, split, config, plan, inputs)
        if record is not None:
            plan[self.name] = record
        return plan, emulator

    def restructure(self, model, family: Family, plan: dict) -> None:
        """Reshape a freshly built emulator skeleton to match the plan (default: nothing to do)."""


def register(cls: type) -> type:
    """Class decorator registering a builder under ``cls.name``.

    Raises:
        TypeError: ``cls`` is not an :class:`EmulatorBuilder` subclass with a name and a config class.
        ValueError: another class already holds the name (silently replacing a method would change
            what every package of that name means).
    """
    if not (isinstance(cls, type) and issubclass(cls, EmulatorBuilder)) or cls is EmulatorBuilder:
        raise TypeError(f"register() takes an EmulatorBuilder subclass, got {cls!r}")
    if not isinstance(cls.name, str) or not cls.name or cls.config_cls is None:
        raise TypeError(f"{cls.__name__} needs a non-empty name and a config_cls to be registered")
    held = _REGISTRY.get(cls.name)
    if held is not None and type(held).__qualname__ != cls.__qualname__:  # a module reload re-registers itself
        raise ValueError(f"emulator method {cls.name!r} is already registered by {type(held).__qualname__}")
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
