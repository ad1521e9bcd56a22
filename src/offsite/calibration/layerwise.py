"""The calibration forward of :mod:`.sweep` over a streamed model: layer by layer, not batch by batch.

With a :class:`offsite.model.streaming.StreamedModel` only one decoder layer holds real weights at a time,
so the forward runs *layer-major*: every calibration batch goes through layer 0, then layer 1, ...
Each layer is read from disk once for the forward (and once more for the backward sweep). What the
stock forward computes around the layers (embeddings, attention masks, position embeddings, the
head and its loss) is still the stock model's, through three cheap passes with the decoder layers'
``forward`` replaced by stubs:

1. the first batch up to layer 0, to learn what a real layer returns (a tensor or a tuple);
2. every batch with every layer stubbed (pass the hidden state through, record the call's extra
   arguments), stopped after the last layer: each layer's own masks and position embeddings;
3. after the layer-major forward, every batch with the last stub returning the stored top hidden
   state as a leaf that requires grad: the head's loss and the gradient at the top boundary.

The result is the same :class:`.stream.Boundaries` that :func:`.stream.capture_boundaries` gives, to
floating-point rounding (the same operations, grouped differently).

The boundaries are ``(layers + 1) x (tokens, hidden)`` activations, the one cost of a streamed build
that grows with depth. Past the stream's ``spill_bytes``, a boundary the forward has consumed goes
to a safetensors file in the stream's scratch folder (:class:`SpilledBoundary`) and the backward
sweep reads it back once, when it reaches that layer: held in memory are then at most
``spill_bytes`` plus two boundaries, whatever the depth.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core.progress import bar
from ..families import Family, get_layers
from .sweep import Boundaries, _first, _split_hidden, frozen


class SpilledBoundary:
    """One layer's stored inputs, ``(batch, seq, hidden)`` per calibration batch, in a file on disk.

    Indexing reads that batch's tensor back (safetensors, memory-mapped); nothing stays resident.
    """

    def __init__(self, tensors: list, path, device):
        from safetensors.torch import save_file

        save_file({str(b): t.detach().to("cpu").contiguous() for b, t in enumerate(tensors)}, str(path))
        self.path, self.device, self._count = path, device, len(tensors)

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, b: int) -> torch.Tensor:
        from safetensors import safe_open

        if not 0 <= b < self._count:
            raise IndexError(b)
        with safe_open(str(self.path), framework="pt") as fh:
            return fh.get_tensor(str(b)).to(self.device)


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class _Stop(Exception):
    """Ends a stub pass once the layers have been seen (the head is not needed then)."""


def _stubbed(layers, make):
    """Replace each layer's ``forward`` by ``make(i)`` (restored by the caller via ``_restore``)."""
    saved = [layer.__dict__.get("forward") for layer in layers]
    for i, layer in enumerate(layers):
        layer.forward = make(i)
    return saved


def _restore(layers, saved) -> None:
    for layer, forward in zip(layers, saved):
        if forward is None:
            layer.__dict__.pop("forward", None)
        else:
            layer.forward = forward


