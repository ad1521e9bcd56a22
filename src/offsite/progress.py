"""Progress bars, phase timings and the end-of-command cost line, all written to stderr.

Every long loop in the library (calibration forward, backward sweep, GCS scoring, SVDs, RL and
distillation steps, CKA, evaluation scoring) draws its bar through :func:`bar`, and coarse steps
of a workflow (load, build, write) are timed with :func:`phase`. Stdout stays reserved for results
(tables, JSON, "written to ..." lines), so piping a command's output is never garbled.

Switches, combined with AND (anything off hides the output):

* a call's own ``progress`` setting (``FinetuneConfig.progress``, ``evaluate(progress=...)``,
  ``offsite eval --no-progress``), passed as ``enabled=``;
* the process-wide quiet switch: :func:`set_quiet` / :func:`quieted` (``offsite --quiet``), or, when
  neither was called, the environment variable ``OFFSITE_QUIET`` (``1``/``true``/``yes`` = quiet).

Bars are shown also when stderr is not a terminal: logs of hour-long jobs on remote machines are
exactly where "which layer is it on?" matters. Off a terminal a bar redraws at most every
``LOG_INTERVAL`` seconds, so a log file grows by a few lines per minute, not ten per second, and
nested bars share one row instead of moving the cursor with escape codes.

Quiet also silences the "Loading weights" bars of Hugging Face libraries for its duration. It does
not hide warnings, errors, or the one cost line :func:`cost_line` that ``offsite`` prints after a
successful command (it is one line, and the figure people grep for in benchmark logs).
"""

from __future__ import annotations

import contextlib
import os
import resource
import sys
import time

from tqdm.auto import tqdm

ENV_QUIET = "OFFSITE_QUIET"
LOG_INTERVAL = 10.0
"""Seconds between redraws of a bar whose stderr is not a terminal (a log file, a pipe)."""

_quiet: bool | None = None  # None: follow the environment variable


def is_quiet() -> bool:
    """Whether progress output is switched off process-wide (see the module docstring)."""
    if _quiet is not None:
        return _quiet
    return os.environ.get(ENV_QUIET, "").strip().lower() in ("1", "true", "yes", "on")


def set_quiet(value: bool | None) -> bool | None:
    """Switch progress output off (True) or on (False) process-wide; None follows ``OFFSITE_QUIET``.

    Returns:
        The previous setting, so a caller can restore it.
    """
    global _quiet
    previous, _quiet = _quiet, None if value is None else bool(value)
    return previous


@contextlib.contextmanager
def quieted(value: bool = True):
    """Apply :func:`set_quiet` for the block (and Hugging Face's bars with it), restoring both after.

    Restoring matters because tests, notebooks and the demo run several commands in one process.
    """
    previous = set_quiet(value)
    hf_logging, hf_was_on = None, False
    if value:
        # Imported only when quiet: it costs a second or two and a plain run needs nothing from it.
        from transformers.utils import logging as hf_logging

        hf_was_on = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        set_quiet(previous)
        if hf_logging is not None and hf_was_on:
            hf_logging.enable_progress_bar()


def showing(local: bool = True) -> bool:
    """Whether to show progress: the caller's own setting and not quiet."""
    return bool(local) and not is_quiet()


def bar(iterable_or_total=None, desc: str | None = None, unit: str = "it", *, total: int | None = None,
        enabled: bool = True, leave: bool = True, **kwargs) -> tqdm:
    """A tqdm bar on stderr, disabled when progress is off.

    Args:
        iterable_or_total: what to iterate over, or the number of steps for a bar advanced by hand
            with ``update`` (None: neither, then give ``total``).
        desc: what the bar counts, e.g. ``"backward sweep"``.
        unit: the unit of one step, e.g. ``"layer"``.
        total: the number of steps when it cannot be read from the iterable.
        enabled: the caller's own progress setting (combined with the quiet switch).
        leave: keep the finished bar on screen (False for inner bars that would pile up).
        **kwargs: passed to tqdm (``initial``, ``position``, ...).

    Returns:
        The bar; use it as the iterable, or as a context manager and call ``update``.
    """
    iterable = iterable_or_total
    if isinstance(iterable_or_total, int) and not isinstance(iterable_or_total, bool):
        iterable, total = None, iterable_or_total
    show = showing(enabled)
    if show and not _stderr_is_terminal():
        kwargs.setdefault("mininterval", LOG_INTERVAL)
        # Nested bars move the cursor with ANSI codes, which a log file shows as garbage: one row.
        kwargs.setdefault("position", 0)
    return tqdm(iterable, desc=desc, total=total, unit=unit, leave=leave, disable=not show, file=sys.stderr,
                dynamic_ncols=True, **kwargs)


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


@contextlib.contextmanager
def phase(name: str, enabled: bool = True):
    """Time a block and, when it succeeds and progress is on, print ``[offsite] <name> ... done in 1.2s``.

    Nothing is printed when the block raises: the error's own one-line message is what matters then.
    """
    started = time.perf_counter()
    yield
    if showing(enabled):
        # tqdm.write moves any bar that is still open out of the way instead of overwriting it.
        tqdm.write(f"[offsite] {name} ... done in {time.perf_counter() - started:.1f}s", file=sys.stderr)


def peak_rss_bytes() -> int:
    """The process's resident-set high-water mark so far, in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB


def cuda_peak_bytes() -> int | None:
    """Peak CUDA memory allocated by torch, summed over devices; None when CUDA was never used.

    torch is not imported here: a command that never needed it (``offsite families``) had no CUDA.
    """
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return sum(torch.cuda.max_memory_allocated(d) for d in range(torch.cuda.device_count()))


def cost_line(command: str, seconds: float) -> str:
    """``offsite <command>: done in 12.3 s, peak RSS 1.23 GB[, CUDA peak 4.56 GB]`` (GB = 10^9 bytes)."""
    line = f"offsite {command}: done in {seconds:.1f} s, peak RSS {peak_rss_bytes() / 1e9:.2f} GB"
    cuda = cuda_peak_bytes()
    return line if cuda is None else f"{line}, CUDA peak {cuda / 1e9:.2f} GB"
