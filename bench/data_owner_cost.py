"""What fine-tuning costs the data owner: adapter FT on the emulator against full FT of the full model.

Usage (from the repository root):
    OMP_NUM_THREADS=2 .venv/bin/python bench/data_owner_cost.py [--shapes opt-125m,opt-1.3b]
        [--modes ot,ot_lora,ft,ft_lora,full_adapter,full_adapter_lora] [--batch-size 1] [--block-size 512]
        [--warmup 1] [--steps 3] [--device cpu] [--precision fp32] [--max-gb 14]
        [--work runs/data_owner_cost] [--out bench/results/data_owner_cost]

Why: Offsite-Tuning's cost claim (Xiao et al. 2023, abstract: "6.5x speedup and 5.6x memory
reduction" against full fine-tuning) is about the data owner, who trains the adapter against the
small emulator instead of the whole model. This measures the same comparison with offsite's own
training loop, on random weights of the published OPT shapes (random weights cost exactly what
trained ones do: same tensors, same FLOPs, same memory).

For each shape a random-weight fp32 model (safetensors, a small byte-level BPE tokenizer and a text
file) is written once under ``--work``; then ``offsite emulate`` builds two packages with the real
workflow: the OT emulator (``--method uniform --adapter-layers 2,2 --emulator-layers K``: 2-8-2 for
OPT-1.3B as in the paper, keeping layers 2,5,7,10,13,16,18,21; 2-3-2 for OPT-125m, about the same
40 % of the middle) and the *full* package
(the same adapter, every middle layer kept: ``--emulator-layers M --allow-verbatim-middle``), which
is the full model with the adapter layers marked. Each mode then trains in a fresh process:

* ``ot``: emulator, full adapter FT (``offsite.workflows.finetune.finetune``, i.e. ``offsite finetune``);
* ``ot_lora``: emulator, LoRA on the adapter layers (``finetune(lora=True)``);
* ``ft``: full model, every parameter (embeddings and head included) with AdamW: the loop of
  ``finetune`` (:func:`offsite.training.loop.train`) called directly with
  ``select(scope="emulator")``, as ``offsite audit``'s attacks do (``finetune`` itself only ever
  trains the adapter layers);
* ``ft_lora``: full model, LoRA on every decoder layer (the paper's "FT + LoRA"; same direct call);
* ``full_adapter_lora``: full model, LoRA on the same adapter layers (``finetune(lora=True)`` on the
  full package): what the emulator saves at equal trainable parameters;
* ``full_adapter``: full model, full FT of the same adapter layers (what the emulator alone saves).

Every mode uses the same batch, block size, steps, learning rate and precision; validation is off
(``val_fraction=0``) and no checkpoint is due (``save_every`` beyond the run), so a step is one
forward, backward, clip and AdamW step. The first ``--warmup`` steps are not timed. Step times come
from a global optimizer post-step hook (``torch.cuda.synchronize`` first on CUDA), each from the end
of the step before; the headline is the median timed step (robust to other jobs on a shared CPU),
tokens/s is batch x block / that median. Peak memory is the child's ``VmHWM`` (peak resident set,
``/proc/self/status``) read at the end of the last step, so it covers loading and training but not
writing the adapter artifact; on CUDA also ``torch.cuda.max_memory_allocated`` (reset after loading:
the weights and the training steps), which the ratios then use.

Memory safety: before a mode starts its memory is estimated (weights + gradients and AdamW states
of what trains + a rough activation and logits term + the import floor, see :func:`estimate`); a
mode whose estimate exceeds ``--max-gb`` GiB (or what the machine has available now) is not run,
and the record says so with the estimate. Where full FT is not run, the summary compares with its
estimated memory and an estimated step time (1.5 x the measured LoRA-on-every-layer step, the FLOP
ratio of full to frozen-weight backward), each labelled as such and checked against the measured
ratio at the smaller shape.

Writes ``results.json``, ``summary.md`` and ``cost.png`` under ``--out``; ``--render-only`` rewrites
the last two from an existing ``results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = str(ROOT / ".venv" / "bin" / "python")
OFFSITE = str(ROOT / ".venv" / "bin" / "offsite")
GIB = 2 ** 30

# Published configs (facebook/opt-125m, facebook/opt-1.3b): pre-LN, ReLU, ffn = 4 x hidden, tied head.
COMMON = dict(vocab_size=50272, max_position_embeddings=2048, do_layer_norm_before=True, dropout=0.1,
              attention_dropout=0.0, activation_function="relu", enable_bias=True)
SHAPES = {
    "opt-125m": dict(hidden_size=768, ffn_dim=3072, num_hidden_layers=12, num_attention_heads=12,
                     word_embed_proj_dim=768),
    "opt-1.3b": dict(hidden_size=2048, ffn_dim=8192, num_hidden_layers=24, num_attention_heads=32,
                     word_embed_proj_dim=2048),
}
ADAPTER = (2, 2)
KEPT = {"opt-125m": 3, "opt-1.3b": 8}
"""Middle layers the OT emulator keeps: OPT-1.3B's 2-8-2 is the paper's (8 of 20, 40 %); for
OPT-125m 40 % of its 8 middle layers rounds to 3 (2-3-2, the split of the issue's first look)."""

MODES = {
    "ot": dict(package="emulator", scope="adapter", lora=False, label="OT: emulator, adapter FT"),
    "ot_lora": dict(package="emulator", scope="adapter", lora=True, label="OT + LoRA: emulator, LoRA on adapter"),
    "ft": dict(package="full", scope="emulator", lora=False, label="FT: full model, all parameters"),
    "ft_lora": dict(package="full", scope="emulator", lora=True, label="FT + LoRA: full model, LoRA on every layer"),
    "full_adapter": dict(package="full", scope="adapter", lora=False, label="full model, adapter FT"),
    "full_adapter_lora": dict(package="full", scope="adapter", lora=True, label="full model, LoRA on adapter"),
}
DEFAULT_MODES = "ot,ot_lora,ft,ft_lora,full_adapter,full_adapter_lora"

# Offsite-Tuning, Table 6 (../shared/research/papers.md section 2.6): one GPU, batch 1, block 512,
# WikiText; units not printed (likely tokens/s and MB).
PAPER = {"OPT-1.3B": {"ft": (1316, 30458), "ft_lora": (3379, 12470), "ot": (5207, 9336), "ot_lora": (8525, 6192)},
         "GPT2-XL": {"ft": (957, 39922), "ft_lora": (1992, 17113), "ot": (4905, 8966), "ot_lora": (6257, 7155)}}
WORDS = ("the river town baker sells bread every morning while the old teacher walks her dog past the "
         "market and a red boat waits near the bridge for the fishermen who sing").split()


# ----------------------------------------------------------------------------------------------
# sizes and the memory estimate


def counts(shape: str, lora_r: int) -> dict:
    """Parameter counts of an OPT shape: per decoder layer, outside the layers, LoRA per layer."""
    cfg = {**COMMON, **SHAPES[shape]}
    h, f, n = cfg["hidden_size"], cfg["ffn_dim"], cfg["num_hidden_layers"]
    layer = 4 * (h * h + h) + 2 * 2 * h + (h * f + f) + (f * h + h)  # q,k,v,out + 2 LayerNorms + fc1 + fc2
    outside = cfg["vocab_size"] * h + (cfg["max_position_embeddings"] + 2) * h + 2 * h  # tied head
    lora = lora_r * (4 * 2 * h + 2 * (h + f))  # r x (in + out) for q,k,v,out_proj, fc1, fc2
    return {"layer": layer, "outside": outside, "lora_layer": lora, "layers": n, "hidden": h, "ffn": f,
            "heads": cfg["num_attention_heads"], "vocab": cfg["vocab_size"], "total": outside + n * layer}


def package_layers(shape: str, mode: str) -> int:
    """Decoder layers of the package a mode trains on."""
    n = SHAPES[shape]["num_hidden_layers"]
    return sum(ADAPTER) + KEPT[shape] if MODES[mode]["package"] == "emulator" else n


def trainable(shape: str, mode: str, lora_r: int) -> int:
    """Parameters the mode trains (what AdamW holds states for)."""
    c, m = counts(shape, lora_r), MODES[mode]
    layers = package_layers(shape, mode) if m["scope"] == "emulator" else sum(ADAPTER)
    if m["lora"]:
        return layers * c["lora_layer"]
    return c["outside"] + layers * c["layer"] if m["scope"] == "emulator" else layers * c["layer"]


def estimate(shape: str, mode: str, batch: int, block: int, lora_r: int, floor_gib: float, device: str) -> dict:
    """Rough peak memory of one mode, in GiB, by term (fp32 weights and activations).

    * weights: 4 bytes per parameter of the package;
    * trained: gradient + AdamW's two moments, 12 bytes per trained parameter (+4 on CUDA, where
      AdamW's foreach path holds a temporary of the same size);
    * activations: Korthikanti et al.'s per-layer count for a 4h MLP, doubled for fp32
      (68 h + 10 a s bytes per token), for every layer the backward pass crosses; here layer 0
      always trains, so every layer of the package (an upper-ish bound for frozen layers, which
      keep fewer tensors);
    * logits: 4 copies of batch x block x vocab fp32 (logits, log-softmax, their gradients);
    * floor: the measured import floor of a process that loads offsite, torch and transformers.
    """
    c = counts(shape, lora_r)
    layers = package_layers(shape, mode)
    weights = 4 * (c["outside"] + layers * c["layer"])
    n_train = trainable(shape, mode, lora_r)
    states = (16 if device.startswith("cuda") else 12) * n_train
    tokens = batch * block
    act = layers * tokens * (68 * c["hidden"] + 10 * c["heads"] * block)
    logits = 4 * tokens * c["vocab"] * 4
    host_floor = floor_gib * GIB if not device.startswith("cuda") else 0
    terms = {"weights": weights, "trained_states": states, "activations": act, "logits": logits, "floor": host_floor}
    return {"terms_gib": {k: round(v / GIB, 2) for k, v in terms.items()},
            "total_gib": round(sum(terms.values()) / GIB, 2), "trainable": n_train}


def _meminfo_gib(key: str) -> float | None:
    """``/proc/meminfo``'s ``key`` (MemTotal, MemAvailable) in GiB, or None off Linux."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 2 ** 20
    except OSError:
        pass
    return None


def _total_gib() -> float | None:
    total = _meminfo_gib("MemTotal")
    return None if total is None else round(total, 1)


def _available_gib() -> float | None:
    return _meminfo_gib("MemAvailable")


# ----------------------------------------------------------------------------------------------
# child processes: write a random model, train one mode


def make_model(shape: str, folder: Path, seed: int = 0) -> dict:
    """A random-weight fp32 OPT of ``shape`` in ``folder/model`` (safetensors + tokenizer) and ``folder/train.txt``."""
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    rng = random.Random(seed)
    text = "\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 20))) + "." for _ in range(8000))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.txt").write_text(text + "\n")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from make_random_model import byte_bpe_tokenizer

    tokenizer = byte_bpe_tokenizer(text)
    torch.manual_seed(seed)
    model = OPTForCausalLM(OPTConfig(**COMMON, **SHAPES[shape]))  # fp32, the published shape
    model.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    return {"shape": shape, "parameters": sum(p.numel() for p in model.parameters())}


def _vmhwm_bytes() -> int:
    """Peak resident set of this process so far (VmHWM; ru_maxrss where /proc is absent)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def train_one(spec: dict) -> dict:
    """Train one mode for warmup + steps optimizer steps and return its timings and peaks."""
    import torch
    import torch.optim.optimizer as optim_hooks

    torch.set_num_threads(spec["threads"])
    import offsite.workflows.finetune as ft
    from offsite.training import loop

    mode = MODES[spec["mode"]]
    cuda = spec["device"].startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    marks = {"start": None, "ends": [], "hwm": None, "hwm_load": None, "cuda_peak": None, "trainable": None}
    launched = time.perf_counter()

    real_call = loop.Batcher.__call__

    def first_batch(self, index):
        if marks["start"] is None:
            sync()
            marks["start"] = time.perf_counter()
            marks["hwm_load"] = _vmhwm_bytes()
            if cuda:
                torch.cuda.reset_peak_memory_stats()  # loading is not training; the weights stay allocated
        return real_call(self, index)

    def after_step(optimizer, args, kwargs):
        sync()
        marks["ends"].append(time.perf_counter())
        marks["hwm"] = _vmhwm_bytes()
        if cuda:
            marks["cuda_peak"] = torch.cuda.max_memory_allocated()
        if marks["trainable"] is None:
            marks["trainable"] = sum(p.numel() for g in optimizer.param_groups for p in g["params"])

    loop.Batcher.__call__ = first_batch
    optim_hooks.register_optimizer_step_post_hook(after_step)
    settings = dict(format="text", block_size=spec["block"], batch_size=spec["batch"],
                    max_steps=spec["warmup"] + spec["steps"], val_fraction=0.0, save_every=10 ** 9, lr=1e-4,
                    lora=mode["lora"], lora_r=spec["lora_r"], precision=spec["precision"], device=spec["device"],
                    progress=False, seed=0)
    attn = None
    if mode["scope"] == "adapter":  # the data owner's command, unchanged
        out = ft.finetune(spec["package"], spec["data"], spec["out"], overwrite=True, resume=False, **settings)
        path = "offsite.workflows.finetune.finetune"
        log = json.loads((Path(out) / "training_log.json").read_text())
        losses = [row["loss"] for row in log.get("train", [])]
    else:  # every weight (or LoRA on every layer): the same loop, as offsite audit's attacks call it
        from offsite.core.device import resolve_device
        from offsite.emulator.package import load_emulator
        from offsite.core.precision import base_dtype
        from offsite.core.precision import policy as precision_policy

        cfg = ft.make_config(settings)
        device = resolve_device(cfg.device)
        torch.manual_seed(cfg.seed)
        emu = load_emulator(spec["package"], device=device)
        precision = precision_policy(cfg.precision, base_dtype(emu.model), device)
        params, _, _ = loop.select(emu, cfg, precision, "emulator")
        run = loop.prepare(emu, spec["data"], cfg)
        state = loop.train(emu.model, params, precision, run, cfg, device)
        path = "offsite.training.loop.train (select scope 'emulator')"
        losses = [row["loss"] for row in state.log["train"]]
        attn = getattr(emu.model.config, "_attn_implementation", None)
    steps = [marks["ends"][0] - marks["start"]] + [b - a for a, b in zip(marks["ends"], marks["ends"][1:])]
    timed = sorted(steps[spec["warmup"]:])
    median = timed[len(timed) // 2] if len(timed) % 2 else (timed[len(timed) // 2 - 1] + timed[len(timed) // 2]) / 2
    tokens = spec["batch"] * spec["block"]
    return {"mode": spec["mode"], "path": path, "trainable": marks["trainable"],
            "step_seconds": [round(s, 3) for s in steps], "timed_median_s": round(median, 3),
            "timed_mean_s": round(sum(timed) / len(timed), 3),
            "timed_min_s": round(min(timed), 3), "timed_max_s": round(max(timed), 3),
            "steps_per_s": round(1 / median, 4), "tokens_per_step": tokens, "tokens_per_s": round(tokens / median, 1),
            "load_seconds": round(marks["start"] - launched, 1),
            "peak_rss_gib": round(marks["hwm"] / GIB, 3), "peak_rss_load_gib": round(marks["hwm_load"] / GIB, 3),
            "peak_rss_exit_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB, 3),
            "cuda_peak_gib": None if marks["cuda_peak"] is None else round(marks["cuda_peak"] / GIB, 3),
            "losses": losses, "attn_implementation": attn, "threads": torch.get_num_threads(),
            "torch": torch.__version__}


# ----------------------------------------------------------------------------------------------
# the parent: models, packages, one process per mode


def _rel(path) -> str:
    path = Path(path)
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def _floor_gib() -> float:
    code = ("import resource, torch, transformers, offsite, offsite.workflows.finetune, offsite.emulator.package; "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)")
    return float(subprocess.run([PY, "-c", code], capture_output=True, text=True, check=True).stdout)


def _package(model: Path, out: Path, kept: int, verbatim: bool, device: str) -> dict:
    """Build (or reuse) one package with ``offsite emulate``; returns its parameter counts."""
    manifest = out / "manifest.json"
    if manifest.is_file():
        record = json.loads(manifest.read_text())
        if len(record["split"]["adapter"]) == sum(ADAPTER) and record["plan"].get("emulator_layers") == kept:
            return {"parameters": record["parameters"], "built": "reused"}
    cmd = [OFFSITE, "emulate", "--model", str(model), "--method", "uniform", "--adapter-layers",
           f"{ADAPTER[0]},{ADAPTER[1]}", "--emulator-layers", str(kept), "--dtype", "float32", "--device", device,
           "--out", str(out), "--overwrite"] + (["--allow-verbatim-middle"] if verbatim else [])
    started = time.time()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    record = json.loads(manifest.read_text())
    return {"parameters": record["parameters"], "built": round(time.time() - started, 1),
            "command": " ".join(["offsite", *[_rel(c) if c.startswith(str(ROOT)) else c for c in cmd[1:]]])}


STOP_BELOW_GIB = 1.0
"""The watchdog ends a child when the machine's available memory falls below this (an estimate can be wrong)."""


def _watched(cmd: list, env: dict) -> subprocess.CompletedProcess:
    """Run ``cmd``, ending it (by its own pid) if the machine's available memory runs low."""
    import tempfile

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        child = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env)
        killed = None
        while child.poll() is None:
            avail = _available_gib()
            if avail is not None and avail < STOP_BELOW_GIB:
                child.kill()
                killed = f"ended by the watchdog: {avail:.2f} GiB available"
                child.wait()
                break
            time.sleep(0.5)
        out.seek(0), err.seek(0)
        stderr = err.read() + (f"\n{killed}" if killed else "")
        return subprocess.CompletedProcess(cmd, child.returncode, out.read(), stderr)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="opt-125m,opt-1.3b")
    p.add_argument("--modes", default=DEFAULT_MODES, help=f"of {', '.join(MODES)}")
    p.add_argument("--batch-size", type=int, default=1, help="sequences per step (the paper's script: 1)")
    p.add_argument("--block-size", type=int, default=512, help="tokens per sequence (the paper's script: 512)")
    p.add_argument("--warmup", type=int, default=1, help="first steps, not timed")
    p.add_argument("--steps", type=int, default=3, help="timed steps after the warmup")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--precision", default="fp32", help="finetune's --precision (fp32 | auto | bf16 | fp16)")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS") or 2))
    p.add_argument("--max-gb", type=float, default=14.0,
                   help="skip a mode whose estimated peak (GiB; host RAM on CPU, GPU memory on CUDA) exceeds this")
    p.add_argument("--work", default="runs/data_owner_cost", help="models, packages and adapters (not committed)")
    p.add_argument("--out", default="bench/results/data_owner_cost")
    p.add_argument("--render-only", action="store_true", help="rewrite summary.md and cost.png from results.json")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--make", nargs=2, default=None, metavar=("SHAPE", "FOLDER"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(train_one(json.loads(args.child))), flush=True)
        return 0
    if args.make:
        print(json.dumps(make_model(args.make[0], Path(args.make[1]))), flush=True)
        return 0

    if args.render_only:
        record = json.loads((Path(args.out) / "results.json").read_text())
        derive(record)
        (Path(args.out) / "results.json").write_text(json.dumps(record, indent=1) + "\n")
        (Path(args.out) / "summary.md").write_text(render(record))
        plot(record, Path(args.out) / "cost.png")
        print(render(record))
        return 0
    shapes, modes = args.shapes.split(","), args.modes.split(",")
    for name in modes:
        if name not in MODES:
            p.error(f"unknown mode {name!r}; known: {', '.join(MODES)}")
    for name in shapes:
        if name not in SHAPES:
            p.error(f"unknown shape {name!r}; known: {', '.join(SHAPES)}")
    if args.device.startswith("cuda"):  # refused before minutes of model writing
        probe = subprocess.run([PY, "-c", "import torch; print(torch.cuda.is_available())"], capture_output=True,
                               text=True)
        if probe.stdout.strip() != "True":
            p.error(f"--device {args.device}: torch sees no CUDA device here")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "TOKENIZERS_PARALLELISM": "false"}
    started = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    floor = _floor_gib()
    command = f"OMP_NUM_THREADS={args.threads} python bench/data_owner_cost.py {' '.join(sys.argv[1:])}".strip()
    record = {"command": command,
              "settings": {"batch_size": args.batch_size, "block_size": args.block_size, "warmup": args.warmup,
                           "steps": args.steps, "lora_r": args.lora_r, "device": args.device,
                           "precision": args.precision, "threads": args.threads, "max_gb": args.max_gb,
                           "adapter": "%d,%d" % ADAPTER, "lr": 1e-4},
              "import_floor_gib": round(floor, 3), "cpus": os.cpu_count(), "mem_total_gib": _total_gib(),
              "shapes": {}, "paper": PAPER}
    for shape in shapes:
        folder = Path(args.work) / shape
        c = counts(shape, args.lora_r)
        entry = record["shapes"][shape] = {"parameters": c["total"], "layers": c["layers"],
                                           "split": f"{ADAPTER[0]}-{KEPT[shape]}-{ADAPTER[1]}", "rows": []}
        if not (folder / "model" / "config.json").is_file():
            t0 = time.time()
            subprocess.run([PY, __file__, "--make", shape, str(folder)], check=True, env=env, stdout=subprocess.DEVNULL)
            print(f"[{shape}] random model written in {time.time() - t0:.0f}s", flush=True)
        packages = {"emulator": folder / "emulator", "full": folder / "full"}
        middle = c["layers"] - sum(ADAPTER)
        entry["packages"] = {}
        for kind in dict.fromkeys(MODES[m]["package"] for m in modes):
            entry["packages"][kind] = _package(folder / "model", packages[kind],
                                               KEPT[shape] if kind == "emulator" else middle, kind == "full", "cpu")
            print(f"[{shape}] package {kind}: {entry['packages'][kind]}", flush=True)
        for mode in modes:
            est = estimate(shape, mode, args.batch_size, args.block_size, args.lora_r, floor, args.device)
            row = {"mode": mode, "label": MODES[mode]["label"], "estimate": est}
            avail = _available_gib() if not args.device.startswith("cuda") else None
            if est["total_gib"] > args.max_gb:
                row["skipped"] = f"not run: estimated {est['total_gib']:.1f} GiB > limit {args.max_gb:g} GiB"
            elif avail is not None and est["total_gib"] > avail - 1.5:
                row["skipped"] = (f"not run: estimated {est['total_gib']:.1f} GiB > {avail:.1f} GiB available "
                                  "now less 1.5 GiB")
            if "skipped" in row:
                print(f"[{shape}] {mode}: {row['skipped']}", flush=True)
                entry["rows"].append(row)
                continue
            spec = {"mode": mode, "package": str(packages[MODES[mode]["package"]]), "data": str(folder / "train.txt"),
                    "out": str(folder / "adapters" / mode), "batch": args.batch_size, "block": args.block_size,
                    "warmup": args.warmup, "steps": args.steps, "lora_r": args.lora_r, "device": args.device,
                    "precision": args.precision, "threads": args.threads}
            row["load_before"] = os.getloadavg()[0]
            t0 = time.time()
            run = _watched([PY, __file__, "--child", json.dumps(spec)], env)
            row["wall_seconds"] = round(time.time() - t0, 1)
            row["load_after"] = os.getloadavg()[0]
            lines = [ln for ln in run.stdout.splitlines() if ln.startswith("RESULT ")]
            if run.returncode != 0 or not lines:
                row["failed"] = f"exit {run.returncode}: " + (run.stderr.strip().splitlines() or ["?"])[-1]
                print(f"[{shape}] {mode}: FAILED {row['failed']}\n{run.stderr[-3000:]}", flush=True)
            else:
                row.update(json.loads(lines[-1][len("RESULT "):]))
                print(f"[{shape}] {mode}: {row['timed_median_s']} s/step, {row['tokens_per_s']} tok/s, "
                      f"peak RSS {row['peak_rss_gib']} GiB (est. {est['total_gib']}), {row['wall_seconds']}s",
                      flush=True)
            shutil.rmtree(folder / "adapters" / mode, ignore_errors=True)
            entry["rows"].append(row)
            record["seconds"] = round(time.time() - started, 1)
            (out / "results.json").write_text(json.dumps(record, indent=1) + "\n")  # partial results survive
    record["seconds"] = round(time.time() - started, 1)
    derive(record)
    (out / "results.json").write_text(json.dumps(record, indent=1) + "\n")
    (out / "summary.md").write_text(render(record))
    plot(record, out / "cost.png")
    print(render(record))
    return 0


