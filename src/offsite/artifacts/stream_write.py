"""A safetensors file written one tensor at a time: the header first, then each tensor's bytes.

Why: ``safetensors.torch.save_file`` takes every tensor of the file at once, so writing a 5 GB
shard of a streamed build (whose tensors are read back from the base model's files) held the whole
shard in memory. A safetensors file is ``[u64 little-endian header length][JSON header][data]``,
and the header holds only names, dtypes, shapes and byte offsets, all known before any value is
read; so the header can be written first and the values appended one by one, each read (or
produced) right before it is written and dropped right after. Writing then holds one tensor,
whatever the shard size.

The files must be bitwise the ones ``save_file`` writes (artifact ids are hashes of them). Two
things decide the bytes: the order of the tensors (safetensors sorts by dtype, then name) and the
header's JSON text. Neither is re-implemented from the format's source: both are read off the
installed safetensors by saving one-element stand-ins of the same names and dtypes (a few bytes
each), and the header rendered here is checked against that stand-in file's header before it is
used. If the check ever fails (a future safetensors formats its header differently),
:func:`plan_header` returns None and the caller writes the classic way.
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Callable

import torch
from safetensors.torch import save as save_bytes

from ..core.errors import OffsiteError
from ..core.precision import dtype_name

_ALIGN = 8  # safetensors pads the header with spaces so the data starts 8-byte aligned


def _render(metadata: dict | None, entries: list) -> bytes:
    """Header bytes (length prefix included) for ``entries`` = [(name, dtype code, shape, begin, end)]."""
    head = {}
    if metadata:
        head["__metadata__"] = metadata
    for name, code, shape, begin, end in entries:
        head[name] = {"dtype": code, "shape": list(shape), "data_offsets": [begin, end]}
    text = json.dumps(head, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % _ALIGN)
    return struct.pack("<Q", len(text)) + text


def _read_header(blob: bytes) -> dict:
    (length,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + length].decode("utf-8"))


def plan_header(specs: dict, metadata: dict | None = None) -> tuple | None:
    """The order and header bytes ``save_file`` would write for tensors of these names and types.

    Args:
        specs: ``{name: (dtype, shape)}`` (torch dtypes, tuples of ints).
        metadata: the file's ``__metadata__`` (string values).

    Returns:
        ``(order, header)``: names in the order their bytes follow the header, and the header bytes
        with their length prefix; or None when the rendering here does not reproduce the installed
        safetensors' own header for the stand-ins (write the classic way then).
    """
    stand_ins = {name: torch.zeros(1, dtype=dtype) for name, (dtype, _) in specs.items()}
    probe = _read_header(save_bytes(stand_ins, metadata=metadata))
    order = [name for name in probe if name != "__metadata__"]
    codes = {name: probe[name]["dtype"] for name in order}
    # Check the renderer on the stand-ins themselves: same names, codes and metadata, one element each.
    offsets, entries = 0, []
    for name in order:
        size = stand_ins[name].element_size()
        entries.append((name, codes[name], (1,), offsets, offsets + size))
        offsets += size
    expected = save_bytes(stand_ins, metadata=metadata)
    if _render(metadata, entries) != expected[:len(expected) - offsets]:
        return None
    offsets, entries = 0, []
    for name in order:
        dtype, shape = specs[name]
        size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        entries.append((name, codes[name], tuple(shape), offsets, offsets + size))
        offsets += size
    return order, _render(metadata, entries)


def write_streamed(path, specs: dict, produce: Callable[[str], torch.Tensor], metadata: dict | None = None,
                   header: tuple | None = None) -> str:
    """Write a safetensors file tensor by tensor; return the file's sha256, hashed on the way.

    Args:
        path: the file to write.
        specs: ``{name: (dtype, shape)}`` of every tensor.
        produce: ``produce(name) -> tensor`` of that dtype and shape (on any device); called once per
            name, in file order, right before its bytes are written; the result is dropped after.
        metadata: the file's ``__metadata__``.
        header: a :func:`plan_header` result for these specs (planned here when omitted).

    Raises:
        OffsiteError: a produced tensor does not match its spec, or the header cannot be planned.
    """
    header = header or plan_header(specs, metadata)
    if header is None:
        raise OffsiteError("this safetensors version writes headers offsite cannot reproduce; "
                           "write the file with save_file instead")
    order, head = header
    digest = hashlib.sha256(head)
    with open(path, "wb") as f:
        f.write(head)
        for name in order:
            tensor = produce(name)
            dtype, shape = specs[name]
            if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                raise OffsiteError(f"tensor '{name}' was read as {tensor.dtype} {list(tensor.shape)}, "
                                   f"expected {dtype} {list(shape)}")
            flat = tensor.detach().to("cpu").contiguous().reshape(-1)
            data = memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else b""
            f.write(data)
            digest.update(data)
            del tensor, flat, data  # one tensor's bytes at a time
    return digest.hexdigest()


def specs_of(tensors: dict) -> dict:
    """``{name: (dtype, shape)}`` of tensors (real or on ``meta``)."""
    return {name: (t.dtype, tuple(t.shape)) for name, t in tensors.items()}


def file_table(specs: dict) -> dict:
    """The manifest's tensor table of one file, ``{name: [dtype, shape]}`` sorted by name."""
    return {name: [dtype_name(dtype), list(shape)] for name, (dtype, shape) in sorted(specs.items())}


__all__ = ["plan_header", "write_streamed", "specs_of", "file_table"]
