"""The calibration sweep: one forward that keeps only layer-boundary activations, then a
backward sweep that recomputes one decoder layer at a time.

Forward: the stock model runs once per batch with every parameter frozen, so autograd records
nothing inside the decoder layers. Forward pre-hooks store each layer's input hidden state and its
call arguments (masks, position embeddings: whatever this architecture passes, so nothing here
hard-codes a layer signature). A forward hook swaps the last layer's output for a leaf tensor that
requires grad, so only the head (final norm, lm head, soft-capping, OPT's project_out, ...) is
recorded and ``backward`` of the summed next-token loss yields the gradient at the top boundary.

Backward sweep: for layers L-1 down to the lowest one asked for, the layer is rerun on its stored
input (as a leaf requiring grad) and back-propagated with the upstream gradient; this yields the
gradient at its input boundary and, through :func:`gather_linear_stats`, its linears' statistics.
Peak memory is one layer's autograd graph plus the boundary activations ``(L+1) x (tokens, hidden)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import resource
import sys

import torch
import torch.nn.functional as F

from ..core.device import model_device
from ..core.progress import bar
from ..families import Family, get_layers, layer_linears
from ..families.moe import unfused_experts
from .stats import gather_linear_stats


@dataclasses.dataclass
class Boundaries:
    """Stored layer inputs of a calibration forward pass.

    Attributes:
        hidden: ``hidden[i][b]`` = input of layer i for batch b, ``(batch, seq, hidden)``.
        calls: ``calls[i][b]`` = ``(args_after_hidden, kwargs)`` layer i was called with.
        top_grads: gradient of the summed loss at the last layer's output, per batch (or None).
        loss: mean next-token loss of the unmodified model over the calibration tokens.
        tokens: number of next-token predictions.
    """

    hidden: list
    calls: list
    top_grads: list | None
    loss: float
    tokens: int


def _split_hidden(args, kwargs):
    if args:
        return args[0], args[1:], kwargs
    kwargs = dict(kwargs)
    return kwargs.pop("hidden_states"), (), kwargs


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


@contextlib.contextmanager
def frozen(model):
    """Temporarily set ``requires_grad=False`` on every parameter (restored on exit)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def capture_boundaries(model, family: Family, batches: list, with_grads: bool = True) -> Boundaries:
    """Run the calibration forward pass and keep the layer-boundary activations.

    Args:
        model: the full causal LM (eval mode).
        family: its family.
        batches: ``LongTensor (batch, seq)`` list (see ``calibration_batches``).
        with_grads: also back-propagate the loss through the head to the top boundary.
    """
    layers = get_layers(model, family)
    n = len(layers)
    hidden, calls, top_grads = [[] for _ in range(n)], [[] for _ in range(n)], []
    device = model_device(model)
    state = {}

    def pre_hook(i):
        def hook(module, args, kwargs):
            h, rest, kw = _split_hidden(args, kwargs)
            hidden[i].append(h.detach())
            calls[i].append((rest, kw))
        return hook

    def top_hook(module, args, output):
        leaf = _first(output).detach().requires_grad_(True)
        state["leaf"] = leaf
        return (leaf, *output[1:]) if isinstance(output, (tuple, list)) else leaf

    handles = [layer.register_forward_pre_hook(pre_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    if with_grads:
        handles.append(layers[n - 1].register_forward_hook(top_hook))
    total, tokens = 0.0, 0
    try:
        with frozen(model), torch.set_grad_enabled(with_grads):
            for ids in bar(batches, "calibration forward", "batch"):
                ids = ids.to(device)
                logits = model(input_ids=ids, use_cache=False).logits
                # summed (not mean) loss: per-token output gradients are then per-token loss gradients
                loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum")
                total, tokens = total + float(loss.detach()), tokens + ids[:, 1:].numel()
                if with_grads:
                    loss.backward()
                    top_grads.append(state.pop("leaf").grad.detach())
    finally:
        for h in handles:
            h.remove()
    return Boundaries(hidden, calls, top_grads if with_grads else None, total / max(tokens, 1), tokens)


def backward_sweep(model, family: Family, bounds: Boundaries, wanted, on_layer, stats_dtype=torch.float64,
                   with_grad: bool = True, stream=None):
    """Recompute layers top-down, gathering linear statistics of the ``wanted`` layers.

    Args:
        model: the model :func:`capture_boundaries` ran on.
        family: its family.
        bounds: the captured boundaries (with ``top_grads``); consumed: activations above the
            current layer are released as the sweep goes down.
        wanted: full-model indices of the layers whose statistics are needed.
        on_layer: ``on_layer(index, {role: stats_dict})`` called as soon as a wanted layer is done,
            so statistics of only one layer are alive at a time; the dict holds the only references
            to them, so an ``on_layer`` that pops a role's entry once used frees its factors.
        stats_dtype: accumulation dtype.
        with_grad: also gather each linear's mean weight gradient (see :class:`.stats.LinearStats`).
        stream: a :class:`offsite.model.streaming.StreamedModel` whose layers are materialised as the sweep
            reaches them and released after ``on_layer`` (which may park a changed one first); None
            when the model is in memory.
    """
    layers = get_layers(model, family)
    wanted = set(wanted)
    if not wanted:
        return
    grads = bounds.top_grads
    # Counted in layers recomputed (all from the top down to the lowest wanted one), not wanted layers.
    sweep = range(len(layers) - 1, min(wanted) - 1, -1)
    with frozen(model):
        for i in bar(sweep, "backward sweep", "layer"):
            layer, new_grads = (stream.materialize(i) if stream is not None else layers[i]), []
            # A wanted MoE layer runs its experts unfused, so each expert's projections are hooked alone.
            with unfused_experts(layer, family) if i in wanted else contextlib.nullcontext({}) as experts, \
                    gather_linear_stats({**layer_linears(layer, family), **experts} if i in wanted else {},
                                        stats_dtype, with_grad) as stats, torch.enable_grad():
                for b, grad in enumerate(grads):
                    h = bounds.hidden[i][b].detach().requires_grad_(True)
                    rest, kwargs = bounds.calls[i][b]
                    out = _first(layer(h, *rest, **kwargs))
                    out.backward(grad)
                    new_grads.append(h.grad.detach())
                # The last output's graph keeps its nodes, and with them the statistics hooks and every
                # accumulator they name, alive: dropped here, so on_layer's frees take effect (measured:
                # a middle layer's 277 MB of statistics stayed until the next layer's first backward).
                out = h = None
            grads = new_grads
            if i + 1 < len(layers):
                bounds.hidden[i + 1] = None  # release what the sweep no longer needs
            if i in wanted:
                finalized = {role: s.finalize() for role, s in stats.items()}
                stats = None  # the accumulators go: on_layer can free each factor once it is used
                on_layer(i, finalized)
            if stream is not None:
                stream.release(i)  # a no-op for a layer on_layer parked


def peak_memory_mb() -> dict:
    """Peak memory so far: process RSS high-water mark (and CUDA peak allocation when available), in MiB."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"max_rss_mb": round(rss / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)}
    if torch.cuda.is_available():
        out["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out
