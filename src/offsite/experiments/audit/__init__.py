"""Workflow: how much of the full model a data owner can get out of an emulator package (``offsite audit``).

Offsite-Tuning measures privacy with one user, the honest one, and calls the gap between the
plug-in and the honest emulator FT the privacy. A data owner holds the whole package, though,
and may train it any way it likes. The audit runs the attacks of :mod:`.attacks` on the same
data and budget as the honest fine-tune and reports, per task, each attack's score with its gap
to the plug-in and to the full model, and the **privacy margin**: plug-in score minus the best
attack's score (for perplexity: best attack minus plug-in), the worst case a model owner should
read. A margin near zero or below means an attacker gets about what the plug-in gives without
ever sending the adapter back. No OT paper measures this; the nearest are "Aggressive Compression
Enables LLM Weight Theft" (arXiv 2601.01296) and the loss margin of LLEOT (Findings of ACL 2026).

Reads top to bottom: check every input (before any output), write each task's fine-tuning file,
score the full model zero-shot, then per task: fine-tune the honest adapter (``finetune``), plug
it into the full model (the plug-in row), score the emulator zero-shot and optionally Full FT,
run the attacks, and write ``audit.json``, ``audit.md`` and ``audit.png`` into ``workdir``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ...artifacts import read_manifest
from ...calibration.text import DEFAULT_CORPUS, default_calibration
from ...core.device import resolve_device
from ...core.errors import OffsiteError
from ...data.tasks import is_file_task
from ...eval.loading import load_for_eval
from ...eval.run import check_data_dir, parse_tasks
from ...workflows.finetune import finetune, make_config
from ..protocol import Protocol, check_workdir, full_package, gap, headline, score, score_with, slug
from .attacks import ATTACKS, BUDGETS, adapter_record, check_attacks, check_budget, run_attack
from .output import format_audit, plot_audit

__all__ = ["run_audit", "strongest_attack", "resolve_public", "ATTACKS", "BUDGETS", "format_audit", "plot_audit"]



def run_audit(emulator, model: str, tasks, workdir, protocol: Protocol = Protocol(), public=None,
              budget: str = "same", attacks=tuple(ATTACKS), full_ft: bool = False, log=print) -> dict:
    """Audit an emulator package against the attacks of its data owner; writes audit.json/.md/.png.

    Args:
        emulator: the emulator package folder.
        model: the full model it was built from (folder or hub id).
        tasks: task names or own-data templates (``mine/{split}.jsonl``), as in ``offsite report``.
        workdir: folder for the training files, adapters and results; it may not be, lie in or
            contain an input.
        protocol: data, split, limits, scoring batch, device and the honest fine-tune's settings
            (:class:`~offsite.experiments.protocol.Protocol`); every attack uses those settings with the
            budget's steps, and validates 5 times whatever its length (no fixed eval_every).
        public: public text for attack ``recovery`` (None: the calibration default when present).
        budget: ``same`` or ``strong`` (see :data:`.attacks.BUDGETS`).
        attacks: names of :data:`ATTACKS` to run.
        full_ft: also fine-tune every decoder block of the full model (the Full FT row).

    Returns:
        The audit (also ``workdir/audit.json``): per task every row's score, each attack's gaps
        and record, the best attack and the privacy margin.

    Raises:
        OffsiteError: any bad input, before any model work or output.
    """
    where = resolve_device(protocol.device)  # first: an unavailable device costs nothing and writes nothing
    check_budget(budget)
    attacks = check_attacks(attacks)
    names = parse_tasks(tasks)
    check_data_dir(names, protocol.data_dir)
    read_manifest(emulator, "emulator")  # a missing or non-emulator folder is one error, before any work
    settings = protocol.finetune_settings(where)
    cfg = make_config(settings)  # bad settings fail here
    if cfg.max_steps is None or cfg.max_steps < 1:
        raise OffsiteError(f"the audit's budget is counted in optimizer steps: give max_steps >= 1, got {cfg.max_steps}")
    public = resolve_public(public) if "recovery" in attacks else None
    workdir = check_workdir(workdir, [emulator, model, public, protocol.data_dir] +
                       [Path(t).parent for t in names if is_file_task(t)])
    workdir.mkdir(parents=True, exist_ok=True)
    train = {t: protocol.train_file(t, workdir) for t in names}  # bad data fails before model work
    started = time.time()
    audit = {"emulator": str(emulator), "model": model, "tasks": names, "split": protocol.split,
             "limit": protocol.limit,
             "budget": budget, "steps_per_attack": cfg.max_steps * BUDGETS[budget], "finetune": settings,
             "public": None if public is None else str(public), "attacks": attacks, "results": {}}
    measure = protocol.measure()

    full_zs = _score_all(model, names, where, **measure)
    emu_zs = _score_all(emulator, names, where, **measure)
    log(f"[audit] full and emulator zero-shot done ({time.time() - started:.0f}s)")
    whole = full_package(model, workdir, where) if full_ft else None
    for task in names:
        data, fmt = train[task]
        rows = {"full_zs": full_zs[task], "emu_zs": emu_zs[task], "full_ft": None}
        honest = finetune(emulator, data, workdir / f"adapter-{slug(task)}", format=fmt, overwrite=True, **settings)
        # Plugged before the attacks: a full model that is not the emulator's base is refused here, cheaply.
        rows["plug_in"] = score_with(model, honest, task, device=where, **measure)
        if whole is not None:
            tuned = finetune(whole, data, workdir / f"adapter-full-{slug(task)}", format=fmt, overwrite=True,
                             **settings)
            rows["full_ft"] = score_with(model, tuned, task, device=where, **measure)
        log(f"[audit] {slug(task)}: honest adapter plugged in ({time.time() - started:.0f}s)")
        results = {}
        for name in attacks:
            results[name] = _attack(name, emulator, honest, train[task], settings, budget, public,
                                    workdir / f"attack-adapter-{slug(task)}", task, where, measure)
            log(f"[audit] {slug(task)}: attack {name} ({time.time() - started:.0f}s)")
        audit["results"][task] = summarise(rows, results)
    audit["seconds"] = round(time.time() - started, 1)
    (workdir / "audit.json").write_text(json.dumps(audit, indent=2) + "\n")
    (workdir / "audit.md").write_text(format_audit(audit) + "\n")
    plot_audit(audit, workdir / "audit.png")
    return audit


def summarise(rows: dict, attacks: dict) -> dict:
    """Headline scores, each attack's gaps, the best attack and the privacy margin of one task.

    Args:
        rows: ``{"full_zs", "full_ft", "plug_in", "emu_zs": metrics or None}``.
        attacks: ``{name: {"metrics": ..., **record}}``.

    Returns:
        ``{"higher_is_better", "scores": {row: value}, "attacks": {name: {..., "score", "gap_to_plug_in",
        "gap_to_full", "gap_to_full_ft"}}, "best_attack", "margin"}``.
    """
    scores = {row: None if metrics is None else headline(metrics)[0] for row, metrics in rows.items()}
    higher = headline(rows["plug_in"])[1]
    out = {}
    for name, result in attacks.items():
        value = headline(result["metrics"])[0]
        out[name] = {**result, "score": value, "gap_to_plug_in": gap(scores["plug_in"], value, higher),
                     "gap_to_full": gap(scores["full_zs"], value, higher),
                     "gap_to_full_ft": None if scores["full_ft"] is None else gap(scores["full_ft"], value, higher)}
    # The worst case: the attack that comes closest to (or beyond) the plug-in.
    best = min(out, key=lambda n: out[n]["gap_to_plug_in"])
    return {"higher_is_better": higher, "scores": scores, "metrics": rows, "attacks": out, "best_attack": best,
            "margin": out[best]["gap_to_plug_in"]}


def strongest_attack(emulator, train: tuple, settings: dict, honest: dict, task: str, public, device,
                     measure: dict) -> tuple:
    """The best attack on one task under the same budget: ``(name, metrics)`` (``offsite report --audit``).

    Args:
        emulator: the emulator package; train: the task's ``(file, format)``.
        settings: the honest fine-tune's settings; honest: its emulator FT metrics, which are attack (a).
        task: the task scored; public: public text of attack ``recovery`` (see :func:`resolve_public`).
        device: where the attacks train and score; measure: ``data_dir``, ``split``, ``limit``, ``batch_size``.
    """
    found = {"adapter": honest}
    for name in ATTACKS:
        if name != "adapter":
            found[name] = _attack(name, emulator, None, train, settings, "same", public, None, task, device,
                                  measure)["metrics"]
    higher = headline(honest)[1]
    best = min(found, key=lambda n: gap(headline(honest)[0], headline(found[n])[0], higher))
    return best, found[best]


def _attack(name: str, emulator, honest: Path, train: tuple, settings: dict, budget: str, public, out: Path,
            task: str, device, measure: dict) -> dict:
    """``{"metrics": ..., **record}`` of one attack on one task, scored on the validation split.

    Under the ``same`` budget attack (a) is the honest run itself (the very adapter that is plugged
    in), so it is scored, not trained again.
    """
    data, fmt = train
    if name == "adapter" and BUDGETS[budget] == 1:
        return {"metrics": score_with(emulator, honest, task, device=device, **measure),
                **adapter_record(honest, budget)}
    done = run_attack(name, emulator, data, fmt, settings, budget, public, out)
    if done.adapter is not None:
        metrics = score_with(emulator, done.adapter, task, device=device, **measure)
    else:
        metrics = score(done.model, done.tokenizer, task, **measure)
    return {"metrics": metrics, **done.record}


def _score_all(model, names: list, device, **measure) -> dict:
    """``{task: metrics}`` of one model (an HF model or an emulator package) loaded once for every task."""
    loaded, tok, _ = load_for_eval(str(model), device=device)
    return {t: score(loaded, tok, t, **measure) for t in names}


def resolve_public(public) -> Path:
    """The public text of attack ``recovery``: ``public``, else the calibration default, else an error."""
    path = Path(public) if public is not None else default_calibration()
    if path is None:
        raise OffsiteError(f"attack 'recovery' needs public text: pass --public FILE (.txt, .gz or .jsonl); the "
                           f"calibration default {DEFAULT_CORPUS} was not found under $OFFSITE_SHARED or ../shared")
    if not path.is_file():
        raise OffsiteError(f"--public {path} is not a file; give a public text file (.txt, .gz or .jsonl)")
    return path
