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
exactly where "which layer is it on?" matters. Off a terminal a bar is a :class:`LogBar`: instead
of tqdm's carriage-return redraws it writes plain lines, ``[offsite] finetune: 12/150 step
[03:10<36:24, 15.83s/step, loss=1.2345]`` (step/total, elapsed < ETA, rate, postfix), one when it
starts, one every :func:`heartbeat_seconds` (default 30 s; ``OFFSITE_PROGRESS_INTERVAL`` or
:func:`set_heartbeat`) from a timer thread, so a step that takes minutes still shows the run is
alive, and one when it ends (bars that leave or ran for at least one interval).

Quiet also silences the "Loading weights" bars of Hugging Face libraries for its duration. It does
not hide warnings, errors, or the one cost line :func:`cost_line` that ``offsite`` prints after a
successful command (it is one line, and the figure people grep for in benchmark logs).
"""

from __future__ import annotations

import contextlib
import os
import resource
import sys
import threading
import time

from tqdm.auto import tqdm

ENV_QUIET = "OFFSITE_QUIET"
ENV_INTERVAL = "OFFSITE_PROGRESS_INTERVAL"
HEARTBEAT = 30.0
"""Default seconds between the plain lines of a bar whose stderr is not a terminal (a log file, a pipe)."""
LINE_FORMAT = "{desc}: {n_fmt}/{total_fmt} {unit} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"

_quiet: bool | None = None  # None: follow the environment variable
_heartbeat: float | None = None  # None: follow the environment variable


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
        return LogBar(iterable, desc=desc, total=total, unit=unit, leave=leave, **kwargs)
    return tqdm(iterable, desc=desc, total=total, unit=unit, leave=leave, disable=not show, file=sys.stderr,
                dynamic_ncols=True, **kwargs)


def heartbeat_seconds() -> float:
    """Seconds between a :class:`LogBar`'s lines: :func:`set_heartbeat`, else ``OFFSITE_PROGRESS_INTERVAL``, else 30."""
    if _heartbeat is not None:
        return _heartbeat
    value = os.environ.get(ENV_INTERVAL, "").strip()
    try:
        return float(value) if value and float(value) > 0 else HEARTBEAT
    except ValueError:  # a typo in an environment variable must not stop a run
        return HEARTBEAT


def set_heartbeat(seconds: float | None) -> float | None:
    """Set the seconds between a :class:`LogBar`'s lines (None: follow the environment); returns the previous."""
    global _heartbeat
    if seconds is not None and not seconds > 0:
        raise ValueError(f"the progress interval must be > 0 seconds, got {seconds}")
    previous, _heartbeat = _heartbeat, seconds
    return previous


def every(seconds: float, call) -> threading.Event:
    """Call ``call()`` every ``seconds`` from a daemon thread until the returned event is set."""
    stop = threading.Event()

    def beat():
        while not stop.wait(seconds):
            call()

    threading.Thread(target=beat, name="offsite heartbeat", daemon=True).start()
    return stop


def _say(text: str) -> None:
    try:
        sys.stderr.write(text + "\n")
        sys.stderr.flush()
    except (ValueError, OSError):  # stderr closed under a finishing process: nothing to tell
        pass


class _Sink:
    """Where a :class:`LogBar` lets tqdm render: nowhere (its own lines go to stderr)."""

    def write(self, text):
        return len(text)

    def flush(self):
        pass


class LogBar(tqdm):
    """A tqdm bar for a log file: plain lines at start, every :func:`heartbeat_seconds`, and at the end.

    tqdm still counts, times and formats (every tqdm call works on it); only its redraws are
    dropped. The timer thread is a daemon and stops when the bar closes.
    """

    def __init__(self, *args, **kwargs):
        self._interval = heartbeat_seconds()
        self._stop = threading.Event()  # replaced by the timer's own once the bar shows
        kwargs.update(file=_Sink(), bar_format=LINE_FORMAT, dynamic_ncols=False)
        super().__init__(*args, **kwargs)
        if self.disable:
            return
        self.emit()
        self._stop = every(self._interval, self.emit)

    def display(self, msg=None, pos=None):
        return True  # tqdm's own redraws (carriage returns) would garble a log file

    def line(self) -> str:
        """The bar's state as one line (without the ``[offsite]`` prefix)."""
        return self.format_meter(**self.format_dict)

    def emit(self) -> None:
        """Write :meth:`line` to stderr now."""
        _say(f"[offsite] {self.line()}")

    def close(self):
        if not self.disable and not self._stop.is_set():
            self._stop.set()
            if self.leave or self.format_dict["elapsed"] >= self._interval:
                self._ema_dt = lambda: None  # the final line gives the run's mean rate
                self.emit()
        super().close()


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


@contextlib.contextmanager
def phase(name: str, enabled: bool = True):
    """Time a block and, when it succeeds and progress is on, print ``[offsite] <name> ... done in 1.2s``.

    Nothing is printed when the block raises: the error's own one-line message is what matters then.
    Off a terminal a phase that is still running says so every :func:`heartbeat_seconds`
    (``[offsite] <name> ... running, 1:30 so far``), so a long load or write is not silence.
    """
    started = time.perf_counter()
    stop = None
    if showing(enabled) and not _stderr_is_terminal():
        stop = every(heartbeat_seconds(), lambda: _say(
            f"[offsite] {name} ... running, {tqdm.format_interval(time.perf_counter() - started)} so far"))
    try:
        yield
    finally:
        if stop is not None:
            stop.set()
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
