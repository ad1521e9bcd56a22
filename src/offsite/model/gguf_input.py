"""GGUF files as model inputs: ``--model FILE.gguf`` wherever a model is read into memory.

A ``.gguf`` file (llama.cpp's format, often quantized, e.g. Q4_1) is read with transformers' GGUF
loader (it needs the ``gguf`` package: ``pip install 'offsite[gguf]'``) and **dequantised**: the
model offsite works on is an ordinary transformers model whose weights are the file's dequantised
values, in fp32 unless another dtype is asked for. transformers marks a GGUF-loaded model as
quantized (``quantization_config``, a quantizer that refuses ``save_pretrained``); here its state
dict is moved into a fresh model built from a plain config without ``quantization_config``, so
nothing downstream (emulator packages, plugged folders) thinks it is quantized.

The base model's identity (:func:`offsite.model.identity.model_identity`) is fingerprinted over the
dequantised fp32 values, the form :func:`convert_gguf` writes as a folder: a ``.gguf`` and its
fp32 conversion are the same base model, so an adapter made against one plugs into the other. The
manifest also records where the weights came from (:func:`gguf_source`: file name, size, sha256,
llama.cpp file type and tensor types). Fingerprint and source are cached per file state, like
checkpoint fingerprints, so a 4 GB file is hashed once.

Workflows that read a checkpoint's ``.safetensors`` files in place (``--stream``) cannot take a
``.gguf`` file; :func:`refuse_stream` says so and what to do.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch

from ..artifacts import unique_state_dict
from ..artifacts.folder import atomic_folder, sha256_file
from ..core.errors import OffsiteError
from ..families import get_family
from .dtypes import no_init_weights, resolve_dtype
from .fingerprint import cache_fingerprint, cached_fingerprint, weight_fingerprint

SUFFIX = ".gguf"
INSTALL_HINT = "pip install 'offsite[gguf]' (or pip install 'gguf>=0.10')"


def is_gguf(name_or_path) -> bool:
    """Whether a ``--model`` argument names a GGUF file (by its suffix; hub ids never end in .gguf)."""
    return str(name_or_path).lower().endswith(SUFFIX)


def _checked(path) -> Path:
    """The file, after checking it exists and that the ``gguf`` package is importable."""
    file = Path(path)
    if not file.is_file():
        raise OffsiteError(f"{path}: no such .gguf file")
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise OffsiteError(f"reading {file.name} needs the gguf package: {INSTALL_HINT}") from None
    return file


def _from_pretrained(loader, path: Path, **kwargs):
    """``loader.from_pretrained(folder, gguf_file=name)``, its failures as one clear error."""
    try:
        return loader.from_pretrained(str(path.parent), gguf_file=path.name, **kwargs)
    except (ValueError, KeyError, NotImplementedError, OSError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise OffsiteError(f"{path}: transformers cannot read this GGUF file ({first})") from None


def gguf_config(path):
    """The model config stored in a GGUF file, as a plain (unquantized) transformers config.

    Args:
        path: the ``.gguf`` file.

    Returns:
        A ``PretrainedConfig`` of the file's architecture, without ``quantization_config``.
    """
    from transformers import AutoConfig

    return _plain(_from_pretrained(AutoConfig, _checked(path)), path)


def _plain(config, path):
    """A copy of ``config`` without ``quantization_config``, naming ``path`` as where it came from."""
    from transformers import AutoConfig

    values = config.to_dict()
    values.pop("quantization_config", None)
    plain = AutoConfig.for_model(values.pop("model_type"), **values)
    plain._name_or_path = str(path)  # what a model built from it names as its source (its tokenizer too)
    return plain


def gguf_tokenizer(path):
    """The tokenizer described by a GGUF file's metadata, or ``None`` when it has none transformers reads."""
    from transformers import AutoTokenizer

    file = _checked(path)
    try:
        return AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
    except (OSError, ValueError, TypeError, KeyError):
        return None


def dequantised_model(path):
    """The model in a GGUF file, dequantised to fp32, as a plain transformers model (no quantizer).

    Returns:
        The model in eval mode on CPU; ``model.config`` has no ``quantization_config``.

    Raises:
        OffsiteError: the file is missing, unreadable, of an unsupported architecture, or its
            tensors do not fill the model.
    """
    from transformers import AutoModelForCausalLM

    file = _checked(path)
    loaded = _from_pretrained(AutoModelForCausalLM, file, dtype=torch.float32)
    config = _plain(loaded.config, path)
    get_family(config)
    state = loaded.state_dict()
    del loaded
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {name for name, _ in _tied_names(model)}
    if unexpected or set(missing) - tied:
        raise OffsiteError(f"{file}: its tensors do not match a {config.model_type} model (missing "
                           f"{sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]})")
    model.tie_weights()
    return model.eval()


