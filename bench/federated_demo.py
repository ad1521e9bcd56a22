"""The demo world with the data owner federated (N clients, IID / non-IID) or private (DP-SGD at ε).

Usage (from the repository root):
    .venv/bin/python bench/federated_demo.py [--only NAME[,NAME...]] [--workdir runs/federated_demo]
                                             [--out bench/results/federated_demo] [--seed 0] [--quick]
    .venv/bin/python bench/federated_demo.py --list      # the setting names --only takes
    .venv/bin/python bench/federated_demo.py --replot    # summary.md + PNG again from results.json

One world and base model (``offsite.experiments.demo.pipeline.prepare`` with the default demo settings, seed 0),
one emulator built as ``offsite demo`` builds it (uniform drop, adapter 2+2, 1 of 4 middle layers
kept), then one adapter per setting, each plugged into the full model and scored on the test
people (whose facts only pretraining taught):

* ``central``: ``offsite finetune`` on the whole train split, exactly the demo's fine-tuning
  (200 steps, lr 3e-4, batch 16, cosine with 20 warm-up steps, the best-validated weights): the
  baseline, i.e. N = 1 and ε = ∞.
* ``fed-n{N}-{split}``: ``offsite federate`` (FedAvg on Flower's simulation engine) with N clients
  and the train split cut IID or by a Dirichlet(0.5) over each question's gold answer
  (``dirichlet_by="answer"``): 10 rounds × 20 local steps = 200 optimizer steps along every
  client's path, lr 3e-4, batch 16, constant learning rate (federate's default: a schedule would
  restart every round), AdamW restarted every round, the last round's adapter. N = 1 with a
  Dirichlet split is the IID run again (one client holds everything), so it is not run.
* ``dp-eps{ε}``: ``offsite finetune`` with DP-SGD (Opacus) at target ε, δ = 1e-5 (< 1/150 train
  questions), per-example clip 1.0, otherwise the baseline's steps, batch (expected Poisson batch)
  and schedule; the last weights (DP-SGD does not pick by private validation loss).

Writes ``results.json`` (every setting: plug-in and emulator-FT accuracy, Δ, seconds, the exact
settings, the accountant's ε), ``summary.md`` and ``federated_demo.png`` under ``--out``. A run
with ``--only`` replaces just those settings in an existing ``results.json``. ``--quick`` is a smoke
run: the quick demo's smaller world, a few steps, its own workdir and output folder under runs/.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch; Ray's workers inherit it

sys.path.insert(0, str(Path(__file__).resolve().parent))
from frontier_demo import FINETUNE  # noqa: E402  (the demo's fine-tuning: 200 steps, lr 3e-4, batch 16)

ROUNDS, LOCAL_STEPS = 10, 20  # 10 x 20 = FINETUNE's 200 steps along each client's path
DP_DELTA = 1e-5
DIRICHLET = {"dirichlet_alpha": 0.5, "dirichlet_by": "answer"}


def plan(quick: bool) -> dict:
    """Every setting by name: ``{"kind": "finetune" | "federate", "settings": {...}}`` (seed added later)."""
    steps = 20 if quick else FINETUNE["max_steps"]
    rounds, local = (2, 10) if quick else (ROUNDS, LOCAL_STEPS)
    base = {**FINETUNE, "max_steps": steps, "warmup_steps": max(1, steps // 10)}  # as run_demo fine-tunes
    fed_local = {"lr": FINETUNE["lr"], "batch_size": FINETUNE["batch_size"], "max_steps": local}
    out = {"central": {"kind": "finetune", "group": "centralised", "settings": base}}
    for split in ("iid", "dirichlet"):
        for n in (1, 3, 10):
            if split == "dirichlet" and n == 1:
                continue  # one client holds every example whatever the split
            out[f"fed-n{n}-{split}"] = {"kind": "federate", "group": f"FedAvg {split}", "clients": n, "split": split,
                                        "settings": {"clients": n, "rounds": rounds, "split": split, **fed_local,
                                                     **(DIRICHLET if split == "dirichlet" else {})}}
    for eps in (8.0, 1.0):
        out[f"dp-eps{eps:g}"] = {"kind": "finetune", "group": "DP-SGD", "epsilon": eps,
                                 "settings": {**base, "dp_epsilon": eps, "dp_delta": DP_DELTA, "dp_max_grad_norm": 1.0}}
    return out


def run_setting(name: str, spec: dict, emulator: Path, paths: dict, work: Path, seed: int) -> dict:
    """Train one adapter with the library's workflow, plug it, score plug-in and emulator FT."""
    from offsite.artifacts.manifest import read_manifest
    from offsite.experiments.demo.pipeline import score
    from offsite.core.errors import OffsiteError
    from offsite.federate import federate
    from offsite.workflows.finetune import finetune
    from offsite.workflows.plug import plug

    where = work / name
    settings = {**spec["settings"], "format": "mc", "val_data": str(paths["validation"]), "seed": seed}
    t0 = time.time()
    if spec["kind"] == "finetune":
        adapter = finetune(str(emulator), str(paths["train"]), where / "adapter", overwrite=True, progress=False,
                           **settings)
    else:
        for attempt in (1, 2):  # Ray sometimes fails to come up on a loaded machine: one retry
            try:
                adapter = federate(str(emulator), str(paths["train"]), where / "adapter", overwrite=True, **settings)
                break
            except OffsiteError as exc:
                if attempt == 2 or "simulation engine failed" not in str(exc):
                    raise
                print(f"[federated_demo] {name}: {exc}; retrying once", flush=True)
    train_seconds = time.time() - t0
    attempts = attempt if spec["kind"] == "federate" else None
    plugged = plug(str(paths["model"]), str(adapter), where / "plugged", overwrite=True)
    plug_in = score(str(plugged), None, paths["test"])
    emu_ft = score(str(emulator), str(adapter), paths["test"])
    row = {"name": name, "kind": spec["kind"], "group": spec["group"], "settings": settings,
           "plug_in": plug_in, "emulator_ft": emu_ft, "delta": round(plug_in - emu_ft, 4),
           "seconds": {"train": round(train_seconds, 1), "total": round(time.time() - t0, 1)}}
    if attempts is not None:
        row["engine_attempts"] = attempts
    for key in ("clients", "split", "epsilon"):
        if key in spec:
            row[key] = spec[key]
    row["adapter_drift"] = round(drift(Path(adapter) / "adapter.safetensors", paths["model"] / "model.safetensors"), 5)
    log = json.loads((Path(adapter) / "training_log.json").read_text())
    if log.get("val"):  # finetune without DP: the weights kept are the best-validated ones
        best = min(log["val"], key=lambda e: e["loss"])
        row["validation"] = {"kept_step": best["step"], "kept_val_loss": round(best["loss"], 5),
                             "last_val_loss": round(log["val"][-1]["loss"], 5)}
    manifest = read_manifest(adapter)
    if "dp" in manifest:
        dp = manifest["dp"]
        row["dp"] = {k: dp[k] for k in ("epsilon", "delta", "target_epsilon", "noise_multiplier", "max_grad_norm",
                                        "sample_rate", "expected_batch_size", "steps", "examples", "accountant")}
    if spec["kind"] == "federate":
        recorded = json.loads((Path(adapter) / "settings.json").read_text())
        fed = recorded["federation"]
        row["federation"] = {k: fed[k] for k in ("clients", "rounds", "strategy", "split", "dirichlet_alpha",
                                                 "dirichlet_by", "partition_sizes", "aggregation", "library")}
        row["rounds"] = [{k: e.get(k) for k in ("round", "train_loss", "val_loss")} for e in log.get("rounds", [])]
        row["seconds"]["rounds"] = manifest.get("run", {}).get("seconds", log.get("seconds"))
    return row


