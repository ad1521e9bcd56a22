"""What scoring a full model costs with its layers on disk (``eval --stream``) against in memory.

Usage (from the repository root):
    .venv/bin/python bench/stream_eval.py [--shape llama-1.5gb-24l] [--dtype bfloat16] [--limit 32]
                                          [--batch-sizes 8,128] [--out bench/results/stream_eval]

The random-weight model of ``--shape`` (``bench/make_random_model.py``, under ``runs/scale/``, shared
with ``bench/scale.py``) is scored with ``offsite eval`` on its own multiple-choice task (first
``--limit`` validation questions, 4 choices each), once in memory and once with ``--stream`` per
batch size, each run in a fresh process so that its peak resident memory (``ru_maxrss``) is its
own. ``import floor`` is what a process holds after importing offsite and building the model's
module tree on ``meta`` (bench/scale.py's floor). The scores of every run must agree (checked:
a streamed run that scored differently would be a bug, not a cost). Every forward of a streamed
run reads the offloaded layers from the files (the page cache here: the model fits in it), so
time grows with the number of batches; larger batches amortise the reads.

Writes ``stream_eval.json`` and ``stream_eval.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from scale import PY, _floor, _model  # noqa: E402  (bench/ is not a package)

MEASURE = ("import json, resource, subprocess, sys, time; t = time.time(); "
           "r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
           "print(json.dumps({'rc': r.returncode, 'seconds': round(time.time() - t, 1), 'stderr': r.stderr[-2000:], "
           "'peak_mib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))")


def _eval(folder: Path, limit: int, batch: int, stream: bool, out: Path) -> dict:
    result = out / f"eval-b{batch}{'-stream' if stream else ''}.json"
    cmd = [PY, "-m", "offsite.cli", "eval", "--model", str(folder / "model"), "--tasks",
           str(folder / "task" / "{split}.jsonl"), "--limit", str(limit), "--batch-size", str(batch),
           "--device", "cpu", "--no-progress", "--out", str(result)] + (["--stream"] if stream else [])
    run = json.loads(subprocess.run([PY, "-c", MEASURE, *cmd], capture_output=True, text=True, check=True).stdout)
    if run["rc"]:
        raise SystemExit(f"offsite eval failed:\n{run['stderr']}")
    scored = json.loads(result.read_text())
    metrics = next(iter(scored["results"].values()))
    command = " ".join(["offsite", *[str(Path(c).relative_to(ROOT)) if str(c).startswith(str(ROOT)) else c
                                               for c in cmd[3:]]])
    return {"stream": stream, "batch_size": batch, "seconds": run["seconds"], "peak_mib": round(run["peak_mib"], 1),
            "acc": metrics["acc"], "acc_norm": metrics["acc_norm"], "n": metrics["n"], "command": command}


def render(r: dict) -> str:
    lines = [f"# eval --stream on {r['shape']} ({r['dtype']}, {r['model_mib']:.0f} MiB of weights)", "",
             f"{r['limit']} questions x 4 choices of the shape's own task; import floor {r['floor_mib']:.0f} MiB; "
             f"every run gave acc {r['runs'][0]['acc']:.4f}, acc_norm {r['runs'][0]['acc_norm']:.4f}.", "",
             "| mode | batch | wall (s) | peak RSS (MiB) | above floor / model bytes |",
             "|---|---|---|---|---|"]
    for run in r["runs"]:
        above = (run["peak_mib"] - r["floor_mib"]) / r["model_mib"]
        lines.append(f"| {'stream' if run['stream'] else 'in memory'} | {run['batch_size']} | {run['seconds']:.1f} | "
                     f"{run['peak_mib']:.0f} | {above:.2f} |")
    lines += ["", "Commands:", ""] + [f"    {run['command']}" for run in r["runs"]]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama-1.5gb-24l")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--limit", type=int, default=32)
    p.add_argument("--batch-sizes", default="8,128")
    p.add_argument("--modes", default="memory,stream",
                   help="which runs to make; rows of the other mode are kept from an earlier stream_eval.json of "
                        "the same shape, dtype and limit")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "stream_eval"))
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    folder = _model(args.shape, args.dtype)
    model_mib = sum(f.stat().st_size for f in (folder / "model").glob("*.safetensors")) / 2**20
    started = time.time()
    modes = {"memory": False, "stream": True}
    wanted = [modes[m] for m in args.modes.split(",")]
    earlier = json.loads((out / "stream_eval.json").read_text()) if (out / "stream_eval.json").is_file() else None
    same = earlier and (earlier["shape"], earlier["dtype"], earlier["limit"]) == (args.shape, args.dtype, args.limit)
    runs = []
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        for stream in (False, True):
            if stream not in wanted:
                runs += [r for r in (earlier["runs"] if same else []) if (r["stream"], r["batch_size"]) == (stream, batch)]
                continue
            runs.append(_eval(folder, args.limit, batch, stream, out))
            print(f"[stream_eval] batch {batch} {'stream' if stream else 'in memory'}: {runs[-1]['seconds']}s, "
                  f"{runs[-1]['peak_mib']:.0f} MiB ({time.time() - started:.0f}s)", file=sys.stderr)
    if len({(r["acc"], r["acc_norm"]) for r in runs}) != 1:
        raise SystemExit(f"the runs scored differently: {[(r['acc'], r['acc_norm']) for r in runs]}")
    result = {"shape": args.shape, "dtype": args.dtype, "limit": args.limit, "model_mib": round(model_mib, 1),
              "floor_mib": round(_floor(folder / "model"), 1), "runs": runs}
    (out / "stream_eval.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "stream_eval.md").write_text(render(result))
    for scored in out.glob("eval-*.json"):
        scored.unlink()  # per-run results: their numbers are in stream_eval.json
    print(render(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
