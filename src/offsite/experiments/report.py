"""Workflow: the five Offsite-Tuning numbers for one base model and one or more emulator methods.

Per task: full model zero-shot (Full ZS), optionally full fine-tuning (Full FT, ``full_ft=True``:
every decoder block of the full model tuned with the same settings — embeddings and head stay
frozen, as they do for adapters — through an ``adapter_layers="all"`` package; ``null`` when not
run), emulator zero-shot (Emu ZS), emulator fine-tuned (Emu FT: adapter trained on the
emulator, scored on the emulator) and plug-in (the same adapter in the full model), then the
average over tasks and GradOT's privacy gap Δ = plug-in − emulator FT. Accuracy tasks use ``acc``
(as the OT papers do); WikiText uses word perplexity, where lower is better, so its Δ is
emulator FT − plug-in (positive = the emulator is worse, as it should be).

Fine-tuning data per task comes from the same task spec as evaluation (its ``train`` split);
WikiText fine-tunes on the WikiText-2 v1 train text, detokenised as evaluation detokenises the raw text
(the raw train split is not in the offline data). Each adapter is fine-tuned separately per task, as in the papers. The
pieces shared with ``offsite audit`` (training file, scoring, headline metric, Full FT package)
are :mod:`offsite.experiments.protocol`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..core.device import resolve_device
from ..core.errors import OffsiteError
from ..core.plotting import pyplot
from ..emulator import get_builder
from ..eval.loading import load_for_eval
from ..eval.run import parse_tasks
from ..workflows.emulate import emulate
from ..workflows.finetune import finetune
from .audit import resolve_public, strongest_attack
from .protocol import Protocol, full_package, gap, headline, score, score_with, slug

ROWS = ("full_zs", "full_ft", "emu_zs", "emu_ft", "plug_in")
LABELS = {"full_zs": "Full ZS", "full_ft": "Full FT", "emu_zs": "Emu ZS", "emu_ft": "Emu FT", "plug_in": "Plug-in",
          "attack": "Best attack"}
AUDIT_ROW = "attack"
"""The sixth row of ``audit=True``: the best of ``offsite audit``'s attacks (Emu FT being attack (a))."""