def _tied_names(model):
    """``(name, tensor)`` of the parameters that alias another one (a tied ``lm_head.weight``)."""
    seen, out = {}, []
    for name, tensor in model.state_dict(keep_vars=True).items():
        if tensor.data_ptr() in seen:
            out.append((name, tensor))
        seen.setdefault(tensor.data_ptr(), name)
    return out


def load_gguf(path, dtype="auto", device: str | None = None):
    """Load a GGUF file for offsite's workflows: ``(model, tokenizer_or_None)``.

    Args:
        path: the ``.gguf`` file.
        dtype: ``"auto"`` and ``"float32"`` keep the dequantised fp32 values; ``"bfloat16"`` /
            ``"float16"`` round them.
        device: where to put the model (default CPU).

    Returns:
        ``(model, tokenizer)``; the model in eval mode, its identity fingerprint cached.
    """
    model = dequantised_model(path)
    _remember_identity(path, model)  # over the fp32 values, whatever dtype is asked for
    wanted = resolve_dtype(dtype)
    if wanted not in (None, "auto", torch.float32):
        model.to(wanted)
    if device:
        model.to(device)
    return model.eval(), gguf_tokenizer(path)


def gguf_source(path) -> dict:
    """Where a base model's weights came from: ``{"format": "gguf", "file", "bytes", "sha256",
    "file_type", "tensor_types"}`` (``file_type``: llama.cpp's name, e.g. ``MOSTLY_Q4_1``)."""
    import gguf

    file = _checked(path)
    reader = gguf.GGUFReader(str(file))
    field = reader.fields.get("general.file_type")
    file_type = None
    if field is not None:
        code = int(field.parts[field.data[0]][0])
        try:
            file_type = gguf.LlamaFileType(code).name
        except ValueError:
            file_type = str(code)
    kinds = Counter(t.tensor_type.name for t in reader.tensors)
    del reader  # its memory map
    return {"format": "gguf", "file": file.name, "bytes": file.stat().st_size, "sha256": sha256_file(file),
            "file_type": file_type, "tensor_types": dict(sorted(kinds.items()))}


def _remember_identity(path, model) -> dict:
    record = {"weight_fingerprint": weight_fingerprint(unique_state_dict(model)), "source": gguf_source(path)}
    cache_fingerprint([Path(path)], record)
    return record


def gguf_identity(path) -> tuple:
    """``(weight_fingerprint, source)`` of a GGUF file, from the cache or by dequantising it once."""
    record = cached_fingerprint([Path(path)])
    if not record or "source" not in record:
        record = _remember_identity(path, dequantised_model(path))
    return record["weight_fingerprint"], record["source"]


def refuse_stream(name_or_path, what: str = "--stream") -> None:
    """Refuse a ``.gguf`` input where the model's safetensors files must be read in place."""
    if is_gguf(name_or_path):
        raise OffsiteError(f"{what} reads a checkpoint's .safetensors files in place, and {name_or_path} is a GGUF "
                           "file (quantized tensors, dequantised only when loaded whole): drop --stream, or convert "
                           "it once to a folder (offsite models convert FILE.gguf --out DIR; for SmolLM2: offsite "
                           "models prepare smollm2-135m) and pass that folder")


def convert_gguf(path, out, dtype="float32") -> Path:
    """Write a GGUF file's dequantised model as a stock Hugging Face folder (safetensors + tokenizer).

    The folder is assembled in a hidden temp folder next to ``out`` and renamed into place, so an
    interrupted conversion leaves nothing at ``out``.

    Args:
        path: the ``.gguf`` file.
        out: the folder to write; must not exist (or be empty).
        dtype: ``"float32"`` (the dequantised values), ``"bfloat16"`` or ``"float16"``.

    Returns:
        ``out``.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OffsiteError(f"{out} already exists and is not an empty folder; pick another --out")
    model, tokenizer = load_gguf(path, dtype=dtype)
    with atomic_folder(out) as tmp:
        save_model(model, tokenizer, tmp)
    return out


def save_model(model, tokenizer, folder) -> None:
    """``save_pretrained`` of a dequantised model (and its tokenizer) into ``folder``."""
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
