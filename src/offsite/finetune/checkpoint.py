"""Resumable fine-tuning checkpoints in ``<out>.ckpt/`` (safetensors + JSON, written atomically).

A checkpoint holds the trainable tensors, the best-so-far trainable tensors, the optimizer state,
the RNG state and a JSON with step, best validation loss, the log, and a hash of the settings: a
run resumes only with the same settings and emulator, otherwise it is refused with the reason.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import OffsiteError
from .schedule import optimizer_tensors, restore_optimizer


def checkpoint_dir(out) -> Path:
    out = Path(out)
    return out.parent / f"{out.name}.ckpt"


def _save_atomic(tensors: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def save_checkpoint(folder: Path, trainable: dict, best: dict | None, optimizer, state: dict) -> None:
    """Write (or replace) the checkpoint; ``state.json`` last so a readable state means a full set."""
    folder.mkdir(parents=True, exist_ok=True)
    _save_atomic(trainable, folder / "trainable.safetensors")
    if best is not None:
        _save_atomic(best, folder / "best.safetensors")
    opt_tensors, groups = optimizer_tensors(optimizer)
    opt_tensors["rng.torch"] = torch.get_rng_state()
    _save_atomic(opt_tensors, folder / "optimizer.safetensors")
    tmp = folder / "state.json.tmp"
    tmp.write_text(json.dumps({**state, "param_groups": groups}, indent=1, default=str))
    os.replace(tmp, folder / "state.json")


def load_checkpoint(folder: Path, settings_hash: str, params: dict, optimizer):
    """Restore a checkpoint into ``params`` and ``optimizer``; returns ``(state, best_tensors_or_None)``.

    Raises:
        OffsiteError: the checkpoint was made with other settings or another emulator.
    """
    state = json.loads((folder / "state.json").read_text())
    if state.get("settings_hash") != settings_hash:
        raise OffsiteError(f"{folder} holds a checkpoint of a run with different settings or emulator; "
                           "delete it or pass --no-resume to start over")
    trainable = load_file(str(folder / "trainable.safetensors"))
    if set(trainable) != set(params):
        raise OffsiteError(f"{folder}: checkpoint tensors do not match the trainable parameters; delete it")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(trainable[name])
    opt = load_file(str(folder / "optimizer.safetensors"))
    torch.set_rng_state(opt.pop("rng.torch"))
    restore_optimizer(optimizer, opt, state.pop("param_groups"))
    best_path = folder / "best.safetensors"
    return state, (load_file(str(best_path)) if best_path.is_file() else None)


def remove_checkpoint(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
