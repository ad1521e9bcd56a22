"""Resumable fine-tuning checkpoints in ``<out>.ckpt/``, written and swapped in as one unit.

A checkpoint holds the trainable tensors, the best-so-far trainable tensors, the optimizer state
with the RNG state, and ``state.json`` (step, best validation loss, the log, the run's resume key,
the sha256 of every tensor file, and for DP-SGD the secret seed of its batches and noise with the
accountant's history: a checkpoint is as private as the data). It is assembled in a fresh hidden sibling folder and then
swapped into place (old renamed away, new renamed in, old deleted), so a killed run leaves either
the previous checkpoint or the new one, never a mix; :func:`recover_checkpoint` finishes or undoes
a swap that was cut short. ``best.safetensors`` is only written when the best tensors changed
since the previous checkpoint; otherwise the previous file is hard-linked (or copied) into the new
unit with its recorded sha256, so a run that stopped improving pays for the trainable tensors and
the optimizer only. On load every file is checked against its sha256, and the resume key
(emulator, content of the data files, settings) must match, otherwise the run is refused with the
reason. Non-finite tensors are never written: training that diverges stops with :func:`diverged`.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import torch

from ..artifacts import canonical_json, overlapping_input, sha256_file
from ..artifacts.folder import remove_path, replace_folder
from ..artifacts.tensors import load_tensors
from ..core.errors import OffsiteError
from ..core.schedule import optimizer_tensors, restore_optimizer

TRAINABLE, BEST, OPTIMIZER, STATE = "trainable.safetensors", "best.safetensors", "optimizer.safetensors", "state.json"
_TENSOR_FILES = (TRAINABLE, BEST, OPTIMIZER)
_RESTART = "delete it or pass --no-resume to start over"


def checkpoint_dir(out) -> Path:
    out = Path(out)
    return out.parent / f"{out.name}.ckpt"


def _old_dir(folder: Path) -> Path:
    return folder.parent / f".{folder.name}.old"


def _tmp_prefix(folder: Path) -> str:
    return f".{folder.name}.tmp-"


def run_key(emulator_id: str, data, val_data, settings: dict) -> dict:
    """What a checkpoint must have been made with to be resumed: emulator, data content, settings.

    Args:
        emulator_id: ``artifact_id`` of the emulator package.
        data: training data file (hashed by content, so a moved file still resumes and an edited
            one does not).
        val_data: validation data file or None.
        settings: every setting that affects the result.
    """
    return {"emulator": emulator_id, "data": sha256_file(Path(data)),
            "val_data": sha256_file(Path(val_data)) if val_data else None,
            # A JSON round trip gives the form state.json reads back (tuples become lists, etc.).
            "settings": json.loads(canonical_json(settings))}


def guard_checkpoint(folder: Path, inputs=()) -> None:
    """Refuse a checkpoint path that resuming, replacing or removing would damage.

    The checkpoint folder (``<out>.ckpt``) and its swap sibling are written and deleted by the run,
    so they must not be, contain or lie inside an input, nor hold the current folder, and when they
    exist they must hold nothing but checkpoint files.

    Raises:
        OffsiteError: naming the path and what to do.
    """
    folder = Path(folder)
    for path in (folder, _old_dir(folder)):
        target = path.absolute().resolve()
        given, relation = overlapping_input(path, inputs)
        if relation:
            raise OffsiteError(f"the checkpoint folder {path} of this --out would overlap the input {given}; "
                               "pick another --out")
        if Path.cwd().resolve() == target or target in Path.cwd().resolve().parents:
            raise OffsiteError(f"the checkpoint folder {path} of this --out holds the current folder; "
                               "pick another --out")
        if path.is_symlink() or (path.exists() and not path.is_dir()):
            raise OffsiteError(f"{path} exists and is not a fine-tuning checkpoint folder; move it away or pick "
                               "another --out")
        if path.is_dir():
            strangers = sorted(p.name for p in path.iterdir() if p.name not in (TRAINABLE, BEST, OPTIMIZER, STATE)
                               or not p.is_file() or p.is_symlink())
            if strangers:
                raise OffsiteError(f"{path} holds files that are not checkpoint files ({strangers[:3]}); it is not a "
                                   "fine-tuning checkpoint, so offsite will not resume, replace or delete it — move "
                                   "it away or pick another --out")


def recover_checkpoint(folder: Path) -> None:
    """Clean up after a run killed while writing or swapping a checkpoint.

    Stale temp folders are deleted (a temp folder is only complete once it is swapped in). If the
    checkpoint folder is missing but the renamed-away previous one exists, the kill came between
    the two renames, so the previous one is put back; if both exist, the old one is a leftover.
    """
    folder = Path(folder)
    if not folder.parent.is_dir():
        return
    for stale in folder.parent.iterdir():
        if stale.name.startswith(_tmp_prefix(folder)) and stale.is_dir() and not stale.is_symlink():
            remove_path(stale)
    old = _old_dir(folder)
    if old.exists():
        if folder.exists():
            remove_path(old)
        else:
            os.replace(old, folder)


def _save(tensors: dict, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(path))


def save_checkpoint(folder: Path, trainable: dict, best: dict | None, optimizer, state: dict,
                    best_unchanged: bool = False) -> None:
    """Write a complete checkpoint into a temp folder, then swap it in place of ``folder``.

    Args:
        folder: the checkpoint folder (see :func:`checkpoint_dir`).
        trainable: current trainable tensors.
        best: tensors with the best validation loss so far, or None.
        optimizer: the optimizer whose state (and the torch RNG state) is saved.
        state: JSON-able run state (step, best_val_loss, log, resume_key, loss-scaler state).
        best_unchanged: ``best`` is what the checkpoint in ``folder`` holds already: link that file
            instead of writing it again (written anyway when the old one cannot be reused).
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f"{_tmp_prefix(folder)}{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _save(trainable, tmp / TRAINABLE)
        known = {}
        if best is not None:
            digest = _reuse_best(folder, tmp / BEST) if best_unchanged else None
            if digest is None:
                _save(best, tmp / BEST)
            else:
                known[BEST] = digest
        opt_tensors, groups = optimizer_tensors(optimizer)
        opt_tensors["rng.torch"] = torch.get_rng_state()
        _save(opt_tensors, tmp / OPTIMIZER)
        files = {p.name: known.get(p.name) or sha256_file(p) for p in sorted(tmp.iterdir())}
        (tmp / STATE).write_text(json.dumps({**state, "param_groups": groups, "files": files}, indent=1, default=str))
        _swap(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _reuse_best(folder: Path, target: Path) -> str | None:
    """Link (or copy) ``folder``'s best file to ``target``; its recorded sha256, or None if not reusable.

    The recorded digest is carried over instead of re-hashing: should the old file have changed on
    disk since, the new checkpoint is refused as torn on load, exactly like the old one would be.
    """
    try:
        digest = json.loads((folder / STATE).read_text(encoding="utf-8"))["files"][BEST]
        if not isinstance(digest, str) or not (folder / BEST).is_file():
            return None
        try:
            os.link(folder / BEST, target)  # files are never rewritten in place, so sharing the inode is safe
        except OSError:
            shutil.copyfile(folder / BEST, target)
        return digest
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _swap(tmp: Path, folder: Path) -> None:
    # A fixed set-aside name (not a writer's tag): resuming reads the last good checkpoint from it
    # when a crash fell between the two renames (:func:`recover_checkpoint`).
    replace_folder(tmp, folder, _old_dir(folder))


def verified_state(folder: Path) -> dict:
    """``state.json`` of a checkpoint whose files all exist and match their recorded sha256.

    Raises:
        OffsiteError: the checkpoint is torn or corrupt (missing, extra, altered or truncated file).
    """
    folder = Path(folder)

    def torn(why: str) -> OffsiteError:
        return OffsiteError(f"{folder} is a torn or corrupt checkpoint ({why}); it will not be resumed: {_RESTART}")

    try:
        state = json.loads((folder / STATE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise torn(f"{STATE} is missing") from None
    except (OSError, ValueError) as exc:
        raise torn(f"{STATE} is unreadable: {exc}") from None
    files = state.get("files") if isinstance(state, dict) else None
    if not isinstance(files, dict) or not {TRAINABLE, OPTIMIZER} <= set(files) <= set(_TENSOR_FILES):
        raise torn(f"{STATE} does not list the sha256 of its tensor files (written by an older offsite?)")
    extra = sorted({p.name for p in folder.iterdir()} - set(files) - {STATE})
    if extra:
        raise torn(f"unlisted file(s) {extra}")
    for name, digest in files.items():
        if not (folder / name).is_file():
            raise torn(f"{name} is missing")
        if sha256_file(folder / name) != digest:
            raise torn(f"{name} does not match the sha256 recorded in {STATE}")
    return state


def _short(digest) -> str:
    return f"{digest[:12]}…" if isinstance(digest, str) else str(digest)


def _mismatch(saved, key: dict) -> list:
    """Why a checkpoint's resume key differs from this run's, one phrase per difference."""
    if not isinstance(saved, dict):
        return ["it records no resume key (written by an older offsite)"]
    reasons = []
    if saved.get("emulator") != key["emulator"]:
        reasons.append(f"it was made with another emulator (artifact_id {_short(saved.get('emulator'))}, "
                       f"now {_short(key['emulator'])})")
    for part, label in (("data", "training data"), ("val_data", "validation data")):
        if saved.get(part) != key[part]:
            reasons.append(f"the {label} changed since (file content sha256 {_short(saved.get(part))} then, "
                           f"{_short(key[part])} now)")
    old, new = saved.get("settings") or {}, key["settings"]
    # DP-SGD's settings are in a key only when it was on (finetune._resumable), so one side lacking them
    # all is a private run meeting a non-private one: said once, not as five settings that changed.
    was, now = ("dp_delta" in old), ("dp_delta" in new)
    if was != now:
        reasons.append("it was written by a DP-SGD run, and this run is not one" if was else
                       "it was written by a run without DP-SGD, whose steps no privacy accountant covers")
        old = {k: v for k, v in old.items() if not k.startswith("dp_")}
        new = {k: v for k, v in new.items() if not k.startswith("dp_")}
    changed = [f"{k} {old.get(k, '<unset>')} -> {new.get(k, '<unset>')}" for k in sorted(set(old) | set(new))
               if k not in old or k not in new or canonical_json(old[k]) != canonical_json(new[k])]
    if changed:
        reasons.append(f"it was made with different settings ({', '.join(changed)})")
    return reasons


def load_checkpoint(folder: Path, key: dict, params: dict, optimizer):
    """Restore a checkpoint into ``params`` and ``optimizer``; returns ``(state, best_tensors_or_None)``.

    Args:
        folder: the checkpoint folder.
        key: this run's :func:`run_key`.
        params: ``{name: parameter}`` to load the trainable tensors into.
        optimizer: optimizer to restore (the torch RNG state is restored too).

    Raises:
        OffsiteError: the checkpoint is torn or corrupt, or was made with another emulator, other
            data or other settings.
    """
    state = verified_state(folder)
    reasons = _mismatch(state.get("resume_key"), key)
    if reasons:
        raise OffsiteError(f"{folder} holds a checkpoint this run cannot resume: {'; '.join(reasons)}; {_RESTART}")
    trainable = load_tensors(folder / TRAINABLE)
    if set(trainable) != set(params) or any(trainable[n].shape != p.shape for n, p in params.items()):
        raise OffsiteError(f"{folder}: checkpoint tensors do not match the trainable parameters; {_RESTART}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(trainable[name])
    opt = load_tensors(folder / OPTIMIZER)
    torch.set_rng_state(opt.pop("rng.torch"))
    restore_optimizer(optimizer, opt, state.pop("param_groups"))
    return state, (load_tensors(folder / BEST) if BEST in state["files"] else None)


def remove_checkpoint(folder: Path) -> None:
    remove_path(Path(folder))
    remove_path(_old_dir(Path(folder)))


def diverged(step: int, what: str, folder: Path, saved_step: int | None, lr: float) -> OffsiteError:
    """The error that stops a run whose loss, gradients or weights stopped being finite.

    Args:
        step: the (1-based) optimizer step at which it was seen.
        what: what was non-finite, e.g. ``"loss is nan"``.
        folder: the checkpoint folder.
        saved_step: step of the last checkpoint this run wrote or resumed from, or None.
        lr: the peak learning rate in use.
    """
    if saved_step is None:
        return OffsiteError(f"training diverged at step {step}: {what}; no checkpoint of this run was written, "
                            f"nothing was saved; lower --lr (now {lr:g}) and run again")
    return OffsiteError(f"training diverged at step {step}: {what}; the last good checkpoint is at {folder} "
                        f"(step {saved_step}) and was kept, but it resumes only with the same settings, so "
                        f"lower --lr (now {lr:g}) and pass --no-resume to start over")
