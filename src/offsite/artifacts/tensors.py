"""Safetensors I/O with the checks an artifact must pass before its tensors touch a model."""

from __future__ import annotations

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import ArtifactError


def unique_state_dict(module: torch.nn.Module) -> dict:
    """``state_dict`` without aliases: a tied tensor is kept under its first name only.

    Returns:
        ``{name: contiguous cpu tensor}``; e.g. GPT-2 keeps ``transformer.wte.weight`` and drops
        ``lm_head.weight``, as ``save_pretrained`` does.
    """
    seen, out = set(), {}
    for name, tensor in module.state_dict().items():
        key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape)) if tensor.numel() else (name,)
        if key in seen:
            continue
        seen.add(key)
        out[name] = tensor.detach().to("cpu").contiguous()
    return out


def save_tensors(tensors: dict, path, metadata: dict | None = None) -> dict:
    """Write tensors to a safetensors file; return ``{name: [dtype, shape]}`` for the manifest."""
    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    save_file(clean, str(path), metadata={"format": "pt", **(metadata or {})})
    return tensor_index(clean)


def tensor_index(tensors: dict) -> dict:
    return {k: [str(v.dtype).replace("torch.", ""), list(v.shape)] for k, v in sorted(tensors.items())}


def load_tensors(path) -> dict:
    """Read every tensor of a safetensors file (never pickle), refusing unreadable files."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for truncated/garbled headers
        raise ArtifactError(f"{path}: not a readable safetensors file ({exc})") from None


def check_finite(tensors: dict, where) -> None:
    """Refuse NaN or infinite values in floating tensors."""
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
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


def load_into(module: torch.nn.Module, tensors: dict, where) -> None:
    """Strictly load ``tensors`` into ``module`` (aliases of tied weights may be absent), then re-tie.

    Every non-alias state-dict entry must be present with the same shape, nothing extra is allowed,
    and all values must be finite.
    """
    expected = {k: tuple(v.shape) for k, v in unique_state_dict(module).items()}
    check_against(tensors, expected, where)
    check_finite(tensors, where)
    result = module.load_state_dict(tensors, strict=False)
    leftover = [k for k in result.missing_keys if k in expected]
    if leftover or result.unexpected_keys:
        raise ArtifactError(f"{where}: could not load {leftover or result.unexpected_keys}")
    if hasattr(module, "tie_weights"):
        module.tie_weights()
