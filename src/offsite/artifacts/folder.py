"""Artifact folders: files + ``manifest.json``, written atomically, verified on every load.

Every output of offsite (emulator package, adapter, LoRA adapter, plugged model, PEFT export) is a
folder. It is assembled in a hidden sibling temp folder; ``manifest.json`` (with the sha256 of
every other file) is written last, then the folder is swapped into place: an existing artifact is
renamed aside first and deleted only once the new one is in place, so a kill at any moment leaves
either the old or the new artifact at the destination, never neither. Leftovers of killed runs
(``.NAME.tmp-PID-*`` and ``.NAME.old-PID-*``) are cleaned, or the old artifact restored, by the
next run that writes to the same place.

``--overwrite`` never deletes what it was not asked to replace: the destination must not be an
input of the command, lie inside one, contain one, be the current folder or one of its parents,
and it must already be an artifact of the same kind (or an empty folder).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import stat
import time
import uuid
from pathlib import Path

from .. import __version__
from ..core.errors import ArtifactError, OffsiteError
from .manifest import KINDS, MANIFEST, SCHEMA_VERSION, artifact_id
from .shards import check_layout
from .signing import load_private_key, sign_manifest


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def list_files(root: Path) -> list:
    """Relative paths of the regular files under ``root`` (manifest excluded), never following links.

    Raises:
        ArtifactError: a symlink or a special file is present (it could point outside the folder).
    """
    found = []
    for folder, dirs, names in os.walk(root, followlinks=False):
        for name in dirs + names:
            full = Path(folder) / name
            mode = os.lstat(full).st_mode
            rel = full.relative_to(root).as_posix()
            if stat.S_ISLNK(mode):
                raise ArtifactError(f"{root}: '{rel}' is a symbolic link; artifacts may hold only regular files")
            if name in names and not stat.S_ISREG(mode):
                raise ArtifactError(f"{root}: '{rel}' is not a regular file")
            if name in names and rel != MANIFEST:
                found.append(rel)
    return sorted(found)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_leftovers(out: Path) -> None:
    """Remove temp folders of killed writers of ``out``; restore an old artifact a killed swap set aside.

    Only names this module makes are touched (``.NAME.tmp-PID-8hex`` / ``.NAME.old-PID-8hex``, matched
    exactly, never as a glob), and only when process PID is gone.
    """
    pattern = re.compile(re.escape(f".{out.name}.") + r"(tmp|old)-(\d+)-[0-9a-f]{8}")
    for leftover in sorted(out.parent.iterdir()):
        match = pattern.fullmatch(leftover.name)
        if not match or leftover.is_symlink() or not leftover.is_dir():
            continue
        pid = int(match.group(2))
        if _alive(pid) and pid != os.getpid():
            continue  # its writer is still running
        if match.group(1) == "old" and not out.exists():
            os.replace(leftover, out)  # killed between the two renames of a swap: the old one is the artifact
            print(f"restored {out} from the interrupted overwrite that left {leftover.name}")
        else:
            shutil.rmtree(leftover, ignore_errors=True)


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def overlapping_input(path, inputs) -> tuple:
    """The first input that ``path`` is, lies in, or contains: ``(input, "inside" | "contains")``.

    Inputs that are None or do not exist (hub ids, absent optional files) are skipped; returns
    ``(None, None)`` when nothing overlaps. Every writer checks its destination with this.
    """
    target = Path(path).absolute().resolve()
    for given in inputs:
        if given is None or not Path(given).exists():
            continue
        source = Path(given).resolve()
        if _inside(target, source):
            return given, "inside"
        if _inside(source, target):
            return given, "contains"
    return None, None


def refuse_overlap(folder: Path, inputs, label: str) -> None:
    """Refuse a folder that is, lies in or contains one of ``inputs`` (``label`` names it in the error)."""
    given, relation = overlapping_input(folder, inputs)
    if relation == "inside":
        raise OffsiteError(f"{label} {folder} is (inside) the input {given}; writing there would damage the input — "
                           "pick a folder outside it")
    if relation == "contains":
        raise OffsiteError(f"{label} {folder} contains the input {given}; pick another folder")


def guard_output(out: Path, kind: str, overwrite: bool, inputs=()) -> None:
    """Refuse a destination that writing (or overwriting) would damage; see the module docstring."""
    if out.is_symlink():
        raise OffsiteError(f"output {out} is a symbolic link; give a real folder path")
    parent = next((p for p in out.absolute().parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise OffsiteError(f"output {out} cannot be created: {parent} is a file, not a folder")
    if out.exists() and not out.is_dir():
        raise OffsiteError(f"output {out} is a file, not a folder; pick a folder path")
    target = out.resolve()
    refuse_overlap(out, inputs, "output")
    if not out.exists() or not any(out.iterdir()):
        return
    if _inside(Path.cwd().resolve(), target):
        raise OffsiteError(f"output {out} is the current folder or one of its parents; pick a new folder")
    if not overwrite:
        raise OffsiteError(f"output folder {out} already exists and is not empty; pass --overwrite or pick another")
    try:
        existing = json.loads((out / MANIFEST).read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        existing = None
    if existing != kind:
        what = f"a '{existing}' artifact" if existing else "not an offsite artifact"
        raise OffsiteError(f"--overwrite replaces only an existing '{kind}' artifact, and {out} is {what}; "
                           "delete it yourself if you mean to, or pick another folder")


@contextlib.contextmanager
def writing_artifact(out_dir, kind: str, overwrite: bool = False, inputs=(), sign_key=None):
    """Yield a temp folder to fill; on success hash it, write the manifest last, swap it into place.

    The caller fills ``staging.path`` with files and ``staging.manifest`` (a dict) with metadata;
    ``staging.run`` (a dict) holds fields of this run (timings) kept out of the identity.
    On any exception the temp folder is removed and ``out_dir`` is left untouched.

    Args:
        out_dir: destination folder.
        kind: one of :data:`KINDS`.
        overwrite: replace an existing artifact of the same kind.
        inputs: paths the command reads, which the output must neither be, contain nor lie in.
        sign_key: path of an Ed25519 private key to sign the artifact with, or None (unsigned).

    Raises:
        OffsiteError: the destination is refused (see :func:`guard_output`), or the disk failed.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown artifact kind {kind!r}")
    out = Path(out_dir)
    if out.parent.is_dir():
        clean_leftovers(out)  # first: a restored old artifact is then guarded like any existing one
    guard_output(out, kind, overwrite, inputs)
    signer = None
    if sign_key is not None:
        signer = load_private_key(sign_key)  # a bad key fails before any work is written
    tmp = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp = out.parent / f".{out.name}.tmp-{tag}"
        tmp.mkdir()
        staging = _Staging(tmp)
        yield staging
        files = {rel: sha256_file(tmp / rel) for rel in list_files(tmp)}
        manifest = {"kind": kind, "schema_version": SCHEMA_VERSION, "offsite_version": __version__,
                    **staging.manifest, "files": files}
        manifest["artifact_id"] = artifact_id(manifest)
        manifest["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        if staging.run:
            manifest["run"] = staging.run
        if signer is not None:
            manifest["signature"] = sign_manifest(manifest, signer)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False, default=str) + "\n")
        _swap(tmp, out, tag)
    except OSError as exc:
        reason = "no space left on device" if exc.errno == errno.ENOSPC else exc.strerror or str(exc)
        raise OffsiteError(f"could not write {out}: {reason} ({exc.filename or out}); nothing was written "
                           "and any previous artifact there is unchanged") from None
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def fsync_tree(root: Path) -> None:
    """Flush every file under ``root``, and the folders holding them, to the disk.

    A rename is atomic in the namespace, not on the disk: after a power loss the renamed folder can
    hold files of zero length unless their data reached the disk before the rename (ext4, XFS).
    Called on a staged folder right before it is swapped into place; :func:`fsync_dir` on the
    parent afterwards makes the rename itself durable.
    """
    for folder, _, names in os.walk(root):
        for name in names:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(folder))


def fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (renames, new files); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows: no directory handles; NTFS journals the rename itself
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory; the files themselves are flushed
    finally:
        os.close(fd)


def replace_folder(new: Path, out: Path, old: Path) -> None:
    """Move folder ``new`` to ``out``; an existing ``out`` is renamed to ``old`` first and removed only afterwards.

    The one folder swap of offsite (artifacts, prepared models, training checkpoints). ``new`` is
    flushed to the disk first and renamed after, so a crash leaves the old folder (at ``out``, or
    at ``old`` between the two renames: the reader restores or resumes from it) or the whole new
    one, never a new one with empty files. A failed second rename puts the old folder back. An
    ``old`` left by an earlier crash while ``out`` exists is stale (``out`` is the good one) and
    is removed first; while ``out`` is missing it stays the last good folder until ``new`` is in.
    """
    fsync_tree(new)
    if out.exists():
        if old.exists() or old.is_symlink():
            remove_path(old)
        os.replace(out, old)
        try:
            os.replace(new, out)
        except BaseException:
            os.replace(old, out)  # put the old folder back; a hard kill here is undone by the reader
            raise
    else:
        os.replace(new, out)
    fsync_dir(out.parent)
    if old.exists() or old.is_symlink():
        remove_path(old)


def remove_path(path: Path) -> None:
    """Remove a folder tree, a file or a link (a link is removed, never followed); nothing there is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _swap(new: Path, out: Path, tag: str) -> None:
    """:func:`replace_folder` with a set-aside name that :func:`clean_leftovers` recognises."""
    replace_folder(new, out, out.parent / f".{out.name}.old-{tag}")


@contextlib.contextmanager
def atomic_folder(out):
    """Yield a hidden temp folder next to ``out``; on success it replaces ``out`` (see :func:`_swap`).

    For folders that are not artifacts (a prepared real model): no manifest, no guard. An exception
    or a kill leaves ``out`` as it was; a killed writer's temp folder is removed by the next one
    (:func:`clean_leftovers`).
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(out)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = out.parent / f".{out.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        yield tmp
        _swap(tmp, out, tag)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


class _Staging:
    def __init__(self, path: Path):
        self.path = path
        self.manifest: dict = {}
        self.run: dict = {}


def verify_files(path, manifest: dict) -> None:
    """Check that the folder holds exactly the manifest's files with the recorded sha256, and that a
    sharded checkpoint's index agrees with the tensor table (:func:`~offsite.artifacts.shards.check_layout`).

    Raises:
        ArtifactError: a file is missing, unlisted, a symlink, or its content changed; or the shard
            index disagrees with the manifest.
    """
    root = Path(path)
    present = set(list_files(root))
    listed = set(manifest["files"])
    if listed - present:
        raise ArtifactError(f"{root}: files listed in the manifest are missing: {sorted(listed - present)}")
    if present - listed:
        raise ArtifactError(f"{root}: files not listed in the manifest are present: {sorted(present - listed)}")
    for rel, digest in manifest["files"].items():
        actual = sha256_file(root / rel)
        if actual != digest:
            raise ArtifactError(f"{root / rel}: sha256 {actual[:12]}… does not match the manifest ({digest[:12]}…); "
                                "the file was modified or corrupted")
    check_layout(root, manifest)
