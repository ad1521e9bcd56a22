"""Headless matplotlib for the PNGs that report, audit and frontier write.

matplotlib is an optional extra (``plot``): without it every command still writes its JSON and
Markdown, and its PNG is skipped, so this one import point decides.
"""

from __future__ import annotations


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend, or None when matplotlib is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: never open a window or need a display
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt
