"""Workflow: emulator package + private data -> adapter artifact (data owner side).

Reads top to bottom: load the emulator, choose what trains (the adapter layers, or LoRA on them),
load data, train with AdamW + warmup/decay + accumulation + clipping under the mixed-precision
policy of :mod:`offsite.precision` (fp32 master weights for what trains, the checkpoint dtype for
what is frozen), validate a few times and keep the best emulator validation loss (as
Offsite-Tuning does), checkpoint for resumption (see :mod:`.checkpoint`), stop with an error as
soon as the loss, gradients or weights stop being finite, and write the adapter artifact (in the
base dtype) in full-model layer numbers bound to the emulator's fingerprint.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from pathlib import Path

import torch

from ..adapters import save_full_adapter, save_lora_adapter
from ..artifacts import guard_output
from ..data import collate, load_examples
from ..device import resolve_device
from ..errors import OffsiteError
from ..families import get_layers
from ..package import load_emulator
from ..precision import base_dtype
from ..precision import policy as precision_policy
from .checkpoint import (checkpoint_dir, diverged, first_nonfinite, guard_checkpoint, load_checkpoint,
                         recover_checkpoint,
                         remove_checkpoint, run_key, save_checkpoint)
from .config import FinetuneConfig
from .schedule import lr_lambda

__all__ = ["finetune", "FinetuneConfig"]

VALIDATIONS = 5
"""Default validations per run (eval_every = ceil(steps / 5)); each is a forward pass over val_limit blocks."""
CHECKPOINT_SECONDS = 600
"""Without save_every, a checkpoint is written once this many seconds passed since the last one."""


def finetune(emulator, data, out, overwrite: bool = False, sign_key=None, trusted_keys=None, **settings) -> Path:
    """Fine-tune the adapter of an emulator package on ``data`` and write an adapter artifact.

    Args:
        emulator: emulator package folder.
        data: training file (see :mod:`offsite.data` for the formats).
        out: adapter artifact folder to write.
        overwrite: replace ``out`` if it is an adapter artifact already.
        sign_key: Ed25519 private key file (``offsite keygen``) to sign the adapter with.
        trusted_keys: public key files; when given, the emulator package must be signed by one.
        **settings: fields of :class:`FinetuneConfig`.

    Returns:
        The artifact folder (kind ``adapter``, or ``lora`` with ``lora=True``).
    """
    cfg = _make_config(settings)
    device = resolve_device(cfg.device)  # an unavailable device is refused before any work or output
    inputs = [emulator, data, cfg.val_data]
    guard_output(Path(out), "lora" if cfg.lora else "adapter", overwrite, inputs)  # before any work
    guard_checkpoint(checkpoint_dir(out), inputs)
    torch.manual_seed(cfg.seed)
    emu = load_emulator(emulator, device=device, trusted_keys=trusted_keys)
    model = emu.model
    precision = precision_policy(cfg.precision, base_dtype(model), device)
    params, peft_model, trained = _trainable(emu, cfg, precision)

    block = min(cfg.block_size, getattr(model.config, "max_position_embeddings", cfg.block_size) or cfg.block_size)
    vocab = model.get_input_embeddings().num_embeddings
    if emu.tokenizer is not None and len(emu.tokenizer) > vocab:
        raise OffsiteError(f"the emulator's tokenizer has {len(emu.tokenizer)} tokens but its embedding only {vocab}")
    train = load_examples(data, cfg.format, emu.tokenizer, block, cfg.task)
    val = load_examples(cfg.val_data, cfg.format, emu.tokenizer, block, cfg.task) if cfg.val_data else []
    if not cfg.val_data and cfg.val_fraction > 0 and len(train) >= 20:
        random.Random(cfg.seed).shuffle(train)
        cut = max(1, int(len(train) * cfg.val_fraction))
        val, train = train[:cut], train[cut:]
    val = val[:cfg.val_limit]
    per_step = cfg.batch_size * cfg.grad_accum
    total = cfg.max_steps if cfg.max_steps is not None else math.ceil(cfg.epochs * len(train) / per_step)
    # Validation is overhead: by default 5 times a run (and at the end), see bench/finetune_overhead.py.
    eval_every = cfg.eval_every or max(1, math.ceil(total / VALIDATIONS))

    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    optimizer = torch.optim.AdamW(params.values(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.schedule, cfg.warmup_steps, total))
    resume_key = run_key(emu.artifact_id, data, cfg.val_data, _resumable(cfg))
    ckpt = checkpoint_dir(out)
    recover_checkpoint(ckpt)
    step, best_loss, best, log = 0, math.inf, None, {"train": [], "val": []}
    saved = None  # step of the last good checkpoint of this run on disk, named if training diverges
    best_on_disk = False  # whether the last checkpoint already holds ``best`` (then it is linked, not rewritten)
    if cfg.resume and ckpt.exists():
        state, best = load_checkpoint(ckpt, resume_key, params, optimizer)
        step, best_loss, log = state["step"], state["best_val_loss"], state["log"]
        precision.load_state(state.get("scaler"))
        scheduler.last_epoch = saved = step
        best_on_disk = best is not None
        print(f"resuming from {ckpt} at step {step}/{total}")

    pad = emu.tokenizer.pad_token_id if emu.tokenizer.pad_token_id is not None else 0
    autocast = precision.autocast()
    batches = _Batcher(train, cfg.batch_size, cfg.seed, pad, device)
    started = last_save = time.time()
    model.train()
    with _progress(total, step, cfg.progress) as bar:
        while step < total:
            loss_sum = 0.0
            for micro in range(cfg.grad_accum):
                with autocast:
                    loss = model(**batches(step * cfg.grad_accum + micro)).loss / cfg.grad_accum
                value = loss.item()
                if not math.isfinite(value):  # before backward: a NaN must never reach the weights
                    raise diverged(step + 1, f"loss is {value}", ckpt, saved, cfg.lr)
                precision.backward(loss)
                loss_sum += value
            norm = precision.clip(optimizer, params.values(), cfg.max_grad_norm)
            # Clipping cannot rescue inf/NaN gradients; only fp16 overflow is skipped (by the loss scaler).
            if not math.isfinite(norm) and not precision.overflow_skips():
                raise diverged(step + 1, f"gradient norm is {norm}", ckpt, saved, cfg.lr)
            precision.step(optimizer)
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            log["train"].append({"step": step, "loss": round(loss_sum, 5), "lr": scheduler.get_last_lr()[0]})
            if val and (step % eval_every == 0 or step == total):
                val_loss = _validate(model, val, cfg.batch_size, pad, device, autocast)
                log["val"].append({"step": step, "loss": val_loss})
                if val_loss < best_loss:
                    best_loss, best = val_loss, {k: p.detach().clone() for k, p in params.items()}
                    best_on_disk = False
                model.train()
            if step < total and (step % cfg.save_every == 0 if cfg.save_every
                                 else time.time() - last_save >= CHECKPOINT_SECONDS):
                _check_finite({**params, **{f"best {k}": t for k, t in (best or {}).items()}}, step, ckpt, saved, cfg)
                save_checkpoint(ckpt, params, best, optimizer, {"step": step, "best_val_loss": best_loss,
                                                                 "log": log, "resume_key": resume_key,
                                                                 "scaler": precision.state()},
                                best_on_disk)  # positional: best_unchanged (test doubles take *args)
                saved, last_save, best_on_disk = step, time.time(), best is not None
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum:.4f}")

    if best is not None:  # keep the checkpoint with the lowest emulator validation loss
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(best[name])
    trained.release()  # the fp32 masters stay; the artifact writers cast them to the base dtype
    _check_finite(params, step, ckpt, saved, cfg)
    model.eval()  # stays on its device: the artifact is written from CPU copies at save time
    log.update(steps=step, best_val_loss=None if math.isinf(best_loss) else best_loss,
               train_examples=len(train), val_examples=len(val), seconds=round(time.time() - started, 2))
    resolved = {"command": "finetune", "emulator": str(emulator), "data": str(data), **dataclasses.asdict(cfg),
                "device": str(device), "total_steps": total, "eval_every": eval_every,
                "checkpoint_seconds": None if cfg.save_every else CHECKPOINT_SECONDS,
                "mixed_precision": {"frozen": _name(precision.frozen), "trained": "float32",
                                    "autocast": _name(precision.compute), "loss_scaling": bool(precision.scaler)}}
    if cfg.lora:
        path = save_lora_adapter(out, emu, peft_model, resolved, log, overwrite=overwrite, inputs=inputs,
                                 sign_key=sign_key)
    else:
        path = save_full_adapter(out, emu, resolved, log, overwrite=overwrite, inputs=inputs, sign_key=sign_key)
    if not cfg.keep_checkpoint:
        remove_checkpoint(ckpt)
    return path


def _make_config(settings: dict) -> FinetuneConfig:
    known = {f.name for f in dataclasses.fields(FinetuneConfig)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise OffsiteError(f"unknown fine-tuning setting(s) {unknown}; known: {sorted(known)}")
    return FinetuneConfig(**settings)


def _resumable(cfg: FinetuneConfig) -> dict:
    """Settings that must match for a checkpoint to be resumed (not cosmetic ones)."""
    # save_every only says when checkpoints are written (the RNG state travels with them), and
    # val_data's path is left out: the run key holds the sha256 of its content instead.
    skip = {"resume", "keep_checkpoint", "progress", "device", "save_every", "val_data"}
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in skip}



def _name(dtype) -> str | None:
    return None if dtype is None else str(dtype).replace("torch.", "")


def _trainable(emu, cfg: FinetuneConfig, precision):
    """Freeze everything, then unfreeze the adapter layers or wrap them with LoRA, held in fp32.

    Returns:
        ``(params, peft_model_or_None, trained)``: ``{name: parameter}`` to optimise, and the
        :class:`offsite.precision.Trained` handle of their fp32 casts and boundary hooks.
    """
    model = emu.model
    model.requires_grad_(False)
    if not cfg.lora:
        layers = [get_layers(model, emu.family)[pos] for pos in emu.adapter_positions]
        trained = precision.train(modules=layers)  # before the optimizer: AdamW must see the fp32 tensors
        params = {}
        for pos, layer in zip(emu.adapter_positions, layers):
            for name, p in layer.named_parameters():
                p.requires_grad_(True)
                params[f"{emu.family.layers}.{pos}.{name}"] = p
        return params, None, trained
    from ..lora import wrap_lora

    peft_model = wrap_lora(model, emu.family, emu.adapter_positions, cfg)
    params = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    # PEFT's LoRA layers cast their input to the LoRA weights' dtype and the result back: no hooks.
    return params, peft_model, precision.train(params=params.values())


def _check_finite(tensors: dict, step: int, ckpt: Path, saved, cfg: FinetuneConfig) -> None:
    """Stop before a checkpoint or the adapter could be written with NaN/inf weights."""
    bad = first_nonfinite(tensors)
    if bad is not None:
        raise diverged(step, f"trainable tensor '{bad}' holds NaN or infinite values", ckpt, saved, cfg.lr)


class _Batcher:
    """Micro-batches of a deterministic per-epoch shuffle, addressed by index (so resuming is exact).

    The shuffled order of the current epoch is cached: indices arrive in sequence, so one entry
    turns the O(N) reshuffle per micro-batch into one per epoch, with the very same order.
    """

    def __init__(self, examples: list, size: int, seed: int, pad: int, device):
        self.examples, self.size, self.seed, self.pad, self.device = examples, size, seed, pad, device
        self.per_epoch = max(1, len(examples) // size)
        self._epoch, self._order = None, []

    def order(self, epoch: int) -> list:
        """The example order of ``epoch``: ``range(N)`` shuffled by a per-epoch seeded RNG."""
        if epoch != self._epoch:
            order = list(range(len(self.examples)))
            random.Random(self.seed * 100003 + epoch).shuffle(order)
            self._epoch, self._order = epoch, order
        return self._order

    def __call__(self, index: int) -> dict:
        epoch, offset = divmod(index, self.per_epoch)
        order = self.order(epoch)
        chosen = [self.examples[i] for i in order[offset * self.size:(offset + 1) * self.size]]
        chosen = chosen or [self.examples[order[0]]]
        return {k: v.to(self.device) for k, v in collate(chosen, self.pad).items()}


@torch.no_grad()
def _validate(model, examples, size: int, pad: int, device, autocast) -> float:
    """Token-weighted mean loss over the validation examples."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(examples), size):
        batch = {k: v.to(device) for k, v in collate(examples[start:start + size], pad).items()}
        with autocast:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        losses = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels,
                                                   ignore_index=-100, reduction="sum")
        total += losses.item()
        count += int((labels != -100).sum())
    return total / max(1, count)


def _progress(total: int, start: int, enabled: bool):
    from ..progress import bar

    return bar(total, "finetune", "step", initial=start, enabled=enabled, leave=False)
