"""The emulator methods, one module or folder each (a method's own helpers live in its folder).

Every module here is imported when this package is, and each registers its builder
(:func:`offsite.emulator.base.register`), so a new method is one more module or folder here and
nothing else: its CLI subcommand, flags and help come from its config class.
"""

import importlib
import pkgutil

for _found in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    importlib.import_module(f".{_found.name}", __name__)
