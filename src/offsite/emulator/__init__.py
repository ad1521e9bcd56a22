"""Emulator methods, registered by name (``offsite emulate --method NAME``)."""

from . import crash, distill, gradot, scaleot, uniform  # noqa: F401  (register the methods)
from .base import EmulatorBuilder, available_methods, get_builder, keep_layers, layer_entries, register
from .calibrated import CalibrationSettings
from .inputs import BuildInputs
from .uniform import uniform_positions

__all__ = ["BuildInputs", "CalibrationSettings", "EmulatorBuilder", "available_methods", "get_builder", "keep_layers",
           "layer_entries", "register", "uniform_positions"]