# ----------------------------------------------------------------------------------------------
# ratios, the summary and the figure


def _ran(row: dict) -> bool:
    return "timed_median_s" in row


def flops_per_token(shape: str, mode: str, block: int, lora_r: int) -> float:
    """Matmul FLOPs of one training token of a mode (a compute-bound device's cost, no contention).

    Forward: every decoder layer of the package (``2 x`` its matmul weights plus ``4 s h`` of
    attention scores and mixing) and the vocabulary head (``2 V h``); backward: the same again for the
    activation gradients (layer 0 always trains, so every layer is crossed), plus ``2 x`` the trained
    matmul weights for their gradients (the head too under full FT). LoRA's own FLOPs (under 1 %),
    the optimizer and element-wise work are left out.
    """
    c = counts(shape, lora_r)
    h, V = c["hidden"], c["vocab"]
    mm = 4 * h * h + 2 * h * c["ffn"]
    layers = package_layers(shape, mode)
    forward = layers * (2 * mm + 4 * block * h) + 2 * V * h
    m = MODES[mode]
    if m["lora"]:
        weight_grads = 0
    elif m["scope"] == "emulator":
        weight_grads = layers * 2 * mm + 2 * V * h
    else:
        weight_grads = sum(ADAPTER) * 2 * mm
    return 2 * forward + weight_grads


