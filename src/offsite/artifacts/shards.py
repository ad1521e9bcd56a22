"""Model weights in Hugging Face's sharded safetensors layout, written one shard at a time.

Why: the weights of a big model do not belong in one file. A 70B checkpoint is 140 GB in bf16;
one file that size is slow to hash, awkward to move, and writing it in one go would hold every
byte at once. Stock Hugging Face checkpoints split the weights into ``model-00001-of-0000N.
safetensors`` files plus ``model.safetensors.index.json`` (``{"metadata": {"total_size": bytes},
"weight_map": {tensor: file}}``); offsite writes the same layout, so a sharded plugged model still
loads with ``AutoModelForCausalLM.from_pretrained`` and no offsite code.

Shards are filled in state-dict order and closed before the next tensor would take them past
``max_shard_size`` (a tensor bigger than that gets a shard of its own, as in Hugging Face). Each
file is written tensor by tensor (:mod:`offsite.artifacts.stream_write`: the header first, then
each tensor's bytes, read right before they are written), bitwise what safetensors' ``save_file``
writes, so writing holds one tensor beyond the model itself, whatever the shard size. When everything fits in one
shard the file is ``model.safetensors`` with no index: small models are written exactly as before.

The manifest's ``tensors`` table has one entry per shard. The index is hashed like every file, and
:func:`check_layout` (run by every verified read) requires it to agree with that table: the same
shard files, numbered 1..N of N, each tensor mapped to the shard that holds it, the right total.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ..core.errors import ArtifactError, OffsiteError
from .stream_write import file_table, plan_header, specs_of, write_streamed
from .tensors import FILE_METADATA, save_tensors

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
SHARD = re.compile(r"model-(\d{5})-of-(\d{5})\.safetensors")
# Hugging Face's save_pretrained used 5 GB for years (it is 50 GB since v5); the smaller value keeps
# the memory a write holds at one shard small while big models still get only tens of files.
DEFAULT_MAX_SHARD_SIZE = "5GB"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", re.IGNORECASE)


def parse_size(value, what: str = "max_shard_size", minimum: int = 1) -> int:
    """Bytes in a size setting: a whole number, or a string such as ``"5GB"``, ``"500MiB"``.

    Units follow Hugging Face: ``KB``/``MB``/``GB``/``TB`` are powers of 1000, ``KiB``... of 1024.

    Args:
        value: the setting's value.
        what: its name, for the error.
        minimum: the smallest allowed size (1 for shards; 0 where nothing is a meaningful amount).

    Raises:
        OffsiteError: not a whole number of bytes >= ``minimum`` in one of those forms.
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise OffsiteError(f"{what} must be a number of bytes or a string like '5GB', got {value!r}")
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE.fullmatch(value)
        if not match:
            raise OffsiteError(f"{what} {value!r} is not a size; give bytes (e.g. 2000000000) or a number "
                               "with a unit: B, KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (1024)")
        size = int(float(match.group(1)) * _UNITS[(match.group(2) or "").upper()])
    if size < minimum:
        raise OffsiteError(f"{what} must be at least {minimum} byte{'s' if minimum != 1 else ''}, got {value!r}")
    return size


def nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def plan_shards(sizes: dict, max_bytes: int) -> list:
    """Group tensor names into shards of at most ``max_bytes`` (an oversized tensor alone), in order.

    Args:
        sizes: ``{name: bytes}`` in the order the tensors should be written.
        max_bytes: the shard size limit.

    Returns:
        A non-empty list of name lists, one per shard.
    """
    shards, current, used = [], [], 0
    for name, size in sizes.items():
        if current and used + size > max_bytes:
            shards.append(current)
            current, used = [], 0
        current.append(name)
        used += size
    shards.append(current)
    return shards


def shard_name(number: int, count: int) -> str:
    """File name of shard ``number`` (1-based) of ``count``; a single shard is ``model.safetensors``."""
    return WEIGHTS if count == 1 else f"model-{number:05d}-of-{count:05d}.safetensors"


