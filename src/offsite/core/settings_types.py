"""Type checks of user settings against the field annotations of a settings dataclass.

Settings reach the config dataclasses from the command line parsed as JSON (``--emulator-layers abc``
arrives as the string ``"abc"``, ``2.5`` as a float) or from Python callers, and the dataclasses'
own ``__post_init__`` checks mostly test ranges, not types. :func:`check_types` refuses a value whose
type the annotation does not allow, with one message naming the setting, the allowed types and the
value given. Rules, per annotated type:

* ``int``: integers only; never a bool (an ``int`` subclass in Python), a string or a float with a
  fraction. An integral float (``2.0``) is accepted as ``2``: JSON writers often emit whole numbers
  that way, and nothing is lost.
* ``float``: any finite number, ints included (kept as given, so that recorded settings show what the
  user typed); not a bool, NaN, infinity or an int too large for a float.
* ``bool``: ``true``/``false`` only (not ``0``/``1`` or ``"yes"``).
* ``str``: strings, and ``os.PathLike`` objects (turned into strings): str settings here are names or
  folders, and Python callers naturally pass a :class:`~pathlib.Path`; JSON can't produce one.
* ``list``: lists (tuples are turned into lists).
* ``None``: only where the annotation has ``| None``.

Other annotations (a class) are checked with ``isinstance``; an annotation with no plain type in it
(e.g. ``Any``) is not checked.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing

from .errors import OffsiteError

_WORDS = {int: "an integer", float: "a finite number", bool: "true or false", str: "a string", list: "a list",
          dict: "an object", type(None): "null (the default)"}


def allowed_types(annotation) -> tuple:
    """The plain types an annotation allows, in order: ``int | None`` -> ``(int, NoneType)``.

    Parameterised containers count as their container (``list[str]`` -> ``list``); their items are
    the owning config's business.
    """
    if annotation is None:
        return (type(None),)
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return tuple(t for arg in typing.get_args(annotation) for t in allowed_types(arg))
    if origin is not None:
        return (origin,) if isinstance(origin, type) else ()
    return (annotation,) if isinstance(annotation, type) else ()


def _accept(kind: type, value):
    """``(True, value as stored)`` when ``value`` is allowed for ``kind``, else ``(False, None)``."""
    if kind is type(None):
        return value is None, None
    if kind is bool:
        return isinstance(value, bool), value
    if isinstance(value, bool):  # true/false is never meant as a number, a string or a list
        return False, None
    if kind is int:
        if isinstance(value, int):
            return True, value
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return True, int(value)  # 2.0 -> 2: see the module docstring
        return False, None
    if kind is float:
        if isinstance(value, int):
            try:  # an int beyond the float range (JSON allows 400 digits) is no usable number
                float(value)
            except OverflowError:
                return False, None
            return True, value
        return isinstance(value, float) and math.isfinite(value), value
    if kind is str:
        if isinstance(value, os.PathLike) and isinstance(os.fspath(value), str):
            return True, os.fspath(value)
        return isinstance(value, str), value
    if kind is list and isinstance(value, tuple):
        return True, list(value)
    return isinstance(value, kind), value


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_range(name: str, value, *, at_least=None, above=None, at_most=None, below=None) -> None:
    """Refuse a number outside its range, naming the setting, the range and the value given.

    Give at most one lower bound (``at_least`` inclusive, ``above`` exclusive) and at most one upper
    bound (``at_most``, ``below``). The comparisons are written so that NaN fails every range.

    Raises:
        OffsiteError: ``"<name> must be >= 1, got 0"``, ``"... must be > 0 ..."`` or, with both
            bounds, ``"... must be in [0, 1), got 1.5"``.
    """
    low_ok = (at_least is None or value >= at_least) and (above is None or value > above)
    high_ok = (at_most is None or value <= at_most) and (below is None or value < below)
    if low_ok and high_ok:
        return
    low, high = (at_least, above)[at_least is None], (at_most, below)[at_most is None]
    if high is None:
        wanted = f">= {at_least}" if at_least is not None else f"> {above}"
    elif low is None:
        wanted = f"<= {at_most}" if at_most is not None else f"< {below}"
    else:
        wanted = f"in {'[' if at_least is not None else '('}{low}, {high}{']' if at_most is not None else ')'}"
    raise OffsiteError(f"{name} must be {wanted}, got {value}")


def build_settings(cls: type, values: dict, owner: str):
    """An instance of settings dataclass ``cls`` from ``values``, every bad input refused in one error.

    Order: unknown names (listed with the known ones); then the class's own checks, which know the
    allowed range (``alpha must be in [0, 1]``) and so say more than a type; then :func:`check_types`
    refuses what they let through (``2.5`` for a count) or crashed on (``int("abc")``).

    Args:
        cls: the settings dataclass (a method's config, ``FinetuneConfig``).
        values: ``{setting: value}``.
        owner: who has the settings, for the messages, e.g. ``"method 'uniform'"`` or ``"fine-tuning"``.

    Raises:
        OffsiteError: an unknown setting, a wrong type, or the class's own refusal of a value.
    """
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise OffsiteError(f"{owner} has no setting(s) {unknown}; known: {sorted(known)}")
    try:
        cls(**values)
    except OffsiteError:
        raise
    except (TypeError, ValueError, OverflowError):
        pass  # a wrong type broke the class's own check; check_types names it (or, if not, a bug re-raises)
    return cls(**check_types(cls, values, f"{owner}: setting"))


def check_types(cls: type, values: dict, owner: str) -> dict:
    """Check ``values`` against the annotations of dataclass ``cls``; returns them as they should be stored.

    Args:
        cls: a dataclass (its module may use ``from __future__ import annotations``).
        values: ``{field name: value}``; names that ``cls`` does not annotate are passed through.
        owner: start of the error message, e.g. ``"method 'uniform': setting"``.

    Returns:
        A new dict: the values, with integral floats of int fields as ints and paths of str fields as str.

    Raises:
        OffsiteError: ``"<owner> <name> must be <allowed types>, got <value>"``.
    """
    hints = typing.get_type_hints(cls)
    out = dict(values)
    for name, value in values.items():
        kinds = allowed_types(hints[name]) if name in hints else ()
        if not kinds:
            continue
        for kind in kinds:
            ok, stored = _accept(kind, value)
            if ok:
                out[name] = stored
                break
        else:
            allowed = " or ".join(_WORDS.get(kind, kind.__name__) for kind in kinds)
            raise OffsiteError(f"{owner} {name} must be {allowed}, got {_shown(value)}")
    return out
