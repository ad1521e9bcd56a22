"""A base model read from its safetensors files one decoder layer at a time (``emulate --stream``).

Model-owner workflows otherwise start with ``from_pretrained``, so the largest model they can handle
is the one that fits in memory next to the build's own working set. A :class:`StreamedModel` is the
same Hugging Face module tree with every parameter on the ``meta`` device (accelerate's
``init_empty_weights``, buffers such as rotary ``inv_freq`` computed for real); the parts outside
the decoder stack (embeddings, final norm, head) are loaded and stay resident, and a decoder layer
holds real tensors only between :meth:`StreamedModel.materialize` and :meth:`StreamedModel.release`.
Tensors are read with safetensors' ``safe_open`` (memory-mapped, one tensor at a time) and *assigned*
as the layer's parameters, so a layer exists in memory once.

What streams: a checkpoint folder (or a cached hub snapshot) of ``.safetensors`` files, one file or
sharded, whose tensor names are the model's state-dict names (what ``save_pretrained`` writes).
Methods opt in with ``supports_stream``; the others need the model in memory.

Nothing of the emulator has to be resident either. A layer a method changed (GradOT's compressed
layers) is *parked*: its tensors go to a safetensors file in a scratch folder and the layer returns
to ``meta``; a layer kept as it is stays on disk where it was. The package writer then reads each
emulator tensor back (:meth:`StreamedModel.emulator_reader`) only while its shard is written, so an
emulate run holds the resident parts, one layer, and at most one shard. Calibration activations
beyond ``spill_bytes`` go to the same scratch folder (:mod:`offsite.calibration.layerwise`), which
is removed by :meth:`StreamedModel.close`.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..artifacts import check_finite
from ..artifacts.tensors import all_finite
from ..core.errors import OffsiteError
from ..families import get_family, get_layers
from .dtypes import no_init_weights, resolve_dtype
from .fingerprint import cached_files_fingerprint, weight_files
from .gguf_input import refuse_stream
from .loading import load_config


def _load_transforms(config) -> list:
    """The checkpoint conversions transformers applies when it loads this architecture (empty on 4.x)."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:  # transformers 4.x loads stored names as they are
        return []
    arch = (getattr(config, "architectures", None) or [None])[0]
    return list((arch and get_checkpoint_conversion_mapping(arch)) or get_checkpoint_conversion_mapping(
        config.model_type) or [])


_MERGES = {"MergeModulelist", "Concatenate"}
"""Conversions the streamed reader reproduces: stacking one stored tensor per expert into a fused
parameter (``MergeModulelist`` along dim 0) and joining the stacks (``Concatenate``: gate, then up)."""


def conversion_refusal(config) -> str | None:
    """Why this architecture's checkpoints cannot be read tensor by tensor, or None when they can.

    Renames are followed (GPT-NeoX's ``embed_out`` is the model's ``lm_head``), and so are the expert
    merges of Mixtral, Qwen2/3-MoE and OLMoE, whose checkpoints store one tensor per expert that
    transformers fuses on load (:class:`_Conversion` does the same, one layer at a time). Any other
    conversion changes values in ways the reader does not reproduce.
    """
    from transformers.core_model_loading import WeightRenaming

    for t in _load_transforms(config):
        ops = [type(o).__name__ for o in getattr(t, "operations", None) or []]
        if type(t) is not WeightRenaming and not (ops and set(ops) <= _MERGES):
            return (f"{config.model_type} checkpoints are converted on load ({type(t).__name__}: {', '.join(ops)}), "
                    "which the layer-by-layer reader does not do")
    return None


class _Conversion:
    """Stored names -> model names (renames), and fused model tensors made of several stored ones (merges).

    A merge's source patterns (``.experts.*.w1.weight``, ``.experts.*.w3.weight``) match stored names with
    the expert index at ``*``; the model name puts the target pattern (``.experts.gate_up_proj``) where the
    source matched. Reading it stacks each source over the experts (dim 0) and concatenates the stacks
    along the converter's ``Concatenate`` dim, as transformers does when it loads the whole model.
    """

    def __init__(self, config):
        why = conversion_refusal(config)
        if why:
            raise OffsiteError(f"--stream: {why}; load without --stream")
        self.renames, self.merges = [], []
        for t in _load_transforms(config):
            if not getattr(t, "operations", None):
                self.renames += list(zip(t.source_patterns, t.target_patterns))
                continue
            concat = [o.dim for o in t.operations if type(o).__name__ == "Concatenate"]
            sources = [re.compile(re.escape(p).replace(r"\*", r"(\d+)")) for p in t.source_patterns]
            self.merges.append((sources, t.target_patterns[0], concat[0] if concat else None))

    def rename(self, name: str) -> str:
        for source, target in self.renames:
            name = re.sub(source, target, name)
        return name

    def merge_key(self, name: str):
        """``(model name, merge index, source index, expert)`` when ``name`` (renamed) is part of a merge, else None."""
        for m, (sources, target, _) in enumerate(self.merges):
            for k, pattern in enumerate(sources):
                hit = pattern.search(name)
                if hit:
                    return name[:hit.start()] + target + name[hit.end():], m, k, int(hit.group(1))
        return None


