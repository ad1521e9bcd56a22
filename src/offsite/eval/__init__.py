"""Evaluation of full, emulated and plugged-in models on the OT benchmark tasks, offline.

* :mod:`.scoring` -- multiple-choice log-likelihood scoring (``acc``, ``acc_norm``) exactly as
  lm-evaluation-harness 0.4 does it, with a KV-cache path that runs a shared context only once.
* :mod:`.perplexity` -- rolling-window perplexity; WikiText-2 documents.
* :mod:`.generation` -- greedy generation + exact match (WebQuestions).
* :mod:`.loading` -- load a full model, an emulator package or either with an adapter plugged in.
* :mod:`.run` -- :func:`evaluate`, the workflow behind ``offsite eval``.

The task specs live one layer down, in :mod:`offsite.data.tasks` (fine-tuning builds its pairs from
them); they are re-exported here. Names are imported lazily, so importing ``offsite.eval`` costs nothing
until a name is used.
"""

import importlib

_EXPORTS = {
    "evaluate": "run", "format_table": "run",
    "score_multiple_choice": "scoring", "loglikelihood": "scoring", "encode_pair": "scoring",
    "resolve_max_length": "scoring",
    "rolling_loglikelihood": "perplexity", "rolling_windows": "perplexity", "score_documents": "perplexity",
    "load_wikitext": "..data.wikitext",
    "exact_match": "generation", "normalize_answer": "generation", "greedy_generate": "generation",
    "score_exact_match": "generation",
    "Task": "..data.tasks", "get_task": "..data.tasks", "list_tasks": "..data.tasks",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name] if _EXPORTS[name].startswith(".") else f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