def drift(adapter_file: Path, base_file: Path) -> float:
    """||w - w0|| / ||w0|| over every adapter tensor: how far training moved the layers from the base model's."""
    from safetensors.torch import load_file

    tuned, base = load_file(str(adapter_file)), load_file(str(base_file))
    diff = sum(float(((v.float() - base[k].float()) ** 2).sum()) for k, v in tuned.items())
    return math.sqrt(diff / sum(float((base[k].float() ** 2).sum()) for k in tuned))


def span(values: list, fmt: str) -> str:
    low, high = fmt.format(min(values)), fmt.format(max(values))
    return low if low == high else f"{low}–{high}"


def sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="default bench/results/federated_demo (--quick: under the workdir)")
    p.add_argument("--workdir", default=None, help="default runs/federated_demo (--quick: runs/federated_demo_quick); "
                                                   "a finished pretraining of the same world there is reused")
    p.add_argument("--seed", type=int, default=0, help="seed of the world, its pretraining and every fine-tuning")
    p.add_argument("--quick", action="store_true", help="smoke run: the quick demo's world and a few steps")
    p.add_argument("--only", "--settings", dest="only", default=None,
                   help="comma-separated setting names to (re)run, merged into an existing results.json; "
                        "--list shows them")
    p.add_argument("--list", action="store_true", help="print the setting names and exit")
    p.add_argument("--replot", action="store_true", help="rewrite summary.md and the PNG from results.json only")
    args = p.parse_args(argv)
    todo_all = plan(args.quick)
    if args.replot:
        out = Path(args.out or ("runs/federated_demo_quick/results" if args.quick else "bench/results/federated_demo"))
        record = json.loads((out / "results.json").read_text())
        (out / "summary.md").write_text(to_markdown(record))
        plot(record, out / "federated_demo.png")
        return 0
    if args.list:
        print("\n".join(f"{k}: {v['kind']} {json.dumps(v['settings'])}" for k, v in todo_all.items()))
        return 0
    only = [s.strip() for s in args.only.split(",")] if args.only else list(todo_all)
    unknown = [s for s in only if s not in todo_all]
    if unknown:
        p.error(f"unknown setting(s) {unknown}; known: {', '.join(todo_all)}")
    work = Path(args.workdir or ("runs/federated_demo_quick" if args.quick else "runs/federated_demo"))
    out = Path(args.out or (work / "results" if args.quick else "bench/results/federated_demo"))

    import torch

    from offsite.experiments.demo.pipeline import prepare, score, settings_for
    from offsite.workflows.emulate import emulate

    torch.set_num_threads(1)  # tiny model: one thread is fastest on a small shared CPU (and each client has one)
    started = time.time()
    s = settings_for(args.quick, args.seed)
    paths, _ = prepare(work, s, args.seed, progress=True)
    emulator = emulate(str(paths["model"]), work / "emulator", method="uniform", adapter_layers=s.adapter_layers,
                       overwrite=True, emulator_layers=s.emulator_layers)
    n_train, n_test = (sum(1 for _ in open(paths[k], encoding="utf-8")) for k in ("train", "test"))
    answers = {(r["choices"][r["label"]]) for r in map(json.loads, open(paths["train"], encoding="utf-8"))}

    previous = out / "results.json"
    record = json.loads(previous.read_text()) if args.only and previous.is_file() else {"rows": []}
    if record.get("quick", args.quick) != args.quick or record.get("seed", args.seed) != args.seed:
        p.error(f"{previous} holds a run with other --quick/--seed; pick another --out")
    reference = record.get("reference") or {"full_zs": score(str(paths["model"]), None, paths["test"]),
                                            "emulator_zs": score(str(emulator), None, paths["test"])}
    rows = {r["name"]: r for r in record["rows"]}
    flags = ["--quick"] * args.quick + [f"--seed {args.seed}"] * bool(args.seed)
    record.update({"command": " ".join([".venv/bin/python bench/federated_demo.py", *flags]), "seed": args.seed,
                   "quick": args.quick, "train_questions": n_train, "test_questions": n_test,
                   "chance": round(1 / s.choices, 4), "demo_settings": {"people": s.people,
                                                                       "adapter_layers": s.adapter_layers,
                                                                       "emulator_layers": s.emulator_layers},
                   "answer_classes": len(answers), "base_model_sha256": sha256(paths["model"] / "model.safetensors"),
                   "reference": reference})
    out.mkdir(parents=True, exist_ok=True)
    for name in only:
        print(f"[federated_demo] {name} ...", flush=True)
        rows[name] = run_setting(name, todo_all[name], emulator, paths, work, args.seed)
        r = rows[name]
        print(f"[federated_demo] {name}: plug-in {100 * r['plug_in']:.1f}, emulator FT {100 * r['emulator_ft']:.1f}"
              f" ({r['seconds']['total']:.0f} s)" + (f", ε = {r['dp']['epsilon']:.2f}" if "dp" in r else ""),
              flush=True)
        record["rows"] = [rows[k] for k in todo_all if k in rows]  # plan order, written after every setting
        (out / "results.json").write_text(json.dumps(record, indent=1) + "\n")
    record.setdefault("seconds", {})[",".join(only) if args.only else "all"] = round(time.time() - started, 1)
    (out / "results.json").write_text(json.dumps(record, indent=1) + "\n")
    (out / "summary.md").write_text(to_markdown(record))
    plot(record, out / "federated_demo.png")
    print(to_markdown(record))
    return 0