def return_freed_memory() -> None:
    """Make glibc hand large freed blocks back to the OS at once (no-op elsewhere).

    A streamed build frees a layer's tensors and allocates the next layer's of the same sizes. glibc
    raises its mmap threshold each time such a block is freed (up to 32 MB), so later layers come from
    the heap, which it keeps: measured on a 1.5 GB bf16 Llama, peak RSS 1383 MiB instead of 859 MiB.
    Fixing the threshold at 1 MiB keeps every tensor above it in its own mapping, unmapped when freed.
    Offloaded scoring (:mod:`offsite.model.offload`) frees and reads every layer once per batch and takes
    the same remedy (``eval --stream`` on that model at batch 64: 1795 MiB without it, 635 MiB with it).
    """
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD (malloc.h); fixing it switches the dynamic raise off
    except (OSError, AttributeError):  # not glibc (musl has no mallopt): nothing to tune
        pass


class StreamedModel:
    """The base model as a meta skeleton plus an index of where each tensor lies on disk.

    Attributes:
        model: the HF causal LM; resident parts loaded, decoder layers on ``meta`` until materialised.
        family: its architecture family.
        name_or_path: what it was read from.
        spill_bytes: calibration activations kept in memory up to this many bytes; the rest go to
            the scratch folder (None: never spilled).
    """

    def __init__(self, name_or_path: str, dtype="auto", device="cpu", scratch_parent=None,
                 spill_bytes: int | None = None):
        from accelerate import init_empty_weights
        from safetensors import safe_open
        from transformers import AutoModelForCausalLM

        refuse_stream(name_or_path)
        return_freed_memory()
        config = load_config(name_or_path)
        self.family = get_family(config)
        self.name_or_path = str(name_or_path)
        files = weight_files(name_or_path)
        if not files:
            raise OffsiteError(f"--stream reads a checkpoint's .safetensors files; {name_or_path} has none "
                               "(load it without --stream, or save it with save_pretrained first)")
        conversion = _Conversion(config)
        self._where, self._stored, self._merged = {}, {}, {}
        for path in files:
            with safe_open(str(path), framework="pt") as fh:
                for stored in fh.keys():
                    name = conversion.rename(stored)
                    part = conversion.merge_key(name)
                    if part is None:
                        self._where[name], self._stored[name] = path, stored
                        continue
                    fused, m, k, expert = part
                    entry = self._merged.setdefault(fused, {"dim": conversion.merges[m][2], "parts": {}})
                    entry["parts"].setdefault(k, {})[expert] = (path, stored)
        for fused, entry in self._merged.items():  # listed where its first part lies (lookups, fingerprints)
            self._where[fused] = next(iter(entry["parts"][0].values()))[0]
        wanted = resolve_dtype(dtype)
        if wanted == "auto" or wanted is None:
            wanted = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
            wanted = getattr(torch, wanted) if isinstance(wanted, str) else wanted
        self.dtype, self.device = wanted, torch.device(device)
        with init_empty_weights(include_buffers=False), no_init_weights():
            self.model = AutoModelForCausalLM.from_config(config, dtype=wanted)
        self.model.eval()
        self._prefix = self.family.layers + "."
        resident = {name: p for name, p in self.model.state_dict(keep_vars=True).items()
                    if not name.startswith(self._prefix)}
        self._assign(self.model, self._read([n for n in resident if n in self._where]), strict=False)
        self.model.tie_weights()
        for buffer_owner in self.model.modules():  # computed buffers (rotary inv_freq) go where the weights go
            for key, b in list(buffer_owner._buffers.items()):
                if b is not None and not b.is_meta:
                    buffer_owner._buffers[key] = b.to(self.device)
        empty = [n for n, p in self.model.named_parameters() if p.is_meta and not n.startswith(self._prefix)]
        if empty:
            raise OffsiteError(f"{name_or_path}: the weight files hold no '{empty[0]}' ({len(empty)} tensors "
                               "outside the decoder layers missing); streaming needs save_pretrained's names")
        self.live = set()
        # The layer modules by full-model index: a builder may reorder or drop them in the module tree
        # (keep_layers), and the package writer still asks for layer i by its index in the files.
        self._layers = list(get_layers(self.model, self.family))
        self._parked = {}
        self._scratch_parent, self._scratch = scratch_parent, None
        self.spill_bytes = spill_bytes

    @property
    def scratch(self) -> Path:
        """The run's scratch folder (created on first use, beside ``scratch_parent`` or in the temp dir)."""
        if self._scratch is None:
            parent = self._scratch_parent
            if parent is not None:
                Path(parent).mkdir(parents=True, exist_ok=True)
            self._scratch = Path(tempfile.mkdtemp(prefix=".offsite-stream-", dir=parent))
        return self._scratch

    def close(self) -> None:
        """Remove the scratch folder (parked layers, spilled activations)."""
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None
        self._parked.clear()

    def _read(self, names: list) -> dict:
        from safetensors import safe_open

        def one(path, stored):
            # A handle per tensor: every page read through an open handle stays mapped (and counted as
            # resident) until it closes, so one handle for a group would hold the group twice.
            with safe_open(str(path), framework="pt") as fh:
                return fh.get_tensor(stored)

        out = {}
        for name in names:
            if name in self._merged:
                out[name] = self._read_merged(self._merged[name], one)
                continue
            t = one(self._where[name], self._stored[name])
            out[name] = (t.to(self.dtype) if t.is_floating_point() else t).to(self.device)
        return out

    def _read_merged(self, entry: dict, one) -> torch.Tensor:
        """A fused expert tensor from one stored tensor per expert (and per source: gate, up).

        The result is what ``torch.cat([torch.stack(source) for source in sources], dim)`` gives, written
        into one preallocated tensor an expert at a time, so reading holds the fused tensor and one stored
        expert tensor rather than the stacks and their concatenation (4x a 1 GB fused tensor).
        """
        sources = [parts for _, parts in sorted(entry["parts"].items())]
        experts = sorted(sources[0])
        if experts != list(range(len(experts))) or any(sorted(parts) != experts for parts in sources):
            raise OffsiteError(f"{self.name_or_path}: the stored expert tensors are not numbered 0..E-1 alike "
                               "for every part of a fused tensor; load without --stream")
        dim = entry["dim"]  # in the stacked tensor's coordinates: dim - 1 in one expert's
        shapes = [self._stored_shape(*parts[0]) for parts in sources]  # from the headers: no tensor read
        widths = [shape[dim - 1] for shape in shapes] if dim is not None else [0]
        shape = shapes[0]
        if dim is not None:
            shape[dim - 1] = sum(widths)
        fused, offset = None, 0
        for parts, width in zip(sources, widths):
            for e in experts:
                t = one(*parts[e])
                if fused is None:
                    dtype = self.dtype if t.is_floating_point() else t.dtype
                    fused = torch.empty(len(experts), *shape, dtype=dtype, device=self.device)
                target = fused[e] if dim is None else fused[e].narrow(dim - 1, offset, width)
                target.copy_(t)
            offset += width
        return fused

    @staticmethod
    def _stored_shape(path, stored) -> list:
        """Shape of one stored tensor, read from the file's header."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            return list(fh.get_slice(stored).get_shape())

    @staticmethod
    def _assign(module: nn.Module, tensors: dict, strict: bool = True) -> None:
        result = module.load_state_dict(tensors, strict=False, assign=True)
        if strict and (result.missing_keys or result.unexpected_keys):
            raise OffsiteError(f"a streamed layer does not match its weight files: missing "
                               f"{result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}")

    def materialize(self, index: int) -> nn.Module:
        """Give decoder layer ``index`` its real tensors (read from disk); returns the layer."""
        layer = self._layers[index]
        if index in self.live:
            return layer
        if index in self._parked:
            from safetensors.torch import load_file

            self._assign(layer, {n: t.to(self.device) for n, t in load_file(str(self._parked.pop(index))).items()})
            self.live.add(index)
            return layer
        prefix = self.family.layer_param_prefix(index)
        names = [prefix + n for n in layer.state_dict().keys()]
        missing = [n for n in names if n not in self._where]
        if missing:
            raise OffsiteError(f"{self.name_or_path}: the weight files hold no '{missing[0]}'; streaming needs "
                               "the names save_pretrained writes")
        tensors = self._read(names)
        self._assign(layer, {n[len(prefix):]: t for n, t in tensors.items()})
        self.live.add(index)
        return layer

    def release(self, index: int) -> None:
        """Put layer ``index``'s parameters back on ``meta`` (buffers stay: they are small and computed)."""
        layer = self._layers[index]
        for module in layer.modules():
            for name, p in list(module._parameters.items()):
                if p is not None and not p.is_meta:
                    module._parameters[name] = nn.Parameter(torch.empty_like(p, device="meta"),
                                                            requires_grad=p.requires_grad)
        self.live.discard(index)

    def release_resident(self) -> None:
        """Put the parameters outside the decoder stack (embeddings, final norm, head) back on ``meta``.

        For a build that runs the model no further (GradOT's backward sweep needs only the stored
        boundaries and top gradients): on a 70B Llama the embeddings and head are 4 GB in bf16. Tied
        parameters stay tied (one meta parameter replaces each shared one); the package writer reads
        them back from the files (:meth:`emulator_reader`).
        """
        replaced = {}
        for owner_name, module in self.model.named_modules():
            if owner_name == self.family.layers or owner_name.startswith(self._prefix):
                continue
            for name, p in list(module._parameters.items()):
                if p is None or p.is_meta:
                    continue
                if id(p) not in replaced:
                    replaced[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
                module._parameters[name] = replaced[id(p)]

    def park(self, index: int) -> None:
        """Move layer ``index``, changed by a builder, to a file in the scratch folder and release it.

        Its values are checked first (a NaN from a broken build stops here, not in the package).
        """
        from safetensors.torch import save_file

        layer = self._layers[index]
        tensors = {n: t.detach().to("cpu").contiguous() for n, t in layer.state_dict().items()}
        check_finite(tensors, f"emulator layer {index}")
        path = self.scratch / f"layer-{index:05d}.safetensors"
        save_file(tensors, str(path))
        self._parked[index] = path
        self.release(index)

    def read_layer(self, index: int, names: list) -> dict:
        """``{local name: tensor}`` of layer ``index`` as the emulator holds it: parked, live or on disk."""
        if index in self.live:
            state = self._layers[index].state_dict()
            return {n: state[n] for n in names}
        if index in self._parked:
            from safetensors import safe_open

            with safe_open(str(self._parked[index]), framework="pt") as fh:
                return {n: fh.get_tensor(n).to(self.device) for n in names}
        prefix = self.family.layer_param_prefix(index)
        return {n[len(prefix):]: t for n, t in self._read([prefix + n for n in names]).items()}

    def emulator_reader(self, sources: list):
        """A function reading emulator tensors by name, for the package writer.

        Args:
            sources: full-model layer index of each emulator layer position (the plan's table).

        Returns:
            ``read(names) -> {name: tensor}`` for state-dict names of the emulator; names outside
            the decoder layers are the resident tensors.
        """
        layer_prefix = self.family.layers + "."

        def read(names: list) -> dict:
            out, by_layer = {}, {}
            state = None
            for name in names:
                if name.startswith(layer_prefix):
                    pos, local = name[len(layer_prefix):].split(".", 1)
                    by_layer.setdefault(int(pos), []).append((name, local))
                else:
                    state = state if state is not None else self.model.state_dict()
                    if not state[name].is_meta:
                        out[name] = state[name]
                    elif name in self._where:  # released by release_resident: read where it lies
                        out.update(self._read([name]))
                    else:
                        raise OffsiteError(f"{self.name_or_path}: '{name}' was released but its weight files "
                                           "do not hold it under that name")
            for pos, pairs in by_layer.items():
                got = self.read_layer(sources[pos], [local for _, local in pairs])
                out.update({name: got[local] for name, local in pairs})
            return out
        return read

    @contextlib.contextmanager
    def layer(self, index: int, keep: bool = False):
        """``with stream.layer(i) as layer:`` real tensors inside, released on exit unless ``keep``."""
        was_live = index in self.live
        layer = self.materialize(index)
        try:
            yield layer
        finally:
            if not keep and not was_live:
                self.release(index)

    def weight_fingerprint(self) -> str:
        """The base weights' fingerprint, read from the files (cached per file state; see :mod:`offsite.model.identity`)."""
        return cached_files_fingerprint(sorted(set(self._where.values())))

    def check_finite(self) -> None:
        """Refuse NaN/inf in the resident tensors (layers are checked as they are materialised)."""
        for name, p in self.model.named_parameters():
            if not p.is_meta and not all_finite(p):
                raise OffsiteError(f"base model {self.name_or_path}: tensor '{name}' has NaN or infinite values; "
                                   "fix or re-export the checkpoint")
