"""Fine-tuning cost on a real pretrained LM, with full-vocabulary logits and with the head only where it counts.

Usage (from the repository root; the model from ``offsite models prepare smollm2-135m``, or --model DIR):
    .venv/bin/python bench/real_ft_cost.py [--model DIR] [--task sciq] [--batch-size 8]
        [--warmup 1] [--steps 5] [--modes full_ft,emu_ft,emu_lora,full_lora] [--configs before,logits,after]
        [--work runs/real_ft_cost] [--out bench/results/real_ft_cost]

What runs: the fine-tunes of ``offsite report --tasks sciq --full-ft --adapter-layers 2,2`` on the
same training file (the task's ``train`` split as prompt/completion pairs, ``--train-limit`` of
them; loss on the answer tokens only), each through ``offsite.workflows.finetune.finetune`` in a fresh process:

* ``full_ft``: the report's Full FT row: every decoder block of the full model trains (an
  ``adapter_layers="all"`` package, :func:`offsite.experiments.protocol.full_package`; embeddings and the
  tied head stay frozen, as they do for adapters);
* ``emu_ft``: the data owner's run: the 2+2 adapter against the uniform emulator at its default size.

Each mode runs in three configurations (:data:`CONFIGS`): ``before`` = ``logits="full",
pass_tokens=0``, the code path before issue 23 (every position through the 49,152-wide head, HF's
own loss, the micro-batch padded to its longest example); ``logits`` = ``logits="scored"`` alone
(the head on the answer tokens only, ``offsite.data.token_loss``); ``after`` = the defaults now, scored
logits and the micro-batch in parts of similar length (``offsite.training.parts``, 512 padded
tokens per pass on CPU). Same examples in the same order and the same optimizer steps (seed 0),
validation off, no checkpoint due, so a step is one forward, backward, clip and AdamW step.

Step times come from an optimizer post-step hook, as wall time and as the process's CPU time (all
its threads): on a machine shared with other jobs the wall time stretches with the load, the CPU
time much less, so both are kept; the first ``--warmup`` steps are not timed, the headline is the
median of the timed steps. Peak memory is the child's ``VmHWM`` (peak resident set) at the end of
the last step: loading and training, not writing the adapter. ``loadavg`` at the start of each run
is recorded. Writes ``results.json`` and ``summary.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GIB = 2 ** 30
MODES = {"full_ft": "full model, every decoder block (report's Full FT)",
         "emu_ft": "uniform emulator, 2+2 adapter (the data owner's run)",
         "emu_lora": "uniform emulator, LoRA r=8 on the 2+2 adapter (OT + LoRA)",
         "full_lora": "full model, LoRA r=8 on every decoder block (the LoRA baseline)"}
LORA = {"emu_lora": {"lora": True, "lora_r": 8}, "full_lora": {"lora": True, "lora_r": 8}}
CONFIGS = {"before": {"logits": "full", "pass_tokens": 0}, "logits": {"logits": "scored", "pass_tokens": 0},
           "after": {"logits": "scored", "pass_tokens": None}}


def _vmhwm_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def child(spec: dict) -> dict:
    """One fine-tune in this process: step times and peak RSS."""
    import torch
    import torch.optim.optimizer as optim_hooks

    import offsite.workflows.finetune as ft
    from offsite.training import loop

    marks = {"start": None, "ends": [], "cpu": [], "hwm": None, "hwm_load": None}
    real_call = loop.Batcher.__call__

    def first_batch(self, index):
        if marks["start"] is None:
            marks["start"], marks["hwm_load"] = time.perf_counter(), _vmhwm_bytes()
            marks["cpu_start"] = time.process_time()
        return real_call(self, index)

    def after_step(optimizer, args, kwargs):
        marks["ends"].append(time.perf_counter())
        marks["cpu"].append(time.process_time())
        marks["hwm"] = _vmhwm_bytes()

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    loop.Batcher.__call__ = first_batch
    optim_hooks.register_optimizer_step_post_hook(after_step)
    load = os.getloadavg()[0]
    out = ft.finetune(spec["package"], spec["data"], spec["out"], overwrite=True, resume=False, format="prompt",
                      batch_size=spec["batch"], max_steps=spec["warmup"] + spec["steps"], lr=1e-4, val_fraction=0.0,
                      save_every=10 ** 9, seed=0, progress=False, device="cpu", **CONFIGS[spec["config"]],
                      **LORA.get(spec["mode"], {}))
    log = json.loads((Path(out) / "training_log.json").read_text())
    steps = [marks["ends"][0] - marks["start"]] + [b - a for a, b in zip(marks["ends"], marks["ends"][1:])]
    cpu = [marks["cpu"][0] - marks["cpu_start"]] + [b - a for a, b in zip(marks["cpu"], marks["cpu"][1:])]
    return {"mode": spec["mode"], "config": spec["config"], **CONFIGS[spec["config"]], "step_seconds": [round(s, 3) for s in steps],
            "median_s": round(_median(steps[spec["warmup"]:]), 3), "step_cpu_seconds": [round(s, 3) for s in cpu],
            "median_cpu_s": round(_median(cpu[spec["warmup"]:]), 3), "peak_rss_gib": round(marks["hwm"] / GIB, 3),
            "peak_rss_load_gib": round(marks["hwm_load"] / GIB, 3),
            "losses": [row["loss"] for row in log["train"]], "threads": torch.get_num_threads(),
            "loadavg_start": round(load, 2)}


def _median(values: list) -> float:
    timed, mid = sorted(values), len(values) // 2
    return timed[mid] if len(timed) % 2 else (timed[mid - 1] + timed[mid]) / 2


def _default_model() -> str:
    try:
        from offsite.model.realmodels import prepared_model_path
    except ImportError:  # an older checkout: give --model
        raise SystemExit("give --model (offsite.model.realmodels is not available here)") from None
    return str(prepared_model_path("smollm2-135m"))


def _packages(model: str, work: Path, modes) -> dict:
    from offsite.workflows.emulate import emulate
    from offsite.experiments.protocol import full_package

    packages = {}
    if {"full_ft", "full_lora"} & set(modes):
        whole = work / "emulator-full"
        whole = whole if (whole / "manifest.json").is_file() else full_package(model, work, "cpu")
        packages.update(dict.fromkeys({"full_ft", "full_lora"} & set(modes), whole))
    if {"emu_ft", "emu_lora"} & set(modes):
        emu = work / "emulator-uniform"
        if not (emu / "manifest.json").is_file():
            emulate(model, emu, method="uniform", adapter_layers="2,2", overwrite=True, device="cpu")
        packages.update(dict.fromkeys({"emu_ft", "emu_lora"} & set(modes), emu))
    return packages


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="HF folder (default: the prepared smollm2-135m fp32)")
    p.add_argument("--data-dir", default=os.environ.get("OFFSITE_SHARED", str(ROOT.parent / "shared")) + "/data")
    p.add_argument("--task", default="sciq")
    p.add_argument("--train-limit", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--modes", default="full_ft,emu_ft")
    p.add_argument("--configs", default="before,logits,after")
    p.add_argument("--threads", type=int, default=None, help="torch threads per run (default: torch's own)")
    p.add_argument("--work", default="runs/real_ft_cost")
    p.add_argument("--out", default="bench/results/real_ft_cost")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    from offsite.experiments.protocol import train_file

    model = args.model or _default_model()
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    modes = args.modes.split(",")
    data, _ = train_file(args.task, args.data_dir, work, args.train_limit)
    packages = _packages(model, work, modes)
    runs = []
    for mode in modes:
        for config in args.configs.split(","):
            spec = {"mode": mode, "config": config, "package": str(packages[mode]), "data": str(data),
                    "out": str(work / f"adapter-{mode}-{config}"), "batch": args.batch_size,
                    "warmup": args.warmup, "steps": args.steps, "threads": args.threads}
            done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                                  text=True)
            if done.returncode:
                raise SystemExit(f"{mode}/{config} failed:\n{done.stderr[-3000:]}")
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(runs[-1]), flush=True)
    record = {"model": "smollm2-135m (offsite models prepare, fp32)" if args.model is None else args.model,
              "task": args.task, "threads": args.threads,
              "train_limit": args.train_limit, "batch_size": args.batch_size, "warmup": args.warmup,
              "steps": args.steps, "runs": runs, "commit": _commit(), "cpus": os.cpu_count(),
              "command": "python bench/real_ft_cost.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    (out / "results.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "summary.md").write_text(render(record))
    print(render(record))
    return 0


def _commit() -> str | None:
    done = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() or None


def render(r: dict) -> str:
    """The table and the ratios the targets of issue 23 ask for."""
    by = {(x["mode"], x["config"]): x for x in r["runs"]}
    lines = [f"# Fine-tuning cost on {r['model']}, {r['task']}, batch {r['batch_size']}", "",
             f"`{r['command']}` (commit {r['commit']}, {r['cpus']} CPUs; median of {r['steps']} steps after "
             f"{r['warmup']} warmup)", "",
             "| run | config | logits | pass tokens | s/step wall | CPU s/step | peak RSS GiB | load at start | "
             "first losses |", "|---|---|---|---|---|---|---|---|---|"]
    for x in r["runs"]:
        lines.append(f"| {MODES[x['mode']]} | {x['config']} | {x['logits']} | {'auto' if x['pass_tokens'] is None else (x['pass_tokens'] or 'whole')} | "
                     f"{x['median_s']:.2f} | {x['median_cpu_s']:.2f} | {x['peak_rss_gib']:.2f} | "
                     f"{x['loadavg_start']} | {', '.join(f'{v:.4f}' for v in x['losses'][:3])} |")
    lines.append("")

    def ratios(a, b, what):
        return (f"- {what}: {a['median_s'] / b['median_s']:.2f}x less wall time per step, "
                f"{a['median_cpu_s'] / b['median_cpu_s']:.2f}x less CPU time per step, "
                f"{a['peak_rss_gib'] / b['peak_rss_gib']:.2f}x less peak RSS ({a['peak_rss_gib']:.2f} -> "
                f"{b['peak_rss_gib']:.2f} GiB)")

    for mode in MODES:
        for config in ("logits", "after"):
            if (mode, "before") in by and (mode, config) in by:
                lines.append(ratios(by[mode, "before"], by[mode, config], f"{mode}, {config} vs before"))
    for config in ("before", "after"):
        if ("full_ft", config) in by and ("emu_ft", config) in by:
            lines.append(ratios(by["full_ft", config], by["emu_ft", config], f"emulator FT vs full FT ({config})"))
    lines += ["", *targets(by)]
    return "\n".join(lines) + "\n"


def targets(by: dict) -> list:
    """Issue 23's targets, met or missed, on CPU time per step (the load-independent measure of work)."""
    out = ["Targets of issue 23 (time = CPU time per step):"]
    full_old, full_new, emu = by.get(("full_ft", "before")), by.get(("full_ft", "after")), by.get(("emu_ft", "after"))
    if full_new:
        gb = full_new["peak_rss_gib"] * GIB / 1e9
        out.append(f"- full FT peak RSS <= 3.5 GB: {gb:.2f} GB, {'met' if gb <= 3.5 else 'missed'}")
    if full_old and full_new:
        x = full_old["median_cpu_s"] / full_new["median_cpu_s"]
        out.append(f"- full FT >= 2x faster per step: {x:.2f}x, {'met' if x >= 2 else 'missed'}")
    if full_new and emu:
        t, m = full_new["median_cpu_s"] / emu["median_cpu_s"], full_new["peak_rss_gib"] / emu["peak_rss_gib"]
        out.append(f"- emulator FT >= 5x less time per step than full FT: {t:.2f}x, {'met' if t >= 5 else 'missed'}")
        out.append(f"- emulator FT >= 3x less peak memory than full FT: {m:.2f}x, {'met' if m >= 3 else 'missed'}")
    return out


def rerender(folder) -> None:
    """Rewrite ``summary.md`` from ``results.json`` in ``folder``."""
    record = json.loads((Path(folder) / "results.json").read_text())
    (Path(folder) / "summary.md").write_text(render(record))


if __name__ == "__main__":
    sys.exit(main())
