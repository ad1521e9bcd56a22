"""The embedded demo: offsite-tuning end to end on a world and a model the project makes itself.

Steps (each one is the library's own workflow, as a user would run it):

1. generate the world, its pretraining corpus and its quiz (:mod:`offsite.experiments.demo.world`);
2. pretrain a small Llama on the corpus (:mod:`offsite.experiments.demo.pretrain`; reused when ``workdir``
   already holds a finished run with the same settings);
3. model owner: :func:`offsite.workflows.emulate.emulate` with uniform layer drop;
4. data owner: :func:`offsite.workflows.finetune.finetune` of the adapter on the quiz's train split;
5. model owner: :func:`offsite.workflows.plug.plug` into the full model;
6. score full zero-shot, emulator zero-shot, emulator fine-tuned and plug-in on the test split,
   whose persons the fine-tuning never saw: only knowledge from pretraining can answer it.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch

from ...core.device import resolve_device
from ...eval.loading import load_for_eval
from ...eval.run import evaluate
from ...workflows.emulate import emulate
from ...workflows.finetune import finetune
from ...workflows.plug import plug
from .pretrain import PretrainConfig, is_pretrained, pretrain
from .world import generate_world, write_world

@dataclasses.dataclass
class DemoSettings:
    """Sizes and schedules of one demo run."""

    people: int = 60
    variants: int = 8
    choices: int = 10
    quiz: str = "cloze"  # see offsite.experiments.demo.world.questions
    relations: list | None = None  # relation keys (default: all of world.RELATIONS)
    pretrain: PretrainConfig = dataclasses.field(
        default_factory=lambda: PretrainConfig(layers=8, hidden=96, intermediate=256, steps=900, outer_drop=0.5))
    adapter_layers: str = "2,2"
    emulator_layers: int = 1
    ft_steps: int = 200
    ft_lr: float = 3e-4
    ft_batch: int = 16
    ft_lora: int = 0  # LoRA rank on the adapter layers; 0 tunes the whole layers


def settings_for(quick: bool, seed: int = 0) -> DemoSettings:
    """The default demo, or the smaller ``quick`` one used by the tests (about half the work)."""
    if quick:
        return DemoSettings(people=30, ft_steps=150, pretrain=PretrainConfig(
            layers=8, hidden=96, intermediate=256, steps=450, outer_drop=0.5, seed=seed))
    return DemoSettings(pretrain=PretrainConfig(layers=8, hidden=96, intermediate=256, steps=900, outer_drop=0.5,
                                                seed=seed))


def run_demo(workdir, *, quick: bool = False, seed: int = 0, progress: bool = True, full_ft: bool = False,
             settings: DemoSettings | None = None, threads: int | None = None, device="auto") -> dict:
    """Run the whole demo in ``workdir`` and return (and write) its results.

    Args:
        workdir: folder for the data, models and artifacts (created; a finished pretraining run
            with the same settings is reused).
        quick: the smaller setting (well under a minute on two cores).
        seed: seeds the world, the pretraining and the fine-tuning.
        progress: progress bars and step messages.
        full_ft: also fine-tune every decoder block of the full model (the upper bound).
        settings: override the preset chosen by ``quick``.
        threads: torch CPU threads (default: leave torch's setting alone).
        device: where every step runs, pretraining included (``"auto"``: CUDA when present; see
            :mod:`offsite.core.device`).

    Returns:
        ``{"accuracy": {row: acc}, "delta": plug_in - emulator_ft, "seconds": {...}, ...}``;
        the same object is written to ``workdir/results.json``.
    """
    where = resolve_device(device)  # before the world's files are written
    if threads:
        torch.set_num_threads(threads)
    s = settings or settings_for(quick, seed)
    work = Path(workdir)
    say = print if progress else (lambda *a, **k: None)
    seconds, started = {}, time.time()

    def lap(name: str, t0: float) -> None:
        seconds[name] = round(time.time() - t0, 1)

    paths, prep_seconds = prepare(work, s, seed, progress, where)
    seconds.update(prep_seconds)
    model_dir = paths["model"]

    t0 = time.time()
    emulator = emulate(str(model_dir), work / "emulator", method="uniform", adapter_layers=s.adapter_layers,
                       overwrite=True, emulator_layers=s.emulator_layers, device=where)
    lap("emulate", t0)
    ft = dict(format="mc", val_data=str(paths["validation"]), max_steps=s.ft_steps, lr=s.ft_lr,
              batch_size=s.ft_batch, warmup_steps=max(1, s.ft_steps // 10), seed=seed, progress=progress,
              device=str(where))
    if s.ft_lora:
        ft.update(lora=True, lora_r=s.ft_lora, lora_alpha=2 * s.ft_lora)
    t0 = time.time()
    say("[demo] data owner: fine-tuning the adapter on the emulator ...")
    adapter = finetune(str(emulator), str(paths["train"]), work / "adapter", overwrite=True, **ft)
    plugged = plug(str(model_dir), str(adapter), work / "plugged", overwrite=True, device=where)
    lap("finetune_plug", t0)

    t0 = time.time()
    runs = {"full_zs": (model_dir, None), "emulator_zs": (emulator, None), "emulator_ft": (emulator, adapter),
            "plug_in": (plugged, None)}
    if full_ft:
        # Upper bound: every decoder block of the full model tuned on the same data.
        whole = emulate(str(model_dir), work / "emulator_full", method="uniform", adapter_layers="all",
                        overwrite=True, allow_verbatim_middle=True, device=where)  # never shipped
        tuned = finetune(str(whole), str(paths["train"]), work / "adapter_full", overwrite=True, **ft)
        runs["full_ft"] = (model_dir, tuned)
    accuracy = {name: score(str(m), a and str(a), paths["test"], progress, where) for name, (m, a) in runs.items()}
    lap("evaluate", t0)
    seconds["total"] = round(time.time() - started, 1)

    result = {"world": True, "accuracy": accuracy, "delta": round(accuracy["plug_in"] - accuracy["emulator_ft"], 4),
              "test_questions": sum(1 for _ in open(paths["test"], encoding="utf-8")),
              "chance": round(1 / len(json.loads(paths["test"].read_text().splitlines()[0])["choices"]), 4),
              "settings": dataclasses.asdict(s), "seed": seed, "quick": quick, "device": str(where),
              "seconds": seconds,
              "paths": {k: str(v) for k, v in {**paths, "emulator": emulator,
                                                "adapter": adapter, "plugged": plugged}.items()}}
    (work / "results.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return result


def prepare(workdir, settings: DemoSettings, seed: int = 0, progress: bool = True, device="auto") -> tuple:
    """Steps 1-2: write the world's files and pretrain the base model (reused when already done).

    ``device`` is where a pretraining that is not reused runs (see :mod:`offsite.core.device`).

    Returns:
        ``(paths, seconds)``: ``paths`` has ``corpus``, ``train``, ``validation``, ``test``,
        ``world`` and ``model`` (the pretrained HF folder); ``seconds`` has ``world`` and ``pretrain``.
    """
    device = resolve_device(device)  # before the world's files are written
    work = Path(workdir)
    say = print if progress else (lambda *a, **k: None)
    t0 = time.time()
    world = generate_world(settings.people, seed=seed, relations=settings.relations)
    paths = write_world(world, work / "data", variants=settings.variants, choices=settings.choices,
                        style=settings.quiz)
    seconds = {"world": round(time.time() - t0, 1)}
    paths["model"] = work / "model"
    t0 = time.time()
    if is_pretrained(paths["model"], settings.pretrain, paths["corpus"]):
        say(f"[demo] reusing the pretrained model in {paths['model']}")
    else:
        say(f"[demo] pretraining a {settings.pretrain.layers}-layer Llama on {paths['corpus']} ...")
        pretrain(paths["corpus"], paths["model"], settings.pretrain, progress=progress, device=device)
    seconds["pretrain"] = round(time.time() - t0, 1)
    return paths, seconds


def score(model: str, adapter: str | None, test_file, progress: bool = False, device="auto") -> float:
    """Multiple-choice accuracy (``acc``) of a model / emulator (+ adapter) on the quiz file."""
    m, tokenizer, _ = load_for_eval(model, adapter, device=device)
    out = evaluate(m, tokenizer, [str(test_file)], data_dir=None, split="test", progress=progress)
    return round(out["results"][str(test_file)]["acc"], 4)
