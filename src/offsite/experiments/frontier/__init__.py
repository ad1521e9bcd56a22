"""Workflow: choose an emulator by measurement (``offsite frontier``).

A model owner wants the emulator with the best plug-in that still hides the model well enough. The
frontier sweeps one method's size knob (the builder's ``size_knob``: layers kept, layers replaced,
parameter budget) and, for GradOT, its privacy weight λ; every point is built, its adapter
fine-tuned on the task's train split and scored on a *validation* split (emulator FT and plug-in,
with ``audit=True`` also the strongest attack of :mod:`offsite.experiments.audit` at the same budget). The
privacy a point is judged by is the emulator side's best score: emulator FT, or the strongest
attack when audited (the worst case). A target says what "hidden enough" means:

* ``max_emulator_score``: the emulator side scores at most this (accuracy in %, not for perplexity);
* ``min_delta``: plug-in minus the emulator side at least this (points of accuracy; for perplexity
  the emulator side's perplexity minus the plug-in's).

Of the points that meet it the one with the best plug-in wins (ties: the smaller emulator); it is
rebuilt into ``out`` with the sweep in its manifest (``selection``). When no point meets the target
the sweep is still written and the call fails saying so, with the closest point.

Reads top to bottom: check every input (before any output), resolve the points, write the task's
training file, score the full model once, run the points, write ``frontier.json/.md/.png`` into
``workdir``, then choose and rebuild. Calibration work is shared between points: GradOT's GCS terms
and ScaleOT's importance scores and harmonizers are kept in ``workdir/cache`` (``cache_dir``).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import time
from pathlib import Path

from ...artifacts import guard_output
from ...core.device import resolve_device
from ...core.errors import OffsiteError
from ...data.tasks import is_file_task
from ...emulator import get_builder
from ...eval.run import check_data_dir, parse_tasks
from ...model.loading import load_config
from ...model.split import make_split
from ...workflows.emulate import emulate
from ...workflows.finetune import finetune, make_config
from ..audit import resolve_public, strongest_attack
from ..protocol import Protocol, check_workdir, gap, headline, score_with
from .output import format_frontier, plot_frontier

__all__ = ["run_frontier", "sweep_points", "format_frontier", "plot_frontier"]


def sweep_points(method: str, middle: int, values=None, lambdas=None, fixed: dict | None = None) -> list:
    """The settings of every point: the size knob's values (x GradOT's λ values), over ``fixed``.

    Args:
        method: emulator method name.
        middle: middle layers of the split (for the default layer counts).
        values: the size knob's values (None: the method's defaults).
        lambdas: GradOT only: λ values, each used for attention and MLP (None: the default λ).
        fixed: settings every point shares.

    Raises:
        OffsiteError: a method without a size knob, λ for another method, a knob set in ``fixed``, or a
            value the method refuses (checked here, before any work).
    """
    builder = get_builder(method)
    if builder.size_knob is None:
        raise OffsiteError(f"method {method!r} has no size setting to sweep")
    fixed = dict(fixed or {})
    if builder.size_knob in fixed:
        raise OffsiteError(f"{builder.size_knob} is what the frontier sweeps; give its values as the sweep, "
                           "not as a fixed setting")
    if lambdas and method != "gradot":
        raise OffsiteError(f"λ values are a GradOT setting; method {method!r} has none")
    values = list(values) if values else builder.size_points(middle)
    if not values:
        raise OffsiteError(f"no {builder.size_knob} values to sweep for {middle} middle layers")
    lam_points = [{"lambda_attn": lam, "lambda_mlp": lam} for lam in lambdas] if lambdas else [{}]
    points = [{**fixed, builder.size_knob: v, **lam} for v, lam in itertools.product(values, lam_points)]
    for point in points:
        builder.make_config(**point)  # a bad value fails now, not after hours of earlier points
        layers = point.get("emulator_layers")
        if builder.size_knob == "emulator_layers" and not 0 <= layers <= middle:
            raise OffsiteError(f"method {method!r}: emulator_layers {layers} is not between 0 and the {middle} "
                               "middle layers of the split")
    return points


def run_frontier(model: str, method: str, task: str, workdir, out, protocol: Protocol = Protocol(), values=None,
                 lambdas=None, fixed: dict | None = None, max_emulator_score: float | None = None,
                 min_delta: float | None = None, audit: bool = False, public=None, adapter_layers="2,2",
                 calibration=None, overwrite: bool = False, sign_key=None, log=print) -> dict:
    """Sweep, score, choose and write the chosen emulator to ``out``; returns the frontier record.

    Args:
        model: the base model (folder or hub id); method: the emulator method swept.
        task: one task name or own-data template (``mine/{split}.jsonl``).
        workdir: folder for every point's emulator and adapter and ``frontier.json/.md/.png``.
        out: where the chosen emulator package goes.
        protocol: data, split (keep the test split for judging the choice), limits, scoring batch,
            device and every fine-tune's (and attack's) settings (see
            :class:`~offsite.experiments.protocol.Protocol`).
        values, lambdas, fixed: the sweep (see :func:`sweep_points`).
        max_emulator_score, min_delta: the target (exactly one; see the module docstring).
        audit: judge privacy by the strongest attack at the same budget, not by emulator FT.
        public: public text of the audit's recovery attack.

    Raises:
        OffsiteError: a bad input (before any output), or no point meets the target (after the sweep
            is written).
    """
    where = resolve_device(protocol.device)
    if (max_emulator_score is None) == (min_delta is None):
        raise OffsiteError("give exactly one target: --max-emulator-score (accuracy, %) or --min-delta")
    names = parse_tasks(task)
    if len(names) != 1:
        raise OffsiteError(f"the frontier chooses for one task; got {len(names)} ({', '.join(names)})")
    task = names[0]
    if max_emulator_score is not None and task == "wikitext":
        raise OffsiteError("--max-emulator-score is an accuracy; for perplexity give --min-delta "
                           "(emulator perplexity minus plug-in perplexity)")
    check_data_dir(names, protocol.data_dir)
    settings = protocol.finetune_settings(where)
    make_config(settings)  # bad fine-tuning settings fail here
    config = load_config(model)
    part = make_split(config.num_hidden_layers, adapter_layers)
    points = sweep_points(method, len(part.middle), values, lambdas, fixed)
    public = resolve_public(public) if audit else None
    inputs = [model, calibration, public, protocol.data_dir] + ([Path(task).parent] if is_file_task(task) else [])
    guard_output(Path(out), "emulator", overwrite, inputs)
    workdir = check_workdir(workdir, inputs + [out])
    workdir.mkdir(parents=True, exist_ok=True)
    data, fmt = train = protocol.train_file(task, workdir)
    # methods with a cache_dir (GradOT's terms, ScaleOT's scores) let later points skip calibration work
    cached = "cache_dir" in {f.name for f in dataclasses.fields(get_builder(method).config_cls)}
    extra = {"cache_dir": str(workdir / "cache")} if cached and "cache_dir" not in (fixed or {}) else {}
    measure = protocol.measure()
    started = time.time()
    full = score_with(model, None, task, device=where, **measure)
    higher = headline(full)[1]
    record = {"model": model, "method": method, "task": task, "split": protocol.split, "limit": protocol.limit,
              "knob": get_builder(method).size_knob, "finetune": settings, "audit": audit,
              "target": {"max_emulator_score": max_emulator_score, "min_delta": min_delta},
              "full_zs": headline(full)[0], "higher_is_better": higher, "points": []}
    for i, point in enumerate(points):
        emu_dir = workdir / f"point-{i}"
        emulate(model, emu_dir, method=method, adapter_layers=adapter_layers, overwrite=True,
                calibration=calibration, device=where, **point, **extra)
        adapter = finetune(emu_dir, data, workdir / f"adapter-{i}", format=fmt, overwrite=True, **settings)
        emu_ft = score_with(emu_dir, adapter, task, device=where, **measure)
        row = {"settings": point, "parameters": json.loads((emu_dir / "manifest.json").read_text())["parameters"],
               "emu_ft": headline(emu_ft)[0], "plug_in": headline(score_with(model, adapter, task, device=where,
                                                                              **measure))[0]}
        row["attack"], row["emulator_side"] = None, row["emu_ft"]
        if audit:
            name, metrics = strongest_attack(emu_dir, train, settings, emu_ft, task, public, where, measure)
            row["attack"], row["emulator_side"] = name, headline(metrics)[0]
        row["delta"] = gap(row["plug_in"], row["emulator_side"], higher)
        row["meets"] = meets(row, higher, max_emulator_score, min_delta)
        record["points"].append(row)
        log(f"[frontier] point {i + 1}/{len(points)} {point}: emulator {row['emulator_side']:.4g}, plug-in "
            f"{row['plug_in']:.4g} ({time.time() - started:.0f}s)")
    record["chosen"] = choose(record["points"], higher)
    record["seconds"] = round(time.time() - started, 1)
    (workdir / "frontier.json").write_text(json.dumps(record, indent=2) + "\n")
    (workdir / "frontier.md").write_text(format_frontier(record) + "\n")
    plot_frontier(record, workdir / "frontier.png")
    if record["chosen"] is None:
        closest = max(record["points"], key=lambda r: r["delta"])
        raise OffsiteError(f"no point of the sweep meets the target {_target_text(max_emulator_score, min_delta)}; "
                           f"the most private was {closest['settings']} (emulator {_show(closest['emulator_side'], higher)}, "
                           f"plug-in {_show(closest['plug_in'], higher)}); the sweep is in {workdir}/frontier.md")
    best = record["points"][record["chosen"]]
    selection = {"frontier": {k: record[k] for k in ("task", "split", "knob", "target", "audit", "full_zs")},
                 "points": [{k: r[k] for k in ("settings", "emulator_side", "plug_in", "delta", "meets")}
                            for r in record["points"]], "chosen": record["chosen"]}
    emulate(model, out, method=method, adapter_layers=adapter_layers, overwrite=overwrite, calibration=calibration,
            device=where, sign_key=sign_key, selection=selection, **best["settings"], **extra)
    record["out"] = str(out)
    return record


def meets(row: dict, higher: bool, max_emulator_score, min_delta) -> bool:
    """Whether one point meets the target (accuracies in the record are fractions, targets in %)."""
    if max_emulator_score is not None:
        return row["emulator_side"] <= max_emulator_score / 100 + 1e-12
    return row["delta"] >= (min_delta / 100 if higher else min_delta) - 1e-12


def choose(points: list, higher: bool) -> int | None:
    """Index of the point with the best plug-in among those meeting the target (ties: fewer parameters)."""
    ok = [i for i, r in enumerate(points) if r["meets"]]
    if not ok:
        return None
    sign = 1 if higher else -1  # a perplexity is better lower
    return max(ok, key=lambda i: (sign * points[i]["plug_in"], -points[i]["parameters"]["emulator"]))


def _target_text(max_emulator_score, min_delta) -> str:
    return (f"--max-emulator-score {max_emulator_score:g}" if max_emulator_score is not None
            else f"--min-delta {min_delta:g}")


def _show(value: float, higher: bool) -> str:
    return f"{100 * value:.1f}%" if higher else f"{value:.2f}"
