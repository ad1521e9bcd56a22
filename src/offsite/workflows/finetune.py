"""Workflow: emulator package + private data -> adapter artifact (data owner side).

Reads top to bottom: load the emulator, choose what trains (the adapter layers, or LoRA on them),
load data, train with AdamW + warmup/decay + accumulation + clipping under the mixed-precision
policy of :mod:`offsite.core.precision` (fp32 master weights for what trains, the checkpoint dtype for
what is frozen), validate a few times and keep the best emulator validation loss (as
Offsite-Tuning does), checkpoint for resumption (see :mod:`.checkpoint`), stop with an error as
soon as the loss, gradients or weights stop being finite, and write the adapter artifact (in the
base dtype) in full-model layer numbers bound to the emulator's fingerprint. The loop itself is
:mod:`.loop`, shared with the attacks of ``offsite audit`` so that they run the same training.
With ``dp_epsilon`` or ``dp_noise_multiplier`` the steps are DP-SGD (:mod:`.dp`, Opacus) and the
manifest's ``dp`` entry records the accountant's epsilon.

Several processes (data parallel, :mod:`.distributed`): launch the same command with
``torchrun --nproc_per_node N -m offsite.cli finetune ...`` (or ``accelerate launch`` with one
GPU per process). ``batch_size`` is then the global batch, split across the processes; gradients
are summed before clipping, so every process holds the same weights and only rank 0 writes the
checkpoints and the artifact (the same as one process's up to floating-point summation order).
Not launched that way, nothing of it runs.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from ..adapters.artifact import copy_into_layers, load_adapter, save_full_adapter, save_lora_adapter
from ..artifacts import guard_output
from ..core.device import resolve_device
from ..core.errors import OffsiteError
from ..core.precision import dtype_name
from ..core.settings_types import build_settings
from ..training import distributed, dp
from ..training.checkpoint import (checkpoint_dir, guard_checkpoint, load_checkpoint, recover_checkpoint,
                                   remove_checkpoint, run_key, save_checkpoint)
from ..training.config import FinetuneConfig, recorded, resume_settings
from ..training.loop import State, check_finite, prepare, select, train as train_loop
from ..training.session import open_session

__all__ = ["finetune", "FinetuneConfig"]

CHECKPOINT_SECONDS = 600
"""Without save_every, a checkpoint is written once this many seconds passed since the last one."""


def finetune(emulator, data, out, overwrite: bool = False, sign_key=None, trusted_keys=None, **settings) -> Path:
    """Fine-tune the adapter of an emulator package on ``data`` and write an adapter artifact.

    Args:
        emulator: emulator package folder.
        data: training file (see :mod:`offsite.data.records` for the formats).
        out: adapter artifact folder to write.
        overwrite: replace ``out`` if it is an adapter artifact already.
        sign_key: Ed25519 private key file (``offsite keygen``) to sign the adapter with.
        trusted_keys: public key files; when given, the emulator package must be signed by one.
        **settings: fields of :class:`FinetuneConfig`.

    Returns:
        The artifact folder (kind ``adapter``, or ``lora`` with ``lora=True``).
    """
    cfg = make_config(settings)
    world = distributed.world_size()  # from the launcher's environment: refusals below come before any work
    if world > 1:
        distributed.check(cfg, world)
    if cfg.dp:
        dp.require_opacus()  # a missing extra is refused before any work or output
    inputs = [emulator, data, cfg.val_data, cfg.init_adapter]
    if world > 1:
        guard_output(Path(out), "lora" if cfg.lora else "adapter", overwrite, inputs)  # before joining the group
        guard_checkpoint(checkpoint_dir(out), inputs)
        group, device = distributed.join(cfg.device, world)
    else:
        group = None
        note = distributed.lone_process_note()
        if note:
            print(f"warning: {note}", file=sys.stderr)
        device = resolve_device(cfg.device)  # an unavailable device is refused before any work or output
        guard_output(Path(out), "lora" if cfg.lora else "adapter", overwrite, inputs)  # before any work
        guard_checkpoint(checkpoint_dir(out), inputs)
    main = group is None or group.main
    session = open_session(emulator, cfg, device, trusted_keys)
    emu, model, precision = session.emu, session.emu.model, session.precision
    start_id = None if cfg.init_adapter is None else start_from(emu, cfg.init_adapter, trusted_keys)
    params, peft_model, trained = select(emu, cfg, precision, "adapter")
    run = prepare(emu, data, cfg)
    if group is not None and len(run.train) < world:
        raise OffsiteError(f"{len(run.train)} training example(s) cannot be shared by {world} processes: every "
                           "process needs at least one of each micro-batch; add data or launch fewer processes")
    private = None
    if cfg.dp:  # every DP-SGD refusal that needs the data, before any training
        rate, expected = dp.check_run(cfg, len(run.train), precision)
        private = dp.DPSGD(model, params, run.train, cfg, run.pad, device, dp.noise_for(cfg, rate, run.total),
                           rate, expected)

    ckpt = checkpoint_dir(out)
    # Under several processes rank 0 alone writes; the key leaves the process count out, so a checkpoint
    # resumes under any number of them (the global batch makes the steps the same).
    key = run_key(emu.artifact_id, data, cfg.val_data, _resumable(cfg, start_id))
    checkpoints = _Checkpoints(ckpt, key, cfg, private, writer=main)
    if main:
        recover_checkpoint(ckpt)
    if group is not None:
        group.barrier()  # nobody reads the checkpoint before rank 0 finished or undid an interrupted swap
    try:
        state = train_loop(model, params, precision, run, cfg, device, checkpoints, private=private, group=group)
    finally:
        if private is not None:
            private.close()
    trained.release()  # the fp32 masters stay; the artifact writers cast them to the base dtype
    model.eval()  # stays on its device: the artifact is written from CPU copies at save time
    resolved = {"command": "finetune", "emulator": str(emulator), "data": str(data), **recorded(cfg),
                "device": str(device), "total_steps": run.total, "eval_every": run.eval_every,
                "checkpoint_seconds": None if cfg.save_every else CHECKPOINT_SECONDS,
                "mixed_precision": {"frozen": None if precision.frozen is None else dtype_name(precision.frozen), "trained": "float32",
                                    "autocast": None if precision.compute is None else dtype_name(precision.compute), "loss_scaling": bool(precision.scaler)}}
    if group is not None:  # only then: a single-process manifest stays as it always was
        resolved["processes"] = world
    if not main:
        group.barrier()  # rank 0 writes the artifact and removes the checkpoint; wait until it is there
        return Path(out)
    log, record = (state.log, None) if private is None else (dp.public_log(state.log), private.record())
    if cfg.lora:
        path = save_lora_adapter(out, emu, peft_model, resolved, log, overwrite=overwrite, inputs=inputs,
                                 sign_key=sign_key, dp=record)
    else:
        path = save_full_adapter(out, emu, resolved, log, overwrite=overwrite, inputs=inputs, sign_key=sign_key,
                                 dp=record)
    if not cfg.keep_checkpoint:
        remove_checkpoint(ckpt)
    if group is not None:
        group.barrier()
    return path


def start_from(emu, path, trusted_keys=None) -> str:
    """Copy a full adapter artifact trained on ``emu`` (checked: same emulator, every layer's shapes
    and dtypes) into ``emu``'s adapter layers; returns the adapter's ``artifact_id``."""
    manifest, tensors = load_adapter(path, emulator_id=emu.artifact_id, trusted_keys=trusted_keys)
    if manifest["kind"] != "adapter":
        raise OffsiteError(f"init_adapter {path} is a {manifest['kind']} artifact; only a full adapter "
                           "(finetune without --lora) can be a starting point")
    copy_into_layers(emu.model, emu.family, manifest, tensors, path,
                     positions=dict(zip(emu.split.adapter, emu.adapter_positions)), target_split=emu.split)
    return manifest["artifact_id"]


def make_config(settings: dict) -> FinetuneConfig:
    """A :class:`FinetuneConfig` from keyword settings, refusing unknown names and wrong types in one error."""
    return build_settings(FinetuneConfig, settings, "fine-tuning")


def _resumable(cfg: FinetuneConfig, start_id: str | None = None) -> dict:
    """Settings that must match for a checkpoint to be resumed; ``start_id`` is the ``artifact_id`` of the
    ``init_adapter`` started from, which stands in the key for its path (as val_data's sha256 does)."""
    # Which settings are runtime-only or enter by content is declared on FinetuneConfig's fields.
    # DP-SGD's settings enter only when it is on: a run without it keeps the key it always had, and a
    # DP-SGD run never resumes a checkpoint whose steps were not private (or were private otherwise).
    return {**resume_settings(cfg), "init_adapter": start_id}


class _Checkpoints:
    """``finetune``'s resumable checkpoints in ``<out>.ckpt/``: the hook :func:`.loop.train` calls.

    Attributes:
        folder: the checkpoint folder.
        saved: step of the last good checkpoint of this run on disk (named if training diverges).
        private: the run's :class:`.dp.DPSGD` or None; its secret and accountant travel with each checkpoint.
        writer: whether this process writes checkpoints (only rank 0 of a multi-process run does;
            every process resumes from them).
    """

    def __init__(self, folder: Path, key: dict, cfg: FinetuneConfig, private=None, writer: bool = True):
        self.folder, self.key, self.cfg, self.private, self.writer = folder, key, cfg, private, writer
        self.saved = None
        # The best tensors the last checkpoint holds: while they are still the best, it is linked, not rewritten.
        self._on_disk = None
        self._last = time.time()

    def resume(self, params: dict, optimizer, precision, scheduler, total: int) -> State | None:
        """The state of a matching checkpoint loaded into ``params`` and ``optimizer``, or None."""
        if not (self.cfg.resume and self.folder.exists()):
            return None
        saved, best = load_checkpoint(self.folder, self.key, params, optimizer)
        precision.load_state(saved.get("scaler"))
        if self.private is not None:
            self.private.load_state(saved.get("dp"))
        scheduler.last_epoch = self.saved = saved["step"]
        self._on_disk = best
        if self.writer:
            print(f"resuming from {self.folder} at step {saved['step']}/{total}")
        return State(saved["step"], saved["best_val_loss"], best, saved["log"])

    def after_step(self, state: State, params: dict, optimizer, precision, total: int) -> None:
        """Write a checkpoint when one is due (every ``save_every`` steps, else every 10 minutes)."""
        cfg = self.cfg
        due = state.step % cfg.save_every == 0 if cfg.save_every else time.time() - self._last >= CHECKPOINT_SECONDS
        if state.step >= total or not due or not self.writer:
            return
        check_finite({**params, **{f"best {k}": t for k, t in (state.best or {}).items()}}, state.step, self, cfg)
        unchanged = state.best is not None and state.best is self._on_disk
        save_checkpoint(self.folder, params, state.best, optimizer,
                        {"step": state.step, "best_val_loss": state.best_loss, "log": state.log,
                         "resume_key": self.key, "scaler": precision.state(),
                         **({} if self.private is None else {"dp": self.private.state()})},
                        unchanged)  # positional: best_unchanged (test doubles take *args)
        self.saved, self._last, self._on_disk = state.step, time.time(), state.best
