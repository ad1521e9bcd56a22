"""The attacks a data owner can run with what it received: the emulator package and its own data.

Offsite-Tuning's privacy claim is that the emulator alone stays clearly worse than the plugged-in
full model. The OT papers measure that gap for one user only: the honest one, who tunes the
adapter as told (their "emulator FT"). No OT paper measures it against a data owner who uses the
same package *differently*; the nearest evidence is "Aggressive Compression Enables LLM Weight
Theft" (arXiv 2601.01296: a compressed model, pre-trained a little more, recovers much of the
original) and the loss-margin view of LLEOT (Findings of ACL 2026: privacy is the margin by
which the emulator stays behind). The attacks, each trained on the emulator in memory:

* ``adapter`` (a): adapter-only fine-tuning, exactly ``offsite finetune`` (the honest baseline;
  its adapter is written, so it is also the one the model owner plugs in).
* ``full`` (b): every weight of the emulator trains (embeddings, norms and head included).
* ``lora`` (b): LoRA on every linear of every decoder layer that PEFT can wrap (a compressed
  GradOT/ScaleOT linear is not an ``nn.Linear``; its layer's plain linears still get LoRA).
* ``recovery`` (c): recovery pre-training of the whole emulator on public text (causal LM), then
  the task fine-tune with every weight trainable. Full rather than adapter-only for the task
  stage: recovery has already moved every weight, so freezing them again could only weaken the
  attack, and the audit asks for the worst case.

Budgets (:data:`BUDGETS`) count optimizer steps, with the honest run's learning rate, batch size
and schedule: ``same`` gives every attack the honest ``max_steps`` N; ``strong`` gives every
attack 4N. ``recovery`` spends the first half of its steps on public text and the rest on the
task, so it never gets more steps than the others. Steps are not FLOPs: a full-emulator step
costs a backward pass through every layer and AdamW state for every weight (16 bytes per
parameter), which a data owner able to run the emulator can afford.

Every attack runs :func:`offsite.training.loop.train`, the loop of ``finetune`` (batching,
schedule, clipping, the precision policy, validation and best-weight selection), and differs
only in what trains.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from ...core.device import resolve_device
from ...core.errors import OffsiteError
from ...families import get_layers
from ...training.loop import prepare, select, train
from ...training.session import open_session
from ...workflows.finetune import finetune, make_config

ATTACKS = {
    "adapter": "(a) adapter-only FT (offsite finetune)",
    "full": "(b) full-emulator FT",
    "lora": "(b) LoRA on every layer",
    "recovery": "(c) recovery pre-training on public text + full FT",
}
BUDGETS = {"same": 1, "strong": 4}
"""Optimizer steps of every attack as a multiple of the honest fine-tune's ``max_steps``."""


@dataclasses.dataclass
class Attacked:
    """What one attack produced: an in-memory model, or (attack ``adapter``) an adapter artifact.

    Attributes:
        model: the trained emulator (an HF causal LM in eval mode), or None.
        tokenizer: its tokenizer, or None.
        adapter: the adapter artifact folder of attack ``adapter``, else None.
        record: JSON-able facts: attack, budget, steps, trainable parameters, stages with their logs.
    """

    model: object
    tokenizer: object
    adapter: Path | None
    record: dict


def check_budget(budget: str) -> int:
    """The step multiplier of ``budget``; an unknown one is an :class:`OffsiteError` naming the allowed."""
    if budget not in BUDGETS:
        raise OffsiteError(f"unknown budget {budget!r}; allowed: {', '.join(BUDGETS)} (same = the honest "
                           "fine-tune's steps for every attack, strong = 4 times as many)")
    return BUDGETS[budget]


def check_attacks(names) -> list:
    """Validated attack names, in the order of :data:`ATTACKS`."""
    names = list(names)
    unknown = [n for n in names if n not in ATTACKS]
    if unknown or not names:
        raise OffsiteError(f"unknown attack(s) {unknown or names}; allowed: {', '.join(ATTACKS)}")
    return [n for n in ATTACKS if n in names]


