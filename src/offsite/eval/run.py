"""The ``evaluate`` workflow: several tasks on one in-memory model, lm-eval-shaped results.

``evaluate(model, tokenizer, ["arc_easy", "piqa"], data_dir)`` returns::

    {"results": {"arc_easy": {"acc": 0.41, "acc_norm": 0.44, "acc_stderr": ..., "n": 570,
                              "split": "validation", "requested_split": "validation",
                              "kind": "multiple_choice", "seconds": 12.3}, ...},
     "details": {...}}          # only with keep_details=True: per-question records

Metrics are fractions (not percentages). Multiple-choice tasks give ``acc``/``acc_norm``,
WebQuestions gives ``exact_match`` (and lm-eval's ``greedy_match``), WikiText gives
``word_perplexity``, ``byte_perplexity``, ``bits_per_byte`` and ``token_perplexity``.

Splits: each task reads the requested split when the offline data has it, otherwise its
documented fallback (WebQuestions validation -> test; HellaSwag/BoolQ anything -> validation; PIQA
test -> validation, since its test labels are hidden). ``split="default"`` picks lm-eval's
evaluation split per task. ``results[task]["split"]`` always says which split was scored.
"""

from __future__ import annotations

import time
from pathlib import Path

from ..core.errors import OffsiteError
from ..core.progress import phase
from ..data.tasks import get_task, is_file_task
from ..data.wikitext import wikitext_detokenize
from .generation import score_exact_match
from .perplexity import score_documents
from .scoring import score_multiple_choice


def parse_tasks(tasks) -> list[str]:
    """``"arc_easy,piqa"`` or ``["arc_easy", "piqa"]`` -> validated list of task names."""
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t and t.strip()]
    if not names:
        raise OffsiteError("no tasks given; pass e.g. --tasks arc_easy,piqa")
    for name in names:
        get_task(name)  # unknown names fail here, before any model work
    return list(dict.fromkeys(names))  # drop duplicates, keep order


def needs_data_dir(names) -> bool:
    """True when some task reads the offline data folder (own-data ``.jsonl`` tasks do not)."""
    return any(not is_file_task(name) for name in names)


def check_data_dir(names, data_dir) -> None:
    """Refuse a missing or non-folder data dir, but only when a task needs one."""
    if not needs_data_dir(names):
        return
    if not data_dir:
        raise OffsiteError("no data folder: pass --data-dir DIR (the folder with mc/, qa/, lm/) or set "
                           "OFFSITE_DATA_DIR; only tasks given as your own .jsonl files need none")
    if not Path(data_dir).is_dir():
        raise OffsiteError(f"--data-dir {data_dir} is not a folder")


def evaluate_task(model, tokenizer, name: str, data_dir, split: str = "validation", limit: int | None = None,
                  batch_size: int = 8, progress: bool = True, max_new_tokens: int = 32,
                  max_length: int | None = None, stride: int | None = None, max_batch_tokens=None) -> dict:
    """Score one task; returns its metrics plus ``details`` (per-question / per-document records)."""
    task = get_task(name)
    used = task.resolve_split(split)
    examples = list(task.examples(data_dir, split, limit))
    if not examples:
        raise OffsiteError(f"task {name!r} has no labelled records in split {used!r}")
    start = time.perf_counter()
    if task.kind == "multiple_choice":
        scored = score_multiple_choice(model, tokenizer, examples, batch_size=batch_size, max_length=max_length,
                                       progress=progress, desc=name, max_batch_tokens=max_batch_tokens)
    elif task.kind == "exact_match":
        scored = score_exact_match(model, tokenizer, examples, max_new_tokens=max_new_tokens,
                                   batch_size=batch_size, progress=progress)
    else:
        scored = score_documents(model, tokenizer, [ex["text"] for ex in examples], max_length=max_length,
                                 stride=stride, batch_size=batch_size, detokenize=wikitext_detokenize,
                                 progress=progress, desc=name)
        scored["details"] = []
    details = scored.pop("details")
    scored.update(kind=task.kind, split=used, requested_split=split, seconds=round(time.perf_counter() - start, 3))
    return {"metrics": scored, "details": details}


def evaluate(model, tokenizer, tasks, data_dir, split: str = "validation", limit: int | None = None,
             batch_size: int = 8, progress: bool = True, keep_details: bool = False,
             max_new_tokens: int = 32, max_length: int | None = None, stride: int | None = None,
             max_batch_tokens=None) -> dict:
    """Evaluate ``model`` on ``tasks``.

    Args:
        model: any Hugging Face causal LM in memory (put on its device by the caller).
        tokenizer: its tokenizer.
        tasks: names (see :func:`offsite.data.tasks.list_tasks`), ``.jsonl(.gz)`` paths, or a
            comma-separated string of them.
        data_dir: folder with the ``mc/``, ``qa/`` and ``lm/`` data.
        split: requested split (``"validation"``, ``"test"``, ``"train"`` or ``"default"``).
        limit: first N questions (documents for wikitext) of each task after dropping unlabelled ones.
        batch_size: rows per forward pass.
        progress: tqdm bars on stderr (also off with ``offsite --quiet`` / ``OFFSITE_QUIET=1``).
        keep_details: also return per-question records under ``"details"``.
        max_new_tokens: generation budget for exact-match tasks.
        max_length: override the model's context length (scoring truncation, perplexity windows).
        stride: perplexity window stride (default: the context length, non-overlapping windows).
        max_batch_tokens: multiple-choice batches by padded-token budget instead of ``batch_size``
            rows: None = auto (a budget on CUDA only), 0 = off (see :mod:`offsite.data.batching`).

    Returns:
        ``{"results": {task: metrics}}`` (+ ``"details"``), see the module docstring.
    """
    names = parse_tasks(tasks)
    results, details = {}, {}
    for name in names:
        with phase(f"eval {name}", enabled=progress):
            out = evaluate_task(model, tokenizer, name, data_dir, split, limit, batch_size, progress,
                                max_new_tokens, max_length, stride, max_batch_tokens)
        results[name] = out["metrics"]
        details[name] = out["details"]
    report = {"results": results}
    if keep_details:
        report["details"] = details
    return report


_TABLE_METRICS = ("acc", "acc_norm", "exact_match", "greedy_match", "word_perplexity", "byte_perplexity",
                  "bits_per_byte", "token_perplexity")


def format_table(results: dict) -> str:
    """A plain-text table of ``results["results"]``: one row per (task, metric)."""
    rows = [("task", "split", "n", "metric", "value", "stderr")]
    for name, metrics in results["results"].items():
        for key in _TABLE_METRICS:
            if key in metrics:
                err = metrics.get(f"{key}_stderr")
                rows.append((name, metrics["split"], str(metrics["n"]), key, f"{metrics[key]:.4f}",
                             "" if err is None or err != err else f"{err:.4f}"))  # err != err: NaN
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
