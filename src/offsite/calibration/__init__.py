"""Calibration shared by every calibrated emulator method: public text -> batches -> statistics.

* :mod:`.text`: the calibration corpus (default: a public-domain book in the shared data) cut into
  deterministic ``(batch, seq_len)`` windows.
* :mod:`.stats`: per-linear K-FAC factors and weight gradients, damped Cholesky/inverse helpers.
* :mod:`.sweep`: the in-memory forward over every layer (boundary activations only) and the backward
  sweep. ("Streamed" means one thing in offsite: a model read from disk layer by layer,
  :mod:`offsite.model.streaming`.)
"""

from .layerwise import capture_boundaries_layerwise
from .stats import (STATS_DTYPES, DampingWarning, LinearStats, damped_cholesky, damped_inverse,
                    gather_linear_stats)
from .sweep import Boundaries, backward_sweep, capture_boundaries, frozen, peak_memory_mb
from .text import (DEFAULT_CORPUS, CalibrationConfig, calibration_batches, default_calibration, read_text,
                   resolve_calibration, tokenize_text)

__all__ = [
    "CalibrationConfig", "calibration_batches", "default_calibration", "resolve_calibration", "read_text",
    "tokenize_text", "DEFAULT_CORPUS", "LinearStats", "gather_linear_stats", "damped_cholesky",
    "damped_inverse", "DampingWarning", "STATS_DTYPES", "Boundaries", "capture_boundaries", "capture_boundaries_layerwise",
    "backward_sweep",
    "frozen", "peak_memory_mb",
]
