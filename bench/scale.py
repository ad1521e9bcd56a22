"""What an emulator build costs as models grow: wall time by phase and peak host memory.

Usage (from the repository root):
    .venv/bin/python bench/scale.py [--shapes opt-125m,llama-w512-12l,llama-w512-24l] [--methods uniform,gradot]
                                    [--windows 64] [--dtype float32] [--out bench/results/scale]

For each shape a random-weight model of the published config is written once (``bench/make_random_model.py``,
under ``runs/scale/``), then each method builds an emulator in a fresh process (``bench/measure_build.py``),
so its peak resident memory (``ru_maxrss``) is that build's alone; ``METHOD+stream`` builds with
``emulate --stream`` (decoder layers read from disk one at a time, :mod:`offsite.model.streaming`). Phases come from the build's own
timings: ``load`` / ``build`` / ``write`` (the ``[offsite] ... done in`` lines) and, for GradOT, the
calibration forward, the backward sweep (statistics, terms, SVD and compression, layer by layer) and
their sum ``stats_seconds`` from the plan; next to each GradOT build ``bench/gradot_floor.py`` times
the method's physical floor (one forward+backward of the full model over the calibration tokens
plus one SVD per middle attention matrix). ``import floor`` is the peak RSS of a process that imports
offsite and builds the shape's module tree on ``meta`` (no weights: what any run pays first); the
memory a build adds is ``peak - floor``. ``--max-shard-size`` / ``--spill-above`` pass through to
``emulate`` (a streamed build holds about two shards while it writes one).

Writes ``scale.json``, ``scale.md`` and ``scale.png`` (peak memory above the floor and wall time
against the model's bytes) under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = str(ROOT / ".venv" / "bin" / "python")
PHASE = re.compile(r"\[offsite\] (load|build|write)\b.*?done in ([0-9.]+)s")
BAR = re.compile(r"(calibration forward|backward sweep): 100%\|[^|]*\| \d+/\d+ \[(\d+):(\d+)")


def _floor(model: Path) -> float:
    """Peak RSS (MiB) of a process that imports offsite and builds ``model``'s module tree on ``meta``:
    everything an emulate run pays before it holds a single weight (the architecture's modeling code
    alone is over 100 MiB for Llama)."""
    code = ("import resource, sys, offsite.workflows.emulate, accelerate, transformers as t; "
            "c = t.AutoConfig.from_pretrained(sys.argv[1]); ctx = accelerate.init_empty_weights(); ctx.__enter__(); "
            "t.AutoModelForCausalLM.from_config(c); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    return float(subprocess.run([PY, "-c", code, str(model)], capture_output=True, text=True, check=True).stdout)


def _model(shape: str, dtype: str) -> Path:
    folder = ROOT / "runs" / "scale" / f"{shape}-{dtype}"
    if not (folder / "model" / "config.json").is_file():
        subprocess.run([PY, str(ROOT / "bench" / "make_random_model.py"), shape, str(folder), "--dtype", dtype],
                       check=True, stdout=subprocess.DEVNULL)
    return folder


def _build(folder: Path, method: str, windows: int, extra: list, stats_dtype=None, batch=None) -> dict:
    name, _, mode = method.partition("+")
    settings = {"uniform": [], "gradot": [f"num_sequences={windows}", "param_budget=0.4"]}[name]
    settings += [f"stats_dtype={stats_dtype}"] if stats_dtype and name == "gradot" else []
    settings += [f"batch_size={batch}"] if batch and name == "gradot" else []
    cmd = [PY, str(ROOT / "bench" / "measure_build.py"), str(folder / "model"), name, str(folder / f"emu-{method}"),
           "--calibration", str(folder / "public.txt"), "--set", *settings] + (["--stream"] if mode == "stream" else ["--no-stream"]) + extra
    run = subprocess.run(cmd, capture_output=True, text=True, check=True)
    record = json.loads(run.stdout.strip().splitlines()[-1])
    record["phases"] = {name: float(sec) for name, sec in PHASE.findall(run.stderr)}
    for name, minutes, seconds in BAR.findall(run.stderr):
        record["phases"][name] = int(minutes) * 60 + int(seconds)
    manifest = json.loads((folder / f"emu-{method}" / "manifest.json").read_text())
    build = manifest.get("run", {}).get("plan", {}).get("build") or {}
    if "stats_seconds" in build:
        record["phases"]["statistics+terms+compression"] = build["stats_seconds"]
    record["command"] = " ".join(["python", *[str(Path(c).relative_to(ROOT)) if str(c).startswith(str(ROOT)) else c
                                             for c in cmd[1:]]])
    return record


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="opt-125m,llama-w512-12l,llama-w512-24l")
    p.add_argument("--methods", default="uniform,uniform+stream,gradot,gradot+stream",
                   help="methods; METHOD+stream builds with emulate --stream")
    p.add_argument("--windows", type=int, default=64, help="GradOT calibration windows (x 128 tokens)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--max-shard-size", default=None, help="emulate --max-shard-size (default emulate's, 5GB)")
    p.add_argument("--spill-above", default=None, help="emulate --spill-above for +stream builds (default 2GB)")
    p.add_argument("--stats-dtype", default=None, help="GradOT stats_dtype (default the method's, float32)")
    p.add_argument("--calibration-batch", type=int, default=None,
                   help="GradOT calibration windows per forward/backward batch (default the method's, 8)")
    p.add_argument("--adapter-layers", default=None,
                   help="emulate --adapter-layers (default emulate's, 2,2); e.g. 11,11 on a 24-layer shape keeps two "
                        "middle layers: one GradOT layer's working set at a fraction of the time")
    p.add_argument("--out", default="bench/results/scale")
    p.add_argument("--no-floor", dest="floor", action="store_false",
                   help="skip bench/gradot_floor.py (one forward+backward + one SVD per matrix) next to GradOT builds")
    args = p.parse_args()
    started = time.time()
    rows, floors = [], {}
    for shape in args.shapes.split(","):
        folder = _model(shape, args.dtype)
        floor = floors[shape] = _floor(folder / "model")
        for method in args.methods.split(","):
            extra = (["--max-shard-size", args.max_shard_size] if args.max_shard_size else []) + \
                (["--spill-above", args.spill_above] if args.spill_above and method.endswith("+stream") else []) + \
                (["--adapter-layers", args.adapter_layers] if args.adapter_layers else [])
            row = {"shape": shape, "dtype": args.dtype, **_build(folder, method, args.windows, extra, args.stats_dtype,
                                                                 args.calibration_batch)}
            params = row["parameters"]["full"]
            row["model_bytes"] = params * {"float32": 4, "bfloat16": 2, "float16": 2}[args.dtype]
            row["import_floor_mb"] = round(floor, 1)
            row["added_mb"] = round(row["peak_rss_mb"] - floor, 1)
            row["added_over_model"] = round(row["added_mb"] * 2**20 / row["model_bytes"], 2)
            if args.floor and method.startswith("gradot"):
                floor_cmd = [PY, str(ROOT / "bench" / "gradot_floor.py"), str(folder / "model"), "--calibration",
                             str(folder / "public.txt"), "--windows", str(args.windows)]
                run = subprocess.run(floor_cmd, capture_output=True, text=True, check=True)
                row["floor"] = json.loads(run.stdout.strip().splitlines()[-1])
                row["over_floor"] = round(row["seconds"] / max(row["floor"]["floor_s"], 1e-9), 2)
            rows.append(row)
            print(json.dumps(row), flush=True)
    record = {"command": "python bench/scale.py " + " ".join(sys.argv[1:]), "import_floor_mb": floors,
              "threads": os.environ.get("OMP_NUM_THREADS"),
              "windows": args.windows, "rows": rows, "seconds": round(time.time() - started, 1)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "scale.md").write_text(render(record))
    plot(record, out / "scale.png")
    print(render(record))
    return 0


def render(r: dict) -> str:
    threads = r.get("threads") or "unset"
    lines = [f"# Emulator build cost by model size (CPU, OMP_NUM_THREADS {threads}, 2 cores shared with other jobs)", "",
             f"Produced by `{r['command']}` in {r['seconds']:.0f} s. Import floor (imports + the model's meta "
             f"skeleton, per shape): {', '.join(f'{k} {v:.0f}' for k, v in r['import_floor_mb'].items())} MiB; "
             f"GradOT: {r['windows']} calibration windows x 128 tokens, budget 0.4.", "",
             "| shape | method | params | model MiB | wall s | phases (s) | peak RSS MiB | above floor / model | "
             "GradOT floor s (fwd+bwd, SVD) | wall / floor |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        phases = ", ".join(f"{k} {v:g}" for k, v in row["phases"].items())
        lines.append(f"| {row['shape']} | {row['method']} | {row['parameters']['full']:,} | "
                     f"{row['model_bytes'] / 2**20:.0f} | {row['seconds']} | {phases} | {row['peak_rss_mb']:.0f} | "
                     f"{row['added_over_model']:.2f} | "
                     + (f"{row['floor']['floor_s']} ({row['floor']['forward_backward_s']}, {row['floor']['svd_s']}) | "
                        f"{row['over_floor']} |" if "floor" in row else "– | – |"))
    return "\n".join(lines) + "\n"


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for method in dict.fromkeys(row["method"] for row in r["rows"]):
        rows = sorted((row for row in r["rows"] if row["method"] == method), key=lambda x: x["model_bytes"])
        xs = [row["model_bytes"] / 2**20 for row in rows]
        axes[0].plot(xs, [row["added_mb"] for row in rows], marker="o", label=method)
        axes[1].plot(xs, [row["seconds"] for row in rows], marker="o", label=method)
    axes[0].plot(xs, xs, color="0.6", linestyle="dotted", label="= model bytes")
    axes[0].set(xlabel="model (MiB)", ylabel="peak RSS above import floor (MiB)")
    axes[1].set(xlabel="model (MiB)", ylabel="wall time (s)")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
