"""The KV cache's name in the forward pass of the installed transformers.

transformers 5.24 renamed the cache argument and output of causal LMs from ``past_key_values`` to
``cache`` (the old name warns and is to go in 5.40); earlier versions know only ``past_key_values``.
Scoring and generation reuse a cache across calls, so they ask here which name the model's forward
takes instead of passing either one by hand: a wrong name would be swallowed by ``**kwargs`` and the
next call would run without its context.
"""

from __future__ import annotations

import inspect


def cache_name(model) -> str:
    """The name ``model.forward`` takes its cache under: ``cache`` or ``past_key_values``. A loop that
    passes the cache step after step asks once (reading a signature costs more than a dict lookup)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def cache_kwargs(model, cache) -> dict:
    """``{name: cache}`` under the name ``model.forward`` takes (:func:`cache_name`)."""
    return {cache_name(model): cache}


def returned_cache(out):
    """The cache a forward pass returned (its ``cache`` or ``past_key_values`` field), or None."""
    keys = out.keys() if hasattr(out, "keys") else ()
    for name in ("cache", "past_key_values"):
        if name in keys:
            return out[name]
    return None