def _memory(row: dict, cuda: bool) -> float:
    return row["cuda_peak_gib"] if cuda and row.get("cuda_peak_gib") else row["peak_rss_gib"]


def derive(record: dict) -> None:
    """Speedups and memory ratios of every row against full FT of its shape, measured or estimated.

    Without a measured FT row, FT's step time is estimated as 1.5 x the measured FT + LoRA step
    (full FT adds the weight-gradient matmuls, half again the forward + input-gradient backward),
    and its memory by :func:`estimate`; ``ft_basis`` says which was used. Where both ran,
    ``ft_time_model_check`` is measured FT time / that estimate and ``ft_memory_model_check`` measured
    FT memory / its estimate. ``flop_speedup_vs_ft`` is :func:`flops_per_token`'s ratio (every row).
    """
    s = record["settings"]
    cuda = s["device"].startswith("cuda")
    for shape, entry in record["shapes"].items():
        rows = {r["mode"]: r for r in entry["rows"]}
        ft, lora = rows.get("ft"), rows.get("ft_lora")
        basis, ft_time, ft_fast, ft_mem = None, None, None, None
        if ft is not None and _ran(ft):
            basis, ft_time, ft_fast, ft_mem = "measured", ft["timed_median_s"], ft["timed_min_s"], _memory(ft, cuda)
            entry["ft_memory_model_check"] = round(ft["peak_rss_gib"] / ft["estimate"]["total_gib"], 2)
            if lora is not None and _ran(lora):
                entry["ft_time_model_check"] = round(ft_time / (1.5 * lora["timed_median_s"]), 2)
        elif ft is not None:
            basis, ft_mem = "estimated", ft["estimate"]["total_gib"]
            if lora is not None and _ran(lora):
                ft_time, ft_fast = 1.5 * lora["timed_median_s"], 1.5 * lora["timed_min_s"]
                ft["estimated_s_per_step"] = round(ft_time, 2)
                ft["estimated_fastest_s_per_step"] = round(ft_fast, 2)
        entry["ft_basis"] = basis
        ft_flops = flops_per_token(shape, "ft", s["block_size"], s["lora_r"])
        for row in entry["rows"]:
            row["flops_per_token"] = flops_per_token(shape, row["mode"], s["block_size"], s["lora_r"])
            row["flop_speedup_vs_ft"] = round(ft_flops / row["flops_per_token"], 2)
            if basis is None or not _ran(row):
                continue
            row["speedup_vs_ft"] = None if ft_time is None else round(ft_time / row["timed_median_s"], 2)
            row["speedup_vs_ft_fastest"] = None if ft_fast is None else round(ft_fast / row["timed_min_s"], 2)
            row["memory_ratio_vs_ft"] = round(ft_mem / _memory(row, cuda), 2)
            row["estimate_check"] = round(row["peak_rss_gib"] / row["estimate"]["total_gib"], 2)