def half_width(p: float, n: int) -> float:
    """95 % normal-approximation half-width of an accuracy p on n questions."""
    return 1.96 * math.sqrt(max(p * (1 - p), 1e-9) / n)


def label(row: dict) -> str:
    if row["kind"] == "federate":
        return f"FedAvg N={row['clients']} {row['split']}"
    if "epsilon" in row:
        return f"DP-SGD ε={row['epsilon']:g}"
    return "centralised (N=1, ε=∞)"


def tick(row: dict) -> str:
    """The short x label of a bar pair."""
    if row["kind"] == "federate":
        split = "IID" if row["split"] == "iid" else f"Dir({row['settings'].get('dirichlet_alpha', '?'):g})"
        return f"FedAvg\nN={row['clients']}\n{split}"
    if "epsilon" in row:
        return f"DP-SGD\nε={row['epsilon']:g}"
    return "centralised\nN=1\nε=∞"


def to_markdown(record: dict) -> str:
    ref, n = record["reference"], record["test_questions"]
    base = next((r for r in record["rows"] if r["name"] == "central"), None)
    pct = lambda x: f"{100 * x:.1f}"  # noqa: E731
    lines = ["# The demo world, federated and differentially private", "",
             f"Command: `{record['command']}` (seconds per invocation: {json.dumps(record.get('seconds', {}))}).",
             "", f"One demo world (seed {record['seed']}, {record['train_questions']} train questions, "
             f"{n} test questions about other people, chance {pct(record['chance'])}%). Full model zero-shot "
             f"{pct(ref['full_zs'])}%, emulator zero-shot {pct(ref['emulator_zs'])}%. A 95% interval on {n} "
             f"questions is about ±{100 * half_width(0.9, n):.0f} points near 90% and "
             f"±{100 * half_width(0.35, n):.0f} near 35%.", "",
             "| setting | plug-in | emulator FT | Δ | plug-in − centralised | reported ε | train s |",
             "|---|---|---|---|---|---|---|"]
    for r in record["rows"]:
        gap = f"{100 * (r['plug_in'] - base['plug_in']):+.1f}" if base and r is not base else "—"
        eps = f"{r['dp']['epsilon']:.2f} (δ {r['dp']['delta']:g}, σ {r['dp']['noise_multiplier']:.2f})" \
            if "dp" in r else "∞"
        lines.append(f"| {label(r)} | {pct(r['plug_in'])} | {pct(r['emulator_ft'])} | {100 * r['delta']:+.1f} | "
                     f"{gap} | {eps} | {r['seconds']['train']:.0f} |")
    lines += ["", "Δ = plug-in − emulator FT (the privacy margin). Settings, per-round losses, partition sizes, "
              "adapter drift and the DP accounting of every row: `results.json`.", ""]
    if base is not None and len(record["rows"]) > 1 and all("adapter_drift" in r for r in record["rows"]):
        lines += ["## What it shows", "", *notes(record, base), ""]
    return "\n".join(lines)


