"""A full model scored with its decoder layers on disk (``eval --stream``, ``report --stream``).

Evaluation drives the model batch by batch, in three ways that each need every layer in turn:
multiple choice (flat rows, or a shared context through the KV cache), perplexity windows and
greedy generation. A layer-major reordering (what :mod:`offsite.calibration.layerwise` does for a
build) would mean rewriting each scorer and cannot serve generation at all. So here the model keeps
its ordinary forward and its decoder layers are *offloaded*: transformers' own ``device_map`` with
``"disk"`` entries (accelerate's dispatch hooks), which reads each module's tensors of an offloaded
layer from the checkpoint's safetensors files right before that module runs (one linear or norm at a
time) and puts them back on ``meta`` after it;
nothing is copied, the files are read where they lie (an ``offload_folder`` is still required by
transformers; it stays empty unless transformers must convert a tensor, and is removed with the
model). Resident: the parts outside the decoder stack (embeddings, final norm, head) and the layers
named in ``keep`` (a plug-in's adapter layers, plugged once and kept), on the chosen device; one
module in flight on the same device. Scores are the in-memory model's: same tensors, same kernels.

Cost: every forward reads every offloaded layer, so a batch costs one pass over the model's bytes
(from the page cache when they fit there, else from disk). Larger batches (``--batch-size``,
``--max-batch-tokens``) amortise it; generation reads the model once per new token. The choice
against our own :class:`offsite.model.streaming.StreamedModel`: a build needs layer-major passes and
parking, which accelerate's hooks do not give, but scoring needs neither, and accelerate's hooks
already put each layer on the execution device (CUDA when the resident parts are there).
"""

from __future__ import annotations

import shutil
import tempfile
import weakref

import torch

from ..artifacts import read_manifest
from ..core.errors import OffsiteError
from ..families import get_family
from .dtypes import no_init_weights, resolve_dtype
from .fingerprint import weight_files
from .gguf_input import refuse_stream
from .loading import load_config, load_tokenizer
from .streaming import return_freed_memory


def disk_device_map(config, device, keep=()) -> dict:
    """A ``device_map`` putting every decoder layer not in ``keep`` on ``"disk"``.

    Args:
        config: the model's config.
        device: where the resident parts (and the layers in ``keep``) go, and where offloaded
            layers run.
        keep: full-model indices of decoder layers kept resident.

    Returns:
        ``{module name: device or "disk"}`` covering every parameter and buffer of the model.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    family = get_family(config)
    with init_empty_weights(), no_init_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    prefix, resident = family.layers + ".", str(torch.device(device))
    names = [n for n, _ in skeleton.named_parameters()] + [n for n, _ in skeleton.named_buffers()]
    mapping = {}
    for name in names:
        if name.startswith(prefix):
            index = int(name[len(prefix):].split(".", 1)[0])
            mapping[f"{prefix}{index}"] = resident if index in keep else "disk"
        else:  # the module that owns it: embeddings, final norm, head, rotary tables
            mapping[name.rpartition(".")[0] or name] = resident
    return mapping


def load_offloaded(name_or_path: str, dtype="auto", device="cpu", keep=()) -> tuple:
    """Load a supported causal LM with its decoder layers (except ``keep``) offloaded to its files.

    Args:
        name_or_path: local folder or cached hub id with ``.safetensors`` weights.
        dtype: as for :func:`offsite.model.loading.load_model`.
        device: resident parts and execution device.
        keep: decoder layers loaded for good (their index in the full model).

    Returns:
        ``(model, tokenizer_or_None)``, the model in eval mode.

    Raises:
        OffsiteError: no safetensors weights (a ``.bin`` checkpoint cannot be read in place).
    """
    from transformers import AutoModelForCausalLM

    refuse_stream(name_or_path)
    config = load_config(name_or_path)
    get_family(config)  # unsupported architectures are refused before any weight is read
    if not weight_files(name_or_path):
        raise OffsiteError(f"--stream reads a checkpoint's .safetensors files in place; {name_or_path} has none "
                           "(score it without --stream, or save it with save_pretrained first)")

    return_freed_memory()  # every batch frees and re-reads each layer: keep glibc from hoarding them
    folder = tempfile.mkdtemp(prefix=".offsite-offload-")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path, dtype=resolve_dtype(dtype), device_map=disk_device_map(config, device, set(keep)),
            offload_folder=folder)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    weakref.finalize(model, shutil.rmtree, folder, True)  # gone with the model, whatever ends its use
    model.eval()
    return model, load_tokenizer(name_or_path)


def claimed_adapter_layers(adapter, num_layers: int) -> list:
    """The adapter layers an adapter artifact claims, to keep resident before it is plugged in.

    Only decides what to load: :func:`offsite.adapters.plugging.plug_into` verifies the artifact and refuses a
    split that is not the model's afterwards. Indices out of range are left out here.
    """
    claimed = read_manifest(adapter, ("adapter", "lora"))["split"]["adapter"]
    return [i for i in claimed if isinstance(i, int) and not isinstance(i, bool) and 0 <= i < num_layers]
