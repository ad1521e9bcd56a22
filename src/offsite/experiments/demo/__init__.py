"""The embedded demos: offsite-tuning end to end, on a real model or on a world the project generates.

``offsite demo`` (or :func:`run_real_demo`, :mod:`.real`) runs the library's emulate → finetune →
plug workflow on SmolLM2-135M-Instruct (prepared once from its registry wheel) and SciQ from the
offline data. ``offsite demo --world`` (or :func:`run_demo`) needs nothing: it invents a small world
of people and facts (:mod:`.world`), pretrains a small Llama on prose about it (:mod:`.pretrain`),
and runs the same workflow on a multiple-choice quiz about those facts (:mod:`.pipeline`). Both
print the five numbers and draw them (:mod:`.output`).
"""

from .output import format_table, plot_result
from .pipeline import DemoSettings, run_demo, settings_for
from .pretrain import PretrainConfig, pretrain
from .real import RealDemoSettings, run_real_demo
from .world import generate_world, write_world

__all__ = ["DemoSettings", "PretrainConfig", "RealDemoSettings", "format_table", "generate_world", "plot_result",
           "pretrain", "run_demo", "run_real_demo", "settings_for", "write_world"]
