"""Emulators: the method contract and registry (:mod:`.base`), what methods share (calibration settings,
build inputs, low-rank linears, importance caches), the package and its disclosure record; the methods
themselves in :mod:`.methods`, registered by name (``offsite emulate NAME``)."""

from . import methods  # noqa: F401  (registers the methods)
from .base import EmulatorBuilder, available_methods, get_builder, keep_layers, layer_entries, register
from .calibrated import CalibrationSettings
from .inputs import BuildInputs
from .methods.uniform import uniform_positions

__all__ = ["BuildInputs", "CalibrationSettings", "EmulatorBuilder", "available_methods", "get_builder", "keep_layers",
           "layer_entries", "register", "uniform_positions"]