def capture_boundaries_layerwise(model, family: Family, batches: list, stream, keep=(), with_grads: bool = True,
                                 on_output=None, retain: bool = True) -> Boundaries | None:
    """Layer-major calibration forward over ``stream`` (see the module docstring).

    Args:
        model: ``stream.model``.
        family: its family.
        batches: ``LongTensor (batch, seq)`` list.
        stream: the :class:`~offsite.model.streaming.StreamedModel` whose layers are materialised in turn.
        keep: layer indices to leave materialised afterwards (the others are released).
        with_grads: also run pass 3 (the head's loss and the top-boundary gradients).
        on_output: ``on_output(index, batch, output (batch, seq, hidden))`` for every layer output.
        retain: keep every boundary (what the backward sweep needs); False keeps only the current
            layer's input and returns None (for methods that only look at layer outputs).

    Returns:
        :class:`.stream.Boundaries` (with ``top_grads`` when ``with_grads``), or None without ``retain``.
    """
    layers = get_layers(model, family)
    n = len(layers)
    device = next(p for p in model.parameters() if not p.is_meta).device
    calls = [[] for _ in range(n)]
    hidden = [[] for _ in range(n + 1)]
    shape = {}

    def recorder(i):
        def forward(*args, **kwargs):
            h, rest, kw = _split_hidden(args, kwargs)
            if i == 0 and "tuple" not in shape:  # pass 1: learn the layer's output structure, then stop
                calls[0].append((rest, kw))
                hidden[0].append(h.detach())
                raise _Stop
            calls[i].append((rest, kw))
            if i == 0:
                hidden[0].append(h.detach())
            if i == n - 1:
                raise _Stop
            return (h,) if shape["tuple"] else h
        return forward

    with frozen(model), torch.no_grad():
        saved = _stubbed(layers, recorder)
        try:
            for b, ids in enumerate(bar(batches, "calibration arguments", "batch")):
                if b == 0:
                    _run(model, ids.to(device))  # pass 1 stops at layer 0
                    _restore(layers, saved)
                    with stream.layer(0, keep=0 in keep) as first:
                        shape["tuple"] = isinstance(first(hidden[0][0], *calls[0][0][0], **calls[0][0][1]),
                                                    (tuple, list))
                    calls[0].clear()
                    hidden[0].clear()
                    saved = _stubbed(layers, recorder)
                _run(model, ids.to(device))
        finally:
            _restore(layers, saved)
        limit, held = getattr(stream, "spill_bytes", None), 0
        for i in bar(range(n), "calibration forward (layer by layer)", "layer"):
            with stream.layer(i, keep=i in keep) as layer:
                for b in range(len(batches)):
                    rest, kw = calls[i][b]
                    hidden[i + 1].append(_first(layer(hidden[i][b], *rest, **kw)).detach())
                    if on_output is not None:
                        on_output(i, b, hidden[i + 1][b])
            if not retain:
                hidden[i] = None  # only the next layer's input is needed
            elif limit is not None:
                size = _bytes(hidden[i])
                if held + size > limit:  # consumed by the forward: only the backward sweep reads it again
                    hidden[i] = SpilledBoundary(hidden[i], stream.scratch / f"boundary-{i:05d}.safetensors", device)
                else:
                    held += size
    if not retain:
        return None
    top = hidden.pop()
    if not with_grads:
        return Boundaries(hidden, calls, None, float("nan"), sum(ids[:, 1:].numel() for ids in batches))
    return _head_pass(model, family, batches, device, hidden, calls, top, shape["tuple"])


def _run(model, ids) -> None:
    try:
        model(input_ids=ids, use_cache=False)
    except _Stop:
        pass


def _head_pass(model, family, batches, device, hidden, calls, top, as_tuple) -> Boundaries:
    """Pass 3: the stock head on the stored top hidden states; loss and the top-boundary gradients."""
    layers = get_layers(model, family)
    n = len(layers)
    current = {}

    def passthrough(i):
        def forward(*args, **kwargs):
            h, _, _ = _split_hidden(args, kwargs)
            if i == n - 1:
                current["leaf"] = top[current["b"]].detach().requires_grad_(True)
                h = current["leaf"]
            return (h,) if as_tuple else h
        return forward

    total, tokens, grads = 0.0, 0, []
    with frozen(model):
        saved = _stubbed(layers, passthrough)
        try:
            for b, ids in enumerate(batches):
                current["b"] = b
                ids = ids.to(device)
                logits = model(input_ids=ids, use_cache=False).logits
                loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum")
                loss.backward()
                grads.append(current.pop("leaf").grad.detach())
                total, tokens = total + float(loss.detach()), tokens + ids[:, 1:].numel()
        finally:
            _restore(layers, saved)
    return Boundaries(hidden, calls, grads, total / max(tokens, 1), tokens)
