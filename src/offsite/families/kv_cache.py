"""The KV cache's name in the forward pass of the installed transformers.

transformers 5.24 renamed the cache argument and output of causal LMs from ``past_key_values`` to
``cache`` (the old name warns and is to go in 5.40); earlier versions know only ``past_key_values``.
Scoring and generation reuse a cache across calls, so they ask here which name the model's forward
takes instead of passing either one by hand: a wrong name would be swallowed by ``**kwargs`` and the
next call would run without its context.
"""

from __future__ import annotations

import inspect


def cache_kwargs(model, cache) -> dict:
    """``{name: cache}`` under the name ``model.forward`` takes (``cache`` or ``past_key_values``)."""
    params = inspect.signature(model.forward).parameters
    return {"cache" if "cache" in params else "past_key_values": cache}


def returned_cache(out):
    """The cache a forward pass returned (its ``cache`` or ``past_key_values`` field), or None."""
    keys = out.keys() if hasattr(out, "keys") else ()
    for name in ("cache", "past_key_values"):
        if name in keys:
            return out[name]
    return None
