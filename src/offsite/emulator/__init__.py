"""Emulator methods, registered by name (``offsite emulate --method NAME``)."""

from . import crash, distill, gradot, scaleot, uniform  # noqa: F401  (register the methods)
from .base import EmulatorBuilder, available_methods, get_builder, keep_layers, layer_entries, register
from .uniform import uniform_positions

__all__ = ["EmulatorBuilder", "available_methods", "get_builder", "keep_layers", "layer_entries", "register",
           "uniform_positions"]