def notes(record: dict, base: dict) -> list:
    """The reading of the table, from its numbers (so that a rerun's text matches its table)."""
    rows, ref, n = record["rows"], record["reference"], record["test_questions"]
    others = [r for r in rows if r is not base]
    fed = [r for r in rows if r["kind"] == "federate"]
    dps = [r for r in rows if "dp" in r]
    worst = max(others, key=lambda r: abs(r["plug_in"] - base["plug_in"]))
    gap, hw = worst["plug_in"] - base["plug_in"], half_width(base["plug_in"], n)
    inside = abs(gap) < hw
    tried = []
    if fed:
        tried.append(f"federation (up to {max(r['clients'] for r in fed)} clients, IID or non-IID)")
    if dps:
        tried.append(f"DP-SGD down to ε = {min(r['epsilon'] for r in dps):g}")
    out = [f"**Plug-in accuracy.** Centralised {_pct(base['plug_in'])}%; every other setting lies within "
           f"{100 * abs(gap):.1f} points of it (the largest gap: {label(worst)}, {100 * gap:+.1f} points = "
           f"{round(abs(gap) * n)} of {n} questions), {'well inside' if inside else 'beyond'} the "
           f"±{100 * hw:.0f}-point 95% interval of one setting on {n} questions; a difference of two settings is "
           "noisier still. "
           + (f"On this world, then, neither {' nor '.join(tried)} has a cost in plug-in accuracy that one world "
              "can resolve; a cost of a few points would go unseen. " if inside else "")
           + "One world, one seed.", ""]
    drifts = [f"{base['adapter_drift']:.3f} centralised (its best-validated weights, step "
              f"{base.get('validation', {}).get('kept_step', '?')})"]
    if fed:
        drifts.append(f"{span([r['adapter_drift'] for r in fed], '{:.3f}')} federated (the last round's weights)")
    if dps:
        drifts.append(f"{span([r['adapter_drift'] for r in dps], '{:.3f}')} DP-SGD")
    out += [f"**Why plug-in barely moves here.** The untouched adapter plugged in *is* the full model "
            f"({_pct(ref['full_zs'])}% zero-shot), and the test asks about people the fine-tuning never saw, so "
            "plug-in accuracy measures whether a training recipe keeps the full model's knowledge path intact, "
            "not what it learned" + (": here every recipe keeps it" if inside else "") + ". The adapters did "
            "move (relative L2 change of the adapter layers: " + ", ".join(drifts) + ")"
            + ("; plug-in accuracy did not follow." if inside else "."), ""]
    learned = (f"**What fine-tuning learned** shows in the emulator's own accuracy instead: zero-shot "
               f"{_pct(ref['emulator_zs'])}%, centralised FT {_pct(base['emulator_ft'])}%; "
               + ", ".join(f"{label(r)} {_pct(r['emulator_ft'])}" for r in others)
               + f". These differences are a few questions, within the ±{100 * half_width(0.35, n):.0f}-point "
               "interval near 35%.")
    if dps:
        dp0 = dps[0]["dp"]
        near = max(r["emulator_ft"] for r in dps) <= ref["emulator_zs"] + 3.5 / n
        learned += (f" DP-SGD's emulator FT {'is at or near the zero-shot' if near else 'gains little'}: with "
                    f"{record['train_questions']} questions and {dp0['steps']} steps its noise swamps the signal "
                    f"even at ε = {max(r['epsilon'] for r in dps):g} (σ "
                    + ", ".join(f"{r['dp']['noise_multiplier']:.2f} at ε {r['epsilon']:g}" for r in dps)
                    + f"; per-example clip {dp0['max_grad_norm']:g}, expected batch {dp0['expected_batch_size']}), "
                    "and AdamW turns noise-dominated gradients into steps of about lr per weight whatever σ is, "
                    "which would explain the equal drift at every ε. DP-SGD rows do not repeat exactly: their "
                    "batches and noise come from the OS's randomness, never from the seed (two runs of this script "
                    "gave rows a question or three apart).")
    out += [learned, ""]
    if fed:
        out += [federated_notes(record, base, fed), ""]
        f1 = next((r for r in fed if r["clients"] == 1), None)
        cost = ", ".join(f"{label(r)} {r['seconds']['train']:.0f} s"
                         + (" (after a failed engine start)" if r.get("engine_attempts", 1) > 1 else "") for r in fed)
        overhead = f" (N = 1 minus centralised: {f1['seconds']['train'] - base['seconds']['train']:.0f} s)" \
            if f1 else ""
        out += [f"**Time** (training only, 2 shared CPU cores): centralised {base['seconds']['train']:.0f} s"
                + "".join(f", {label(r)} {r['seconds']['train']:.0f} s" for r in dps)
                + f"; {cost}. Flower's Ray simulation engine's start-up and messaging{overhead} cost more than "
                "this tiny model's training.", ""]
    readme = not record["quick"] and abs(ref["full_zs"] - 0.9429) > 1e-3
    out += [f"**Base model.** The demo's default pretraining reused from this checkout (sha256 "
            f"{record.get('base_model_sha256', '?')[:12]}…, full zero-shot {_pct(ref['full_zs'])}%)"
            + ("; the README's demo table (94.3%) came from another pretraining run of the same settings"
               if readme else "") + "."]
    return out


