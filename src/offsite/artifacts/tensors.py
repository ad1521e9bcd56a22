"""Safetensors I/O with the checks an artifact must pass before its tensors touch a model.

Loading assigns the file's tensors into a skeleton whose parameters live on the ``meta`` device
(:func:`load_into` with ``assign=True``): no random initialisation, no second copy of the weights.
Aliases (tied weights: an LM head tied to the embeddings, decoder layers that share one set of
parameters) are stored once, under the first name ``state_dict`` gives them, and re-tied on load.
"""

from __future__ import annotations

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..core.errors import ArtifactError
from ..core.precision import dtype_name


def _alias_key(name: str, tensor: torch.Tensor) -> tuple:
    """What makes two state-dict entries one tensor: the same storage, or, on meta, the same object."""
    if not tensor.numel():
        return ("name", name)  # empty tensors may share a null pointer without being aliases
    if tensor.is_meta:
        return ("object", id(tensor))  # meta tensors have no storage: every data_ptr is 0
    return ("storage", str(tensor.device), tensor.data_ptr(), tensor.dtype, tuple(tensor.shape))


def tensor_aliases(module: torch.nn.Module) -> tuple:
    """The distinct tensors of ``module.state_dict()`` and the names that alias them.

    Returns:
        ``(distinct, aliases)``: ``distinct`` is ``{name: tensor}`` in state-dict order, each tensor
        under its first name, still on its device and still the module's own object (a Parameter
        or buffer, not detached); ``aliases`` is ``{alias name: distinct name}``.
    """
    first, distinct, aliases = {}, {}, {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        key = _alias_key(name, tensor)
        if key in first:
            aliases[name] = first[key]
        else:
            first[key] = name
            distinct[name] = tensor
    return distinct, aliases


def unique_state_dict(module: torch.nn.Module) -> dict:
    """``state_dict`` without aliases: a tied tensor is kept under its first name only.

    Returns:
        ``{name: contiguous cpu tensor}``; e.g. GPT-2 keeps ``transformer.wte.weight`` and drops
        ``lm_head.weight``, as ``save_pretrained`` does.
    """
    distinct, _ = tensor_aliases(module)
    return {name: tensor.detach().to("cpu").contiguous() for name, tensor in distinct.items()}


FILE_METADATA = {"format": "pt"}  # what transformers writes and expects in a checkpoint's header


def save_tensors(tensors: dict, path, metadata: dict | None = None) -> dict:
    """Write tensors to a safetensors file; return ``{name: [dtype, shape]}`` for the manifest."""
    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    save_file(clean, str(path), metadata={**FILE_METADATA, **(metadata or {})})
    return tensor_index(clean)


def tensor_index(tensors: dict) -> dict:
    return {k: [dtype_name(v.dtype), list(v.shape)] for k, v in sorted(tensors.items())}


def load_tensors(path) -> dict:
    """Read every tensor of a safetensors file (never pickle), refusing unreadable files."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for truncated/garbled headers
        raise ArtifactError(f"{path}: not a readable safetensors file ({exc})") from None


_FINITE_CHUNK = 1 << 22


def all_finite(t: torch.Tensor) -> bool:
    """Whether a tensor has no NaN or infinite value (non-floating tensors always pass).

    Checked a chunk of 4M entries at a time: ``isfinite`` on a whole bf16 embedding would allocate its
    fp32 upcast and a bool mask, several times the tensor, which a streamed build cannot afford.
    """
    if not t.is_floating_point():
        return True
    flat = t.detach().reshape(-1)
    return all(bool(torch.isfinite(flat[i:i + _FINITE_CHUNK]).all()) for i in range(0, flat.numel(), _FINITE_CHUNK))


def first_nonfinite(tensors: dict) -> str | None:
    """Name of the first floating tensor with a NaN or infinite value, or None when all are finite.

    For small trained tensors checked every step: one stacked check costs one device sync; a large
    tensor read from disk goes through :func:`all_finite`, which bounds the memory instead.
    """
    floats = {k: t for k, t in tensors.items() if t.is_floating_point()}
    if not floats:
        return None
    # One stacked check costs a single device sync instead of one per tensor.
    ok = torch.stack([torch.isfinite(t.detach()).all() for t in floats.values()]).tolist()
    return next((name for name, good in zip(floats, ok) if not good), None)


def check_finite(tensors: dict, where) -> None:
    """Refuse NaN or infinite values in floating tensors."""
    for name, t in tensors.items():
        if not all_finite(t):
            raise ArtifactError(f"{where}: tensor '{name}' contains NaN or infinite values")


def check_against(tensors: dict, expected: dict, where) -> None:
    """Compare a tensor dict with the expected ``{name: shape}``: same keys, same shapes.

    Raises:
        ArtifactError: listing missing keys, extra keys, or the first shape mismatches.
    """
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s) e.g. {missing[:3]}")
        if extra:
            parts.append(f"unexpected {len(extra)} tensor(s) e.g. {extra[:3]}")
        raise ArtifactError(f"{where}: {'; '.join(parts)}")
    bad = [(k, list(tensors[k].shape), list(expected[k])) for k in sorted(expected)
           if tuple(tensors[k].shape) != tuple(expected[k])]
    if bad:
        k, got, want = bad[0]
        raise ArtifactError(f"{where}: tensor '{k}' has shape {got}, expected {want} ({len(bad)} mismatch(es))")


def check_table(tensors: dict, table: dict, where) -> None:
    """Compare a file's tensors with its manifest table ``{name: [dtype, shape]}``: names, shapes, dtypes.

    Raises:
        ArtifactError: naming the first missing, extra or mismatching tensor.
    """
    check_against(tensors, {k: v[1] for k, v in table.items()}, where)
    wrong = [k for k, v in sorted(table.items()) if dtype_name(tensors[k].dtype) != v[0]]
    if wrong:
        raise ArtifactError(f"{where}: tensor '{wrong[0]}' has dtype {str(tensors[wrong[0]].dtype)[6:]}, the "
                            f"manifest says {table[wrong[0]][0]}")


def _owner(module: torch.nn.Module, name: str) -> tuple:
    path, _, attr = name.rpartition(".")
    return (module.get_submodule(path) if path else module), attr


def _put(module: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    """Make state-dict entry ``name`` of ``module`` the very object ``value`` (a parameter or a buffer)."""
    owner, attr = _owner(module, name)
    if attr in owner._parameters:
        owner._parameters[attr] = value
    else:
        owner._buffers[attr] = value


def load_into(module: torch.nn.Module, tensors: dict, where, assign: bool = False) -> None:
    """Strictly load ``tensors`` into ``module`` (aliases of tied weights may be absent), then re-tie.

    Every distinct state-dict entry (see :func:`tensor_aliases`) must be present with the same
    shape, nothing extra is allowed, and all values must be finite.

    Args:
        module: the model; with ``assign`` a skeleton whose parameters may be on the ``meta`` device.
        tensors: ``{name: tensor}``, e.g. from :func:`load_tensors`.
        where: the file(s) they came from, for messages.
        assign: make the tensors the module's parameters and buffers (no copy, no cast; the dtype
            must then be the skeleton's) instead of copying values into existing ones.

    Raises:
        ArtifactError: a missing, extra, misshaped, mistyped or non-finite tensor, or (with
            ``assign``) an entry left on the ``meta`` device.
    """
    distinct, aliases = tensor_aliases(module)
    check_against(tensors, {k: tuple(v.shape) for k, v in distinct.items()}, where)
    if assign:
        wrong = [k for k, v in distinct.items() if tensors[k].dtype != v.dtype]
        if wrong:
            k = wrong[0]
            raise ArtifactError(f"{where}: tensor '{k}' is {str(tensors[k].dtype)[6:]}, the architecture has "
                                f"{str(distinct[k].dtype)[6:]} ({len(wrong)} mismatch(es))")
    check_finite(tensors, where)
    result = module.load_state_dict(tensors, strict=False, assign=assign)
    leftover = [k for k in result.missing_keys if k not in aliases]
    if leftover or result.unexpected_keys:
        raise ArtifactError(f"{where}: could not load {leftover or result.unexpected_keys}")
    if assign:  # assigning replaced the canonical objects only; point every alias at them again
        state = module.state_dict(keep_vars=True)
        for alias, name in aliases.items():
            _put(module, alias, state[name])
    if hasattr(module, "tie_weights"):
        module.tie_weights()
    if assign:
        everything = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
        empty = [k for k, v in everything if v is not None and v.is_meta]
        if empty:
            raise ArtifactError(f"{where}: {len(empty)} tensor(s) of the architecture got no value, e.g. "
                                f"'{empty[0]}'; the weight files do not cover this model")