def run_report(model: str, tasks, workdir, protocol: Protocol = Protocol(), methods=("uniform",),
               adapter_layers="2,2", method_settings: dict | None = None, full_ft: bool = False,
               calibration=None, audit: bool = False, public=None, stream: bool = False, log=print) -> dict:
    """Run the whole protocol and return the report (also written to ``workdir/report.json``).

    Args:
        model: base model folder or hub id.
        tasks: task names (comma-separated string or list).
        workdir: where emulators, adapters and results go.
        protocol: data, split, question and training limits, scoring batch, device and every
            fine-tune's settings (see :class:`~offsite.experiments.protocol.Protocol`). Its device is
            where every model of the report runs: emulator builds, fine-tuning and scoring; each model
            is loaded there once and scored there on its tasks.
        methods: emulator methods to compare.
        method_settings: ``{method: {setting: value}}`` for ``offsite emulate``.
        full_ft: also fine-tune every decoder block of the full model (the upper bound; slow).
        calibration: public calibration text for the methods that learn from text (None: their default).
        audit: add the row "Best attack": the best of the attacks of :mod:`offsite.experiments.audit` (full-emulator
            FT, LoRA on every layer, recovery pre-training on ``public`` + full FT, and Emu FT itself)
            under the same budget as the adapter fine-tune.
        public: public text of the recovery attack (None: the calibration default when present).
        stream: for a base model larger than memory: the emulators are built with ``emulate --stream``
            and the full model is scored with its layers on disk (Full ZS, plug-in; see
            :mod:`offsite.model.offload`); emulators are small and load in memory. Refused with ``full_ft``
            (it trains every block) and with methods that cannot stream (ScaleOT).
    """
    where = resolve_device(protocol.device)  # before the workdir or any training file is written
    if stream:
        check_streamable(methods, full_ft)
    public = resolve_public(public) if audit else None
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    names = parse_tasks(tasks)
    # Written once for the full FT row and every method; bad or leaking data fails here, before model work.
    train = {t: protocol.train_file(t, workdir) for t in names}
    ft_settings = protocol.finetune_settings(where)
    ft_settings.setdefault("eval_every", max(1, ft_settings["max_steps"] // 4))
    measure = protocol.measure()
    started = time.time()
    report = {"model": model, "tasks": names, "split": protocol.split, "limit": protocol.limit,
              "finetune": ft_settings,
              "methods": {}, **({"stream": True} if stream else {})}

    base, tok, _ = load_for_eval(model, device=where, stream=stream)
    full_zs = {t: score(base, tok, t, **measure) for t in names}
    log(f"[report] full zero-shot done ({time.time() - started:.0f}s)")
    del base
    full_tuned = {t: None for t in names}
    if full_ft:
        whole = full_package(model, workdir, where)
        for task in names:
            data, fmt = train[task]
            tuned = workdir / f"adapter-full-{slug(task)}"
            log(f"[report] full fine-tuning / {task}: started ({time.time() - started:.0f}s)")
            finetune(whole, data, tuned, format=fmt, overwrite=True, **ft_settings)
            # Loaded for this score only: its device memory is free before the next fine-tuning run.
            full_tuned[task] = score_with(model, tuned, task, device=where, **measure)
            log(f"[report] full fine-tuning / {task} ({time.time() - started:.0f}s)")

    for method in methods:
        emu_dir = workdir / f"emulator-{method}"
        built = time.time()
        emulate(model, emu_dir, method=method, adapter_layers=adapter_layers, overwrite=True,
                calibration=calibration, device=where, stream=stream, **(method_settings or {}).get(method, {}))
        build = {"seconds": round(time.time() - built, 1),
                 "parameters": json.loads((emu_dir / "manifest.json").read_text())["parameters"]}
        emu, emu_tok, _ = load_for_eval(str(emu_dir), device=where)
        rows = {r: {} for r in ROWS + ((AUDIT_ROW,) if audit else ())}
        best_attacks = {}
        rows["full_zs"] = full_zs
        rows["emu_zs"] = {t: score(emu, emu_tok, t, **measure) for t in names}
        del emu  # scored on every task; fine-tuning loads its own copy
        for task in names:
            data, fmt = train[task]
            adapter = workdir / f"adapter-{method}-{slug(task)}"
            log(f"[report] {method} / {task}: fine-tuning the adapter ({time.time() - started:.0f}s)")
            finetune(emu_dir, data, adapter, format=fmt, overwrite=True, **ft_settings)
            # One model on the device at a time: each is loaded for its score only.
            rows["emu_ft"][task] = score_with(emu_dir, adapter, task, device=where, **measure)
            rows["plug_in"][task] = score_with(model, adapter, task, device=where, stream=stream, **measure)
            if audit:
                best_attacks[task], rows[AUDIT_ROW][task] = strongest_attack(
                    emu_dir, train[task], ft_settings, rows["emu_ft"][task], task, public, where, measure)
            log(f"[report] {method} / {task}: fine-tuned and scored ({time.time() - started:.0f}s)")
        rows["full_ft"] = full_tuned
        report["methods"][method] = {**summarise(rows, names), "build": build,
                                     **({"best_attack": best_attacks} if audit else {})}
    report["seconds"] = round(time.time() - started, 1)
    (workdir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def check_streamable(methods, full_ft: bool) -> None:
    """Refuse, before any work, a streamed report that would need the whole model in memory."""
    if full_ft:
        raise OffsiteError("--full-ft trains every block of the full model, which --stream cannot hold; "
                           "drop one of the two")
    for method in methods:
        builder = get_builder(method)
        if not builder.supports_stream:
            raise OffsiteError(f"method '{method}' cannot build from a streamed model ({builder.stream_refusal}); "
                               "drop it from --methods or drop --stream")


def summarise(rows: dict, names: list) -> dict:
    """Headline numbers per row and task, accuracy averages, and Δ."""
    table, higher = {}, {}
    for row, per_task in rows.items():
        table[row] = {}
        for t in names:
            metrics = per_task.get(t)
            if metrics is None:
                table[row][t] = None
                continue
            table[row][t], higher[t] = headline(metrics)
    acc_tasks = [t for t in names if higher.get(t)]
    for row in table:
        vals = [table[row][t] for t in acc_tasks if table[row][t] is not None]
        table[row]["avg"] = sum(vals) / len(vals) if vals and len(vals) == len(acc_tasks) else None
    delta = {}
    for t in names + (["avg"] if acc_tasks else []):
        plug, emu = table["plug_in"][t], table["emu_ft"][t]
        if plug is not None and emu is not None:
            delta[t] = gap(plug, emu, higher.get(t, True))
    return {"table": table, "delta": delta, "higher_is_better": higher, "raw": rows}


def format_report(report: dict) -> str:
    """Markdown table per method: rows = the five numbers, columns = tasks + average, then Δ."""
    out = []
    for method, res in report["methods"].items():
        cols = report["tasks"] + (["avg"] if "avg" in res["delta"] else [])
        head = [f"{slug(c)}{'' if res['higher_is_better'].get(c, True) else ' (ppl↓)'}" for c in cols]
        out.append(f"### {method}\n")
        out.append("| | " + " | ".join(head) + " |")
        out.append("|---" * (len(cols) + 1) + "|")
        for row in ROWS + tuple(r for r in (AUDIT_ROW,) if r in res["table"]):
            cells = [_fmt(res["table"][row].get(c), res["higher_is_better"].get(c, True)) for c in cols]
            out.append(f"| {LABELS[row]} | " + " | ".join(cells) + " |")
        out.append("| **Δ** | " + " | ".join(_fmt(res["delta"].get(c), res["higher_is_better"].get(c, True))
                                            for c in cols) + " |\n")
    return "\n".join(out)


def _fmt(value, is_acc: bool) -> str:
    if value is None:
        return "–"
    return f"{100 * value:.1f}" if is_acc else f"{value:.1f}"


def plot_report(report: dict, path) -> Path | None:
    """Bar chart of plug-in vs emulator FT per task for every method (PNG); None without matplotlib."""
    plt = pyplot()
    if plt is None:
        return None
    methods = list(report["methods"])
    tasks = [t for t in report["tasks"] if report["methods"][methods[0]]["higher_is_better"].get(t)]
    if not tasks:
        return None
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(tasks) * len(methods), 3.6))
    width = 0.8 / (2 * len(methods))
    for m_i, method in enumerate(methods):
        table = report["methods"][method]["table"]
        for r_i, row in enumerate(("emu_ft", "plug_in")):
            xs = [i + (2 * m_i + r_i) * width for i in range(len(tasks))]
            ax.bar(xs, [100 * (table[row][t] or 0) for t in tasks], width,
                   label=f"{method}: {LABELS[row]}", alpha=0.55 if row == "emu_ft" else 1.0)
    full = report["methods"][methods[0]]["table"]["full_zs"]
    for i, t in enumerate(tasks):
        ax.hlines(100 * full[t], i - width / 2, i + 0.8 - width / 2, colors="k", linestyles="dashed",
                  label="Full ZS" if i == 0 else None)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(tasks))], [slug(t) for t in tasks])
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"Plug-in vs emulator FT — {Path(report['model']).name}")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