def save_sharded(tensors: dict, folder, max_shard_size=DEFAULT_MAX_SHARD_SIZE, read=None) -> dict:
    """Write ``tensors`` into ``folder`` as one or more safetensors shards (plus the index when several).

    Args:
        tensors: ``{name: tensor}`` without aliases (see :func:`~offsite.artifacts.tensors.tensor_aliases`),
            on any device; each shard is copied to CPU only while it is written. Tensors on ``meta``
            are placeholders (their shape and dtype plan the shards) whose values ``read`` supplies.
        folder: the (staging) folder to write into.
        max_shard_size: bytes per shard, an int or a string like ``"5GB"`` (see :func:`parse_size`).
        read: ``read(names) -> {name: tensor}`` for the meta placeholders, called once per shard with
            the placeholders it holds (a streamed build reads them from disk: one shard's worth of
            values is in memory at a time). The files are the same as with real tensors.

    Returns:
        The manifest's tensor table: ``{file: {name: [dtype, shape]}}``, one entry per shard.
    """
    limit = parse_size(max_shard_size)
    groups = plan_shards({name: nbytes(t) for name, t in tensors.items()}, limit)
    table, weight_map = {}, {}
    for number, names in enumerate(groups, start=1):
        file = shard_name(number, len(groups))
        part = {name: tensors[name] for name in names}
        placeholders = [name for name, t in part.items() if t.is_meta]
        if placeholders and read is None:
            raise OffsiteError(f"tensor '{placeholders[0]}' has no values (it is on the meta device)")
        specs = specs_of(part)
        header = plan_header(specs, FILE_METADATA)
        if header is not None:  # one tensor in memory at a time, read right before it is written
            write_streamed(Path(folder) / file, specs,
                           lambda name: read([name])[name] if part[name].is_meta else part[name],
                           FILE_METADATA, header)
            table[file] = file_table(specs)
        else:  # a safetensors whose header this writer cannot reproduce: the shard at once
            if placeholders:
                part.update(read(placeholders))
            for name, (dtype, shape) in specs.items():
                if part[name].dtype != dtype or tuple(part[name].shape) != shape:
                    raise OffsiteError(f"tensor '{name}' was read as {part[name].dtype} {list(part[name].shape)}, "
                                       f"expected {dtype} {list(shape)}")
            table[file] = save_tensors(part, Path(folder) / file)
        part = None  # this shard's values are on disk
        weight_map.update(dict.fromkeys(names, file))
    if len(groups) > 1:
        index = {"metadata": {"total_size": sum(nbytes(t) for t in tensors.values())},
                 "weight_map": dict(sorted(weight_map.items()))}
        (Path(folder) / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return table


def _entry_bytes(entry: list, where) -> int:
    try:
        dtype = getattr(torch, entry[0])
        if not isinstance(dtype, torch.dtype):
            raise TypeError
        size = torch.empty((), dtype=dtype).element_size()
    except (AttributeError, TypeError, RuntimeError):
        raise ArtifactError(f"{where}: dtype {entry[0]!r} in the tensor table is not a torch dtype") from None
    count = 1
    for d in entry[1]:
        count *= d
    return count * size


def check_layout(root, manifest: dict) -> None:
    """Require a sharded folder's index to agree with the manifest's tensor table (no-op otherwise).

    Allowed layouts: no shard files and no index (one weight file, or an artifact whose weights have
    other names), or shards ``model-i-of-N.safetensors`` for exactly i = 1..N, with N >= 2, no
    ``model.safetensors``, and ``model.safetensors.index.json`` mapping every tensor of the table to
    the shard that holds it, and nothing else, with ``metadata.total_size`` the bytes of all tensors.
    Run after the file hashes are checked, so the index read is the one the manifest covers.

    Raises:
        ArtifactError: shards without an index, an index without shards, a missing, extra or
            misnumbered shard, or an index that names a tensor the table does not put in that file.
    """
    root = Path(root)
    tables = manifest["tensors"]
    shards = sorted(rel for rel in tables if SHARD.fullmatch(rel))
    if INDEX not in manifest["files"]:
        if shards:
            raise ArtifactError(f"{root}: holds shard files {shards[:3]} but no {INDEX}; a sharded checkpoint "
                                "needs its index")
        return
    count = len(tables)
    expected = [shard_name(i, count) for i in range(1, count + 1)] if count >= 2 else []
    if sorted(tables) != expected:
        raise ArtifactError(f"{root}: {INDEX} needs the weight files to be shards model-00001-of-N.safetensors .. "
                            f"model-N-of-N.safetensors with N >= 2 and nothing else; the folder has {sorted(tables)}")
    where = root / INDEX
    try:
        index = json.loads((root / INDEX).read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ArtifactError(f"{where} is not valid UTF-8 JSON ({type(exc).__name__})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    metadata = index.get("metadata") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()) \
            or not isinstance(metadata, dict):
        raise ArtifactError(f"{where} must be an object with 'metadata' (an object) and 'weight_map' "
                            "(tensor name -> shard file)")
    held = {}
    for rel, table in sorted(tables.items()):
        for name in table:
            if name in held:
                raise ArtifactError(f"{root}: tensor '{name}' is in two shards, '{held[name]}' and '{rel}'")
            held[name] = rel
    for name, rel in sorted(weight_map.items()):
        if name not in held:
            raise ArtifactError(f"{where}: names tensor '{name}', which no shard holds")
        if rel != held[name]:
            raise ArtifactError(f"{where}: maps tensor '{name}' to '{rel}', but it is in '{held[name]}'")
    unmapped = sorted(set(held) - set(weight_map))
    if unmapped:
        raise ArtifactError(f"{where}: does not map {len(unmapped)} tensor(s) the shards hold, e.g. {unmapped[:3]}")
    total = sum(_entry_bytes(entry, root / rel) for rel, table in tables.items() for entry in table.values())
    if metadata.get("total_size") != total:
        raise ArtifactError(f"{where}: metadata.total_size is {metadata.get('total_size')!r}, the shards hold "
                            f"{total} bytes")


def weight_files(manifest: dict) -> list:
    """The weight files of a model artifact in shard order (``[model.safetensors]`` when unsharded)."""
    return sorted(manifest["tensors"])