def stages(attack: str, budget: str, steps: int) -> list:
    """``[(stage, optimizer steps)]`` of an attack: ``("task", n)``, or public text first for recovery."""
    total = steps * check_budget(budget)
    if attack == "recovery":
        return [("public", total // 2), ("task", total - total // 2)]
    return [("task", total)]


def run_attack(attack: str, emulator, data, fmt: str, settings: dict, budget: str = "same", public=None,
               out=None) -> Attacked:
    """Run one attack on the emulator package with the honest fine-tune's ``settings``.

    Args:
        attack: one of :data:`ATTACKS`.
        emulator: the emulator package folder.
        data: the task's training file; fmt: its format (``prompt`` or ``text``).
        settings: the honest run's :class:`offsite.workflows.finetune.FinetuneConfig` fields (``max_steps``
            set); ``max_steps`` is scaled by the budget.
        budget: a key of :data:`BUDGETS`.
        public: public text file (attack ``recovery``).
        out: adapter folder to write (attack ``adapter``).

    Returns:
        :class:`Attacked`.
    """
    check_attacks([attack])
    plan = stages(attack, budget, settings["max_steps"])
    if attack == "adapter":
        return _adapter(emulator, data, fmt, settings, plan[0][1], budget, out)
    if attack == "recovery" and public is None:
        raise OffsiteError("attack 'recovery' needs public text: pass --public FILE (.txt, .gz or .jsonl)")
    cfg = make_config({**settings, "format": fmt})
    session = open_session(emulator, cfg, resolve_device(cfg.device))  # as finetune sets its run up
    device, emu, precision = session.device, session.emu, session.precision
    record = {"attack": attack, "what": ATTACKS[attack], "budget": budget, "stages": []}
    peft_model = None
    for stage, steps in plan:
        text = public if stage == "public" else data
        if stage == "public":  # causal LM on every token of the public text, validated on a held-out share of it
            stage_cfg = dataclasses.replace(cfg, format="text", task=None, val_data=None, max_steps=steps)
        else:
            stage_cfg = dataclasses.replace(cfg, max_steps=steps, lora=attack == "lora",
                                            lora_targets=_lora_everywhere(emu) if attack == "lora" else None)
        params, peft_model, trained = select(emu, stage_cfg, precision, "emulator")
        run = prepare(emu, text, stage_cfg)
        state = train(peft_model or emu.model, params, precision, run, stage_cfg, device, desc=f"attack {attack}/{stage}")
        trained.release()
        record["trainable_parameters"] = sum(p.numel() for p in params.values())
        record["stages"].append({"stage": stage, "data": str(text), "steps": state.step, "lr": stage_cfg.lr,
                                 "log": state.log})
    model = peft_model.merge_and_unload() if peft_model is not None else emu.model
    record["steps"] = sum(s["steps"] for s in record["stages"])
    return Attacked(model.eval(), emu.tokenizer, None, record)


def _adapter(emulator, data, fmt: str, settings: dict, steps: int, budget: str, out) -> Attacked:
    """Attack (a): ``offsite finetune`` itself, with the budget's steps; the log comes from the artifact."""
    if out is None:
        raise OffsiteError("attack 'adapter' writes an adapter artifact: give it an output folder")
    adapter = finetune(emulator, data, out, overwrite=True, **{**settings, "format": fmt, "max_steps": steps})
    return Attacked(None, None, adapter, adapter_record(adapter, budget))


def adapter_record(adapter, budget: str) -> dict:
    """The record of attack (a) read back from an adapter artifact (its training log and tensor shapes)."""
    adapter = Path(adapter)
    log = json.loads((adapter / "training_log.json").read_text())
    settings = json.loads((adapter / "settings.json").read_text())
    shapes = json.loads((adapter / "manifest.json").read_text())["tensors"]
    count = sum(_numel(entry[1]) for index in shapes.values() for entry in index.values())
    return {"attack": "adapter", "what": ATTACKS["adapter"], "budget": budget, "adapter": str(adapter),
            "trainable_parameters": count, "steps": log["steps"],
            "stages": [{"stage": "task", "data": settings["data"], "steps": log["steps"], "lr": settings["lr"],
                        "log": log}]}


def _numel(shape) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def _lora_everywhere(emu) -> list:
    """Full names of every linear PEFT can wrap in every decoder layer whose leaf is a LoRA target.

    Compressed linears (low-rank factors, harmonizers) are not ``nn.Linear``/``Conv1D`` and PEFT
    refuses them, so they are left out by type rather than by name.
    """
    from transformers.pytorch_utils import Conv1D

    leaves = set(emu.family.lora_targets)
    names = []
    for pos, layer in enumerate(get_layers(emu.model, emu.family)):
        for name, module in layer.named_modules():
            if name.rsplit(".", 1)[-1] in leaves and isinstance(module, (torch.nn.Linear, Conv1D)):
                names.append(f"{emu.family.layers}.{pos}.{name}")
    return names
