"""Uniform layer drop (OT†): the training-free emulator of Offsite-Tuning.

Paper: Xiao, Lin, Han, "Offsite-Tuning: Transfer Learning without Full Model" (arXiv 2302.04870).

Algorithm: of the M middle (non-adapter) layers keep n, at middle positions ``round(i*(M-1)/(n-1))``
for i = 0..n-1 (Python rounding, as in the released ``uniform_choose_layers``), so the first and
last middle layers always stay. 24-layer OPT with 2-8-2 keeps 2,5,7,10,13,16,18,21.

Departures: the released code divides by zero for n = 1; here n = 1 keeps the middle-most layer
``(M-1)//2``, and n = 0 keeps none (adapter-only emulator). With an explicit adapter index list
(CRaSh-style placement) the rule runs over all non-adapter layers in order. The default n is 70%
of M, rounded, at least 1 (:data:`DEFAULT_KEEP_FRACTION`, chosen on a real model); OT's OPT-1.3B
ratio is 40% (8 of 20).
"""

from __future__ import annotations

import dataclasses

from ...core.errors import OffsiteError
from ..base import EmulatorBuilder, layer_count_points, layer_entries, register


def uniform_positions(num_middle: int, keep: int) -> list:
    """Positions (0-based, within the middle) that uniform drop keeps.

    Args:
        num_middle: M, the number of middle layers.
        keep: n, how many to keep (0 <= n <= M).
    """
    if not 0 <= keep <= num_middle:
        raise OffsiteError(f"emulator layers must be between 0 and {num_middle} (the middle layers), got {keep}")
    if keep == 0:
        return []
    if keep == 1:
        return [(num_middle - 1) // 2]
    stride = (num_middle - 1) / (keep - 1)
    return [round(i * stride) for i in range(keep)]


DEFAULT_KEEP_FRACTION = 0.7
"""Default share of the middle that layer-dropping methods (uniform, OT-KD, CRaSh) keep. Chosen on the
real SmolLM2-135M-Instruct (``bench/real_curve.py``, ``bench/results/real_curve/results.md``; SciQ,
selection questions from the training split, never the validation questions the OT table reports):
the smallest size whose plug-in clearly beats the untouched model (by at least 3 points, one standard
error) while its emulator, fine-tuned, stays at least 5 points below it. Keeping 18 of 26 middle layers
(0.69) gave plug-in 82.5 against 78.5 untouched, emulator FT 70.0; 14 of 26 gave no gain (78.5), and the
earlier default 25% (6 of 26, chosen on the generated demo worlds, whose 4 middle layers hold little)
drops the layer whose removal alone costs SmolLM2 2.1 nats (bench/results/real_diagnose). 22 of 26 gave
a 3 points higher plug-in (85.5) at the same measured emulator FT (69.5) but ships 89% of the model's
parameters verbatim; the smaller emulator is the default, ``emulator_layers`` moves along the curve."""


def default_emulator_layers(num_middle: int) -> int:
    """The default n: :data:`DEFAULT_KEEP_FRACTION` of the middle, rounded, at least 1."""
    return max(1, round(DEFAULT_KEEP_FRACTION * num_middle)) if num_middle else 0


def uniform_middle(split, keep: int | None) -> list:
    """Full-model indices of the middle layers uniform drop keeps (``keep`` None: the default)."""
    middle = list(split.middle)
    keep = default_emulator_layers(len(middle)) if keep is None else int(keep)
    return [middle[p] for p in uniform_positions(len(middle), keep)]


@dataclasses.dataclass
class UniformConfig:
    """Settings of uniform layer drop."""

    emulator_layers: int | None = None
    """Middle layers to keep (n); default 70% of the middle, rounded, at least 1 (see DEFAULT_KEEP_FRACTION)."""

    def __post_init__(self):
        if self.emulator_layers is not None and int(self.emulator_layers) < 0:
            raise OffsiteError(f"emulator_layers must be >= 0, got {self.emulator_layers}")


@register
class UniformDrop(EmulatorBuilder):
    name = "uniform"
    supports_stream = True  # the plan needs no weights: only the kept layers are ever read
    size_knob = "emulator_layers"

    def size_points(self, middle: int) -> list:
        return layer_count_points(middle)

    config_cls = UniformConfig

    def plan(self, model, family, split, config, inputs=None, on_layer=None) -> dict:
        kept = uniform_middle(split, config.emulator_layers)
        return {"layers": layer_entries(split, kept), "emulator_layers": len(kept)}