def _fmt_params(n) -> str:
    return "–" if n is None else (f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M")


def _x(value, tag: str = "") -> str:
    return "–" if value is None else f"{value:.2f}x{tag}"


def render(r: dict) -> str:
    s = r["settings"]
    cuda = s["device"].startswith("cuda")
    mem_name = "CUDA peak allocated" if cuda else "peak RSS"
    lines = [f"# Data-owner cost: adapter FT on the emulator vs full FT ({s['device']})", "",
             f"Produced by `{r['command']}` in {r.get('seconds', 0):.0f} s "
             "(a fresh process per row; models and packages under `--work`, not committed; "
             "`python bench/data_owner_cost.py --render-only` rewrites this file and `cost.png` from `results.json`).",
             "",
             f"Setting: random-weight fp32 OPT models of the published shapes, adapter = first {ADAPTER[0]} + last "
             f"{ADAPTER[1]} decoder layers, emulator by `offsite emulate --method uniform`; batch {s['batch_size']} x "
             f"block {s['block_size']} tokens (the OT paper's cost script: 1 x 512), AdamW lr {s['lr']}, precision "
             f"{s['precision']}, LoRA r {s['lora_r']} on every linear of the chosen layers, {s['warmup']} warmup step "
             f"not timed + {s['steps']} timed steps (headline: the median), {s['threads']} threads. OT rows run "
             "`offsite.workflows.finetune.finetune` on the emulator package; `ft` and `ft_lora` call its loop "
             "(`offsite.training.loop.train`) on the full package with `select(scope=\"emulator\")` (every weight, "
             "embeddings and head included; or LoRA on every layer); `full_adapter*` run `finetune` on the full "
             f"package. The {mem_name} is "
             + ("`torch.cuda.max_memory_allocated` over the training steps (weights included, reset after loading)"
                if cuda else "the child process's high-water mark at the end of its last step (loading + training, "
                "not the adapter write)")
             + f"; the import floor alone is {r['import_floor_gib']:.2f} GiB of host memory. "
             "Estimates (GiB, in brackets) are the pre-launch guard's: weights + 12 B per trained parameter + "
             "activations + logits + floor; a mode above `--max-gb` is not run. The FLOP-model speedup is matmul "
             "FLOPs per token of FT / of the mode (a compute-bound device without contention). "
             + ("" if cuda else f"CPU timings on a {r['cpus']}-core machine shared with other jobs: upper bounds "
                "under contention, and the contention changed during the run (the last column: 1-minute load "
                "average before → after the row)."), ""]
    for shape, entry in r["shapes"].items():
        basis = entry.get("ft_basis")
        tag = "" if basis == "measured" else " (vs est.)"
        lines += [f"## {shape} ({entry['parameters'] / 1e6:.0f}M parameters, {entry['layers']} layers, "
                  f"OT split {entry['split']})", "",
                  "| mode | trains | trainable | s/step: median (min–max) | tokens/s | speedup vs FT: median "
                  f"(fastest step) | FLOP-model speedup | {mem_name} GiB (estimate) | memory ratio FT / mode | load |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for row in entry["rows"]:
            label, flop = row["label"], _x(row.get("flop_speedup_vs_ft"))
            if not _ran(row):
                why = row.get("skipped") or row.get("failed", "not run")
                est_t = row.get("estimated_s_per_step")
                t = f"est. {est_t:.1f} (1.5 x FT + LoRA)" if est_t else "–"
                tps = f"est. {s['batch_size'] * s['block_size'] / est_t:.1f}" if est_t else "–"
                ref = "1 (reference)" if row["mode"] == "ft" else "–"
                lines.append(f"| {row['mode']} | {label} | {_fmt_params(row['estimate']['trainable'])} | {t} | {tps} | "
                             f"{ref} | {flop} | **{why}** ({row['estimate']['total_gib']:.1f}) | {ref} | – |")
                continue
            speed = f"{_x(row.get('speedup_vs_ft'), tag)} ({_x(row.get('speedup_vs_ft_fastest'))})"
            lines.append(f"| {row['mode']} | {label} | {_fmt_params(row['trainable'])} | {row['timed_median_s']:.2f} "
                         f"({row['timed_min_s']:.2f}–{row['timed_max_s']:.2f}) | {row['tokens_per_s']:.1f} | "
                         f"{speed} | "
                         f"{flop} | {_memory(row, cuda):.2f} ({row['estimate']['total_gib']:.1f}) | "
                         f"{_x(row.get('memory_ratio_vs_ft'), tag)} | {row['load_before']:.1f} → "
                         f"{row['load_after']:.1f} |")
        checks = []
        if "ft_time_model_check" in entry:
            checks.append(f"measured FT step / (1.5 x FT + LoRA step) = {entry['ft_time_model_check']:.2f}")
        if "ft_memory_model_check" in entry:
            checks.append(f"measured / estimated FT memory = {entry['ft_memory_model_check']:.2f}")
        if checks:
            lines += ["", f"Checks of the FT models at this shape: {'; '.join(checks)} (per row: `estimate_check` in "
                          "results.json)."]
        lines.append("")
    lines += _paper_section(r)
    return "\n".join(lines) + "\n"


def _paper_section(r: dict) -> list:
    p13 = PAPER["OPT-1.3B"]
    ratio = {m: (p13[m][0] / p13["ft"][0], p13["ft"][1] / p13[m][1]) for m in p13}
    lines = ["## Against the Offsite-Tuning paper", "",
             "The paper's abstract claims a 6.5x speedup and a 5.6x memory reduction against full fine-tuning. "
             "Its cost table (one GPU, batch 1, block 512, WikiText; units not printed, likely tokens/s and MB; "
             "`../shared/research/papers.md` section 2.6) gives the 6.5x for OPT-1.3B with **OT + LoRA** "
             "(8525 / 1316 = 6.48) and the 5.6x for **GPT2-XL** OT + LoRA (39922 / 7155 = 5.58); for OPT-1.3B the "
             f"memory reduction of OT + LoRA is 30458 / 6192 = {ratio['ot_lora'][1]:.2f}x.", "",
             "| OPT-1.3B, paper | throughput | memory | speedup vs FT | memory ratio FT / mode |",
             "|---|---|---|---|---|"]
    for m, (tp, mb) in p13.items():
        lines.append(f"| {m} | {tp} | {mb} | {ratio[m][0]:.2f}x | {ratio[m][1]:.2f}x |")
    lines.append("")
    lines += _comparison(r, ratio)
    return lines


def _comparison(r: dict, paper: dict) -> list:
    """The reading of the measured rows against the paper, numbers filled in from ``r``."""
    s = r["settings"]
    cuda = s["device"].startswith("cuda")
    out = ["### Reading", ""]
    checks = [e["ft_memory_model_check"] for e in r["shapes"].values() if "ft_memory_model_check" in e]
    for shape, entry in r["shapes"].items():
        rows = {x["mode"]: x for x in entry["rows"]}
        ot, otl, ft = rows.get("ot"), rows.get("ot_lora"), rows.get("ft")
        if not (ot and otl and ft and _ran(ot) and _ran(otl)):
            continue
        measured = entry.get("ft_basis") == "measured"
        ft_mem = _memory(ft, cuda) if measured else ft["estimate"]["total_gib"]
        what = "measured" if measured else f"estimated ({ft_mem:.1f} GiB, not run)"
        line = (f"- **{shape}**, FT {what}: OT {_x(ot.get('speedup_vs_ft'))} faster by median step "
                f"({_x(ot.get('speedup_vs_ft_fastest'))} by fastest, FLOP model {_x(ot['flop_speedup_vs_ft'])}) "
                f"and {_x(ot.get('memory_ratio_vs_ft'))} less memory ({_memory(ot, cuda):.2f} GiB); OT + LoRA "
                f"{_x(otl.get('speedup_vs_ft'))} ({_x(otl.get('speedup_vs_ft_fastest'))}, FLOP model "
                f"{_x(otl['flop_speedup_vs_ft'])}) and {_x(otl.get('memory_ratio_vs_ft'))} "
                f"({_memory(otl, cuda):.2f} GiB). Paper, OPT-1.3B: OT {paper['ot'][0]:.2f}x / "
                f"{paper['ot'][1]:.2f}x, OT + LoRA {paper['ot_lora'][0]:.2f}x / {paper['ot_lora'][1]:.2f}x.")
        if not measured and checks:
            scaled = ft_mem * checks[0]
            line += (f" Scaled by the measured / estimated FT memory of the smaller shape ({checks[0]:.2f}), FT would "
                     f"need about {scaled:.1f} GiB and the memory ratios would be {scaled / _memory(ot, cuda):.2f}x "
                     f"(OT) and {scaled / _memory(otl, cuda):.2f}x (OT + LoRA).")
        out.append(line)
    out.append("")
    shares = []
    for shape in r["shapes"]:
        c = counts(shape, s["lora_r"])
        emu = c["outside"] + (sum(ADAPTER) + KEPT[shape]) * c["layer"]
        shares.append(f"{shape}: embeddings + tied head {100 * c['outside'] / c['total']:.0f}% of the parameters, "
                      f"the emulator package {100 * emu / c['total']:.0f}% of the model")
    ran = [x for e in r["shapes"].values() for x in e["rows"] if _ran(x)]
    spread = max((x["timed_max_s"] / x["timed_min_s"] for x in ran), default=1.0)
    ot_load = [x["load_before"] for x in ran if x["mode"].startswith("ot")]
    full_load = [x["load_before"] for x in ran if not x["mode"].startswith("ot")]
    drift = ""
    if ot_load and full_load:
        a, b = sum(ot_load) / len(ot_load), sum(full_load) / len(full_load)
        drift = (f"; the OT rows started at a mean 1-minute load of {a:.1f}, the full-model rows at {b:.1f}"
                 + (", which flatters OT" if b > a + 0.5 else ", which flatters the full model" if a > b + 0.5 else ""))
    big = list(r["shapes"])[-1]
    rows = {x["mode"]: x for x in r["shapes"][big]["rows"]}
    flop = ""
    if "ot" in rows and "ot_lora" in rows:
        ot, otl = rows["ot"], rows["ot_lora"]
        share = 100 / ot["flop_speedup_vs_ft"]
        flop = (f" At {big}, OT's forward and backward do about {share:.0f} % of full FT's matmul work (the emulator "
                f"keeps {sum(ADAPTER) + KEPT[big]} of {SHAPES[big]['num_hidden_layers']} layers and every mode keeps "
                f"the full-vocabulary head), so a compute-bound CPU should run OT about "
                f"{ot['flop_speedup_vs_ft']:.1f}x and OT + LoRA about {otl['flop_speedup_vs_ft']:.1f}x faster than "
                f"full FT: below the paper's {paper['ot'][0]:.2f}x / {paper['ot_lora'][0]:.2f}x.")
        lora_gain = 100 * (ot["flops_per_token"] / otl["flops_per_token"] - 1)
        trained = ot.get("trainable") or ot["estimate"]["trainable"]
    versus = ""
    if _ran(rows.get("ot_lora", {})) and _ran(rows.get("ft_lora", {})):
        a, b = _memory(rows["ft_lora"], cuda), _memory(rows["ot_lora"], cuda)
        versus = (f" (at {big}: {a:.2f} → {b:.2f} GiB, {a / b:.2f}x, against "
                  f"{_x(rows['ot_lora'].get('memory_ratio_vs_ft'))} vs full FT)")
    signs = set()
    for e in r["shapes"].values():
        m = {x["mode"]: x for x in e["rows"]}
        if _ran(m.get("ot", {})) and _ran(m.get("ot_lora", {})):
            signs.add(m["ot_lora"]["timed_median_s"] < m["ot"]["timed_median_s"])
    stable = ("faster than OT at every shape" if signs == {True} else "slower than OT at every shape"
              if signs == {False} else "faster than OT at one shape and slower at another")
    out += [
        "- **Memory is the number to trust here.** Its ratios follow from what each mode holds (fp32: 4 B per "
        "weight, 12 B more per trained weight for its gradient and AdamW's two moments, plus activations and "
        "logits), and at the larger shape they are of the paper's size (the lines above). Where full FT did not "
        f"run its memory is the guard's estimate (about 16 B per parameter, over the {s['max_gb']:g} GiB limit), "
        "checked at the smaller shape, where full FT ran (the `Checks` line under its table).",
        f"- **At OPT-125m OT saves much less memory** ({'; '.join(shares)}): every mode pays the frozen vocabulary "
        "matrix, the batch x block x 50272 fp32 logits and the import floor, and at 125M parameters those fixed "
        "costs are a large share of the peak, so dropping middle layers cannot shrink it much.",
        f"- **Throughput on this CPU is indicative only.** Other jobs shared the cores, so one row's timed steps "
        f"differ by up to {spread:.1f}x and the load changed from row to row (last column{drift}). The FLOP-model "
        f"column is the contention-free reference.{flop} The paper's larger GPU ratios include costs a FLOP "
        "count leaves out (AdamW and clipping over every parameter, memory traffic, batch-1 kernel overheads), "
        "which a CPU run cannot confirm; `--device cuda --max-gb 120` on a GPU measures them. Where full FT "
        "did not run, its step time is estimated as 1.5x the measured FT + LoRA step (their FLOP ratio) and "
        "inherits that row's contention.",
        "- **Where offsite loses.** (1) Against LoRA on the full model (`ft_lora`), the cheap baseline of anyone "
        f"who holds the model, OT + LoRA saves much less than against full FT{versus}, and the emulator package "
        f"still carries the whole embedding and head. (2) OT + LoRA measured {stable} (medians), within the "
        "contention noise"
        + (f"; the FLOP model says OT + LoRA saves about {lora_gain:.0f} % at {big} (the weight gradients of the "
           f"adapter's {trained / 1e6:.0f}M parameters, besides AdamW over them)" if flop else "")
        + ". (3) This is cost only: what training against a weaker emulator costs in accuracy (utility) is "
        "measured elsewhere (`offsite report`, `bench/results/`), not here. (4) All of it is fp32; mixed precision "
        "would shrink the weight terms of every mode and move the ratios.",
    ]
    return out


def plot(r: dict, path: Path) -> None:
    from offsite.core.plotting import pyplot

    plt = pyplot()
    if plt is None:
        return
    shapes = list(r["shapes"])
    modes = list(dict.fromkeys(row["mode"] for e in r["shapes"].values() for row in e["rows"]))
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    width = 0.8 / max(1, len(modes))
    cuda = r["settings"]["device"].startswith("cuda")
    for i, mode in enumerate(modes):
        xs, tps, mems, hatched = [], [], [], []
        for j, shape in enumerate(shapes):
            row = next((x for x in r["shapes"][shape]["rows"] if x["mode"] == mode), None)
            if row is None:
                continue
            x = j + (i - (len(modes) - 1) / 2) * width
            if _ran(row):
                tp = row["tokens_per_s"]
                mem = row["cuda_peak_gib"] if cuda and row.get("cuda_peak_gib") else row["peak_rss_gib"]
                est = False
            else:
                t = row.get("estimated_s_per_step")
                tp = r["settings"]["batch_size"] * r["settings"]["block_size"] / t if t else 0
                mem, est = row["estimate"]["total_gib"], True
            xs.append(x), tps.append(tp), mems.append(mem), hatched.append(est)
        color = f"C{i}"
        for ax, values in ((axes[0], tps), (axes[1], mems)):
            bars = ax.bar(xs, values, width, color=color, label=mode)
            for bar, est in zip(bars, hatched):
                if est:
                    bar.set_hatch("//")
                    bar.set_facecolor("white")
                    bar.set_edgecolor(color)
    for ax, ylabel in ((axes[0], "tokens / s"), (axes[1], "CUDA peak GiB" if cuda else "peak RSS GiB")):
        ax.set_xticks(range(len(shapes)), shapes)
        ax.set_ylabel(ylabel)
        ax.set_yscale("log")
    axes[1].axhline(r["settings"]["max_gb"], color="0.5", linestyle="dotted", linewidth=1)
    axes[0].legend(fontsize=7)
    axes[0].set_title("throughput (hatched: estimate, not run)", fontsize=9)
    axes[1].set_title("peak memory (hatched: estimate; dotted: --max-gb)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
