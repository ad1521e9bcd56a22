"""The embedded demo: offsite-tuning end to end on a world and a model the project generates itself.

``offsite demo`` (or :func:`run_demo`) invents a small world of people and facts
(:mod:`.world`), pretrains a small Llama on prose about it (:mod:`.pretrain`), and runs the
library's own emulate → finetune → plug workflow on a multiple-choice quiz about the same facts
(:mod:`.pipeline`). Nothing is downloaded; everything is seeded.
"""

from .pipeline import DemoSettings, format_table, run_demo, settings_for
from .pretrain import PretrainConfig, pretrain
from .world import generate_world, write_world

__all__ = ["DemoSettings", "PretrainConfig", "format_table", "generate_world", "pretrain", "run_demo",
           "settings_for", "write_world"]