def federated_notes(record: dict, base: dict, fed: list) -> str:
    """The paragraph on the FedAvg runs: schedule, the N = 1 check, over-training, the non-IID split."""
    fs = fed[0]["settings"]
    f1 = next((r for r in fed if r["clients"] == 1), None)
    best_rounds = [min(range(len(v)), key=v.__getitem__) + 1 for v in
                   ([e["val_loss"] for e in r.get("rounds", []) if e.get("val_loss") is not None] for r in fed) if v]
    last_loss = min(r["rounds"][-1]["train_loss"] for r in fed if r.get("rounds"))
    most = max(r["clients"] for r in fed)
    per_client = record["train_questions"] // most
    text = (f"**Federated runs.** FedAvg, {fs['rounds']} rounds × {fs['max_steps']} local steps "
            f"({fs['rounds'] * fs['max_steps']} optimizer steps along every client's path; the baseline runs "
            f"{base['settings']['max_steps']}), lr {fs['lr']:g}, batch {fs['batch_size']}, constant learning rate "
            "(a schedule would restart every round), AdamW restarted every round, the last round's adapter. ")
    if f1:
        text += (f"N = 1 gives {_pct(f1['plug_in'])}% plug-in and {_pct(f1['emulator_ft'])}% emulator FT against "
                 f"the baseline's {_pct(base['plug_in'])} / {_pct(base['emulator_ft'])}: not identical runs (the "
                 "baseline has warm-up + cosine and keeps its best-validated weights). ")
    if best_rounds:
        text += (f"The server's validation loss is lowest after round {min(best_rounds)} to {max(best_rounds)} and "
                 f"rises after it (last-round local train loss down to {last_loss:.4f}: the train questions are "
                 "memorised), so a federated adapter is an over-trained one, while the baseline keeps its step-"
                 f"{base.get('validation', {}).get('kept_step', '?')} weights. ")
    text += (f"Non-IID: a Dirichlet({DIRICHLET['dirichlet_alpha']:g}) over each question's gold answer "
             f"(`dirichlet_by=\"answer\"`, {record.get('answer_classes', '?')} classes). A split by `label` (the "
             "gold choice's position, federate's default for mc data before this benchmark; now `answer` is) would skew only a position the choices are "
             "shuffled over and fine-tuning never sees (it trains on the answer text): an IID split in disguise. "
             "Partition sizes: "
             + "; ".join(f"{label(r)} {r['federation']['partition_sizes']}" for r in fed if r["split"] != "iid")
             + f". In the IID split over {most} clients a client holds about {per_client} questions")
    if per_client < fs["batch_size"]:
        text += (f", fewer than a batch of {fs['batch_size']}: each local step is its whole data, and a round is "
                 f"{fs['max_steps']} local epochs")
    return text + "."


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def plot(record: dict, path: Path) -> None:
    from offsite.core.plotting import pyplot

    plt = pyplot()
    if plt is None:
        print("[federated_demo] matplotlib missing: no PNG")
        return
    rows, ref, n = record["rows"], record["reference"], record["test_questions"]
    colours = {"centralised": "tab:blue", "FedAvg iid": "tab:green", "FedAvg dirichlet": "tab:orange",
               "DP-SGD": "tab:red"}
    fig, ax = plt.subplots(figsize=(9.0, 4.8))
    x, pos, last = [], 0.0, None
    for r in rows:
        if last is not None and r["group"] != last:
            pos += 0.6  # a gap between families
        x.append(pos)
        pos, last = pos + 1, r["group"]
    width = 0.38
    for xi, r in zip(x, rows):
        c = colours.get(r["group"], "tab:grey")
        ax.bar(xi - width / 2, 100 * r["plug_in"], width, color=c, yerr=100 * half_width(r["plug_in"], n),
               capsize=2, error_kw={"linewidth": 0.7})
        ax.bar(xi + width / 2, 100 * r["emulator_ft"], width, color=c, alpha=0.35, hatch="//", edgecolor=c)
        ax.text(xi - width / 2, 2, f"{100 * r['plug_in']:.1f}", ha="center", fontsize=6, color="white")
    ax.axhline(100 * ref["full_zs"], color="k", linestyle="dashed", linewidth=0.8,
               label=f"full model zero-shot ({100 * ref['full_zs']:.1f}%)")
    central = next((r for r in rows if r["name"] == "central"), None)
    if central:
        ax.axhline(100 * central["plug_in"], color="tab:blue", linestyle="dotted", linewidth=0.9,
                   label=f"centralised plug-in ({100 * central['plug_in']:.1f}%)")
    ax.axhline(100 * ref["emulator_zs"], color="grey", linestyle="dashdot", linewidth=0.7,
               label=f"emulator zero-shot ({100 * ref['emulator_zs']:.1f}%)")
    ax.axhline(100 * record["chance"], color="grey", linestyle="dotted", linewidth=0.6, label="chance")
    from matplotlib.patches import Patch

    handles, _ = ax.get_legend_handles_labels()
    handles += [Patch(facecolor="grey", label="plug-in (95% interval)"),
                Patch(facecolor="grey", alpha=0.35, hatch="//", edgecolor="grey", label="emulator fine-tuned")]
    ax.set_xticks(x, [tick(r) for r in rows], fontsize=7)
    ax.set_ylabel("accuracy on the test people (%)")
    ax.set_ylim(0, 105)
    fed = next((r["settings"] for r in rows if r["kind"] == "federate"), None)
    schedule = f"FedAvg, {fed['rounds']} rounds × {fed['max_steps']} local steps" if fed else "FedAvg"
    ax.set_title(f"Demo world (seed {record['seed']}, {n} test questions): the data owner centralised, federated "
                 f"({schedule})\nor DP-SGD (δ {DP_DELTA:g}); solid: plug-in, hatched: emulator FT"
                 + (" [quick smoke run]" if record["quick"] else ""), fontsize=8)
    ax.legend(handles=handles, fontsize=6.5, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
