"""The training loop every fine-tuning run of offsite shares: ``offsite finetune`` and the audit's attacks.

Why one loop: ``offsite audit`` (:mod:`offsite.experiments.audit`) claims that each attack a data owner can
run had *the same budget* as the honest fine-tune. That claim holds only if the attacks run the
very same code — data preparation, batching, schedule, clipping, the precision policy of
:mod:`offsite.core.precision`, validation and best-checkpoint selection — and differ in nothing but
what trains (:func:`select`). ``finetune`` adds what an artifact needs (resumable checkpoints,
through the ``checkpoints`` hook of :func:`train`, and the written adapter); the attacks train in
memory and pass no hook.

Pieces, in the order a run uses them: :func:`select` (freeze everything, unfreeze what trains,
held in fp32), :func:`prepare` (tokenised train/validation examples and the step count),
:func:`train` (AdamW + warmup/decay + accumulation + clipping, validation, best weights restored).
Each micro-batch runs in parts of similar length (:mod:`.parts`) and its loss is taken only at the
scored tokens (:mod:`offsite.data.token_loss`); both change cost, not the loss.
How a step gets its gradients is the one thing the modes change, and :mod:`.steps` holds one class
per mode: plain micro-batches; DP-SGD (``finetune`` hands :func:`train` a ``private`` step of
:mod:`.dp`: Opacus' Poisson batches, per-example clipping and noise); several processes
(``torchrun --nproc_per_node N -m offsite.cli finetune ...`` hands it a ``group`` of
:mod:`.distributed`: each process takes its shard of every micro-batch, gradients are summed before
clipping); a proximal loss term (FedProx). The loop makes one call per step.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time

import torch

from ..adapters.lora import wrap_lora
from ..artifacts.tensors import first_nonfinite
from ..core.errors import OffsiteError
from ..core.progress import bar
from ..core.schedule import lr_lambda
from ..data.examples import collate, load_examples
from ..data.token_loss import token_losses
from ..families import get_layers
from . import steps
from .checkpoint import diverged
from .parts import resolve_pass_tokens, split

VALIDATIONS = 5
"""Default validations per run (eval_every = ceil(steps / 5)); each is a forward pass over val_limit blocks."""
SCOPES = ("adapter", "emulator")
"""What :func:`select` trains: the adapter layers (``finetune``) or every layer of the emulator (attacks)."""


@dataclasses.dataclass
class Prepared:
    """The data of one run: tokenised examples and how many optimizer steps it takes.

    Attributes:
        train: training examples ``[{"input_ids": [...], "labels": [...]}]``.
        val: validation examples (at most ``val_limit``), possibly empty.
        total: optimizer steps of the run.
        eval_every: validate every this many steps (and at the last one).
        pad: the tokenizer's pad id (0 without one).
    """

    train: list
    val: list
    total: int
    eval_every: int
    pad: int


@dataclasses.dataclass
class State:
    """Where a run stands: steps done, best validation loss and its weights, the log."""

    step: int = 0
    best_loss: float = math.inf
    best: dict | None = None
    log: dict = dataclasses.field(default_factory=lambda: {"train": [], "val": []})


def select(emu, cfg, precision, scope: str = "adapter") -> tuple:
    """Freeze everything, then unfreeze what trains, held in fp32 before any optimizer exists.

    Args:
        emu: a loaded :class:`offsite.emulator.package.Emulator`.
        cfg: the run's :class:`offsite.workflows.finetune.FinetuneConfig` (``lora`` and its settings).
        precision: the run's :class:`offsite.core.precision.Policy`.
        scope: ``"adapter"``: the adapter layers (or LoRA on them), what ``finetune`` trains;
            ``"emulator"``: every weight of the emulator (or LoRA on every decoder layer), the
            audit's attacks.

    Returns:
        ``(params, peft_model_or_None, trained)``: ``{name: parameter}`` to optimise, and the
        :class:`offsite.core.precision.Trained` handle of their fp32 casts and boundary hooks.
    """
    if scope not in SCOPES:
        raise OffsiteError(f"unknown training scope {scope!r}; allowed: {', '.join(SCOPES)}")
    model = emu.model
    model.requires_grad_(False)
    layers = get_layers(model, emu.family)
    positions = adapter_part(emu, cfg.train_adapter) if scope == "adapter" else list(range(len(layers)))
    if cfg.lora:
        peft_model = wrap_lora(model, emu.family, positions, cfg)
        params = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
        # PEFT's LoRA layers cast their input to the LoRA weights' dtype and the result back: no hooks.
        return params, peft_model, precision.train(params=params.values())
    if scope == "emulator":
        # Nothing stays frozen, so there is no boundary to a lower-precision layer to hook.
        trained = precision.train(modules=[model], boundary=False)
        model.requires_grad_(True)
        return dict(model.named_parameters()), None, trained
    chosen = [layers[pos] for pos in positions]
    trained = precision.train(modules=chosen)  # before the optimizer: AdamW must see the fp32 tensors
    params = {}
    for pos, layer in zip(positions, chosen):
        for name, p in layer.named_parameters():
            p.requires_grad_(True)
            params[f"{emu.family.layers}.{pos}.{name}"] = p
    return params, None, trained


def adapter_part(emu, part: str) -> list:
    """Emulator positions of the adapter layers that train: ``all``, ``top`` (above the first middle
    layer) or ``bottom`` (below it).

    Raises:
        OffsiteError: the chosen part holds no adapter layer (e.g. ``bottom`` with split ``0,4``).
    """
    roles = [e["role"] for e in emu.manifest["plan"]["layers"]]
    first_middle = roles.index("emulator") if "emulator" in roles else len(roles)
    chosen = {"all": emu.adapter_positions,
              "top": [i for i in emu.adapter_positions if i > first_middle],
              "bottom": [i for i in emu.adapter_positions if i < first_middle]}[part]
    if not chosen:
        raise OffsiteError(f"train_adapter={part!r}: this emulator has no adapter layer there (adapter layers "
                           f"{list(emu.split.adapter)} of {emu.split.num_layers}); choose all or the other part")
    return chosen


def prepare(emu, data, cfg) -> Prepared:
    """Tokenise ``data`` (and ``cfg.val_data``) for ``emu`` and work out the run's length.

    Without ``val_data`` a seeded ``val_fraction`` of the training examples is held out (when
    there are at least 20); validation keeps ``val_limit`` examples.

    Raises:
        OffsiteError: bad data, or a tokenizer larger than the embedding.
    """
    model = emu.model
    block = min(cfg.block_size, getattr(model.config, "max_position_embeddings", cfg.block_size) or cfg.block_size)
    vocab = model.get_input_embeddings().num_embeddings
    if emu.tokenizer is not None and len(emu.tokenizer) > vocab:
        raise OffsiteError(f"the emulator's tokenizer has {len(emu.tokenizer)} tokens but its embedding only {vocab}")
    train = load_examples(data, cfg.format, emu.tokenizer, block, cfg.task)
    val = load_examples(cfg.val_data, cfg.format, emu.tokenizer, block, cfg.task) if cfg.val_data else []
    if not cfg.val_data and cfg.val_fraction > 0 and len(train) >= 20:
        random.Random(cfg.seed).shuffle(train)
        cut = max(1, int(len(train) * cfg.val_fraction))
        val, train = train[:cut], train[cut:]
    val = val[:cfg.val_limit]
    per_step = cfg.batch_size * cfg.grad_accum
    total = cfg.max_steps if cfg.max_steps is not None else math.ceil(cfg.epochs * len(train) / per_step)
    # Validation is overhead: by default 5 times a run (and at the end), see bench/finetune_overhead.py.
    eval_every = cfg.eval_every or max(1, math.ceil(total / VALIDATIONS))
    pad = emu.tokenizer.pad_token_id if emu.tokenizer.pad_token_id is not None else 0
    return Prepared(train, val, total, eval_every, pad)


def train(model, params: dict, precision, run: Prepared, cfg, device, checkpoints=None,
          desc: str = "finetune", private=None, group=None, penalty=None) -> State:
    """Train ``params`` of ``model`` for ``run.total`` optimizer steps; the best validated weights win.

    Each step: ``grad_accum`` micro-batches of ``batch_size`` examples (token ids ``(batch, seq)``),
    loss backward (scaled for fp16), clip to ``max_grad_norm``, AdamW step, schedule step. A
    non-finite loss (before backward) or gradient norm stops the run with
    :func:`offsite.training.checkpoint.diverged`, and so do non-finite weights at the end.

    Args:
        model: the emulator (an HF causal LM), already on ``device``.
        params: ``{name: parameter}`` from :func:`select`.
        precision: the run's :class:`offsite.core.precision.Policy`.
        run: from :func:`prepare`.
        cfg: the run's :class:`offsite.workflows.finetune.FinetuneConfig`.
        device: where the batches go.
        checkpoints: ``None`` (train in memory), or an object with ``folder``, ``saved`` (step of
            its last checkpoint or None), ``resume(params, optimizer, precision, scheduler, total)``
            returning a :class:`State` or None, and ``after_step(state, params, optimizer,
            precision, total)``; ``finetune`` passes its resumable checkpoints.
        desc: label of the progress bar.
        private: ``None``, or a :class:`offsite.training.dp.DPSGD` (``finetune`` with DP-SGD): each
            step's batch is then its Poisson sample, clipped per example and noised by Opacus in
            place of the micro-batches and the batch clipping, and the last weights are kept
            (choosing the best by the loss on private validation data is outside the guarantee).
        group: ``None``, or the :class:`offsite.training.distributed.Group` of a multi-process
            run: this process trains on its shard of every micro-batch (``batch_size`` is the
            global one), losses are weighted to the whole micro-batch's token mean, gradients
            summed over processes before clipping, validation sharded and summed; ``checkpoints``
            should then write on rank 0 only.
        penalty: ``None``, or a callable returning a scalar tensor of ``params`` added to every
            step's loss (FedProx's proximal term, :mod:`offsite.federate`); not with ``private`` or ``group``.

    Returns:
        The final :class:`State`; ``params`` hold the best validated weights (the last ones
        without validation), and ``state.log`` gains ``steps``, ``best_val_loss``,
        ``train_examples``, ``val_examples`` and ``seconds``.
    """
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    batches = Batcher(run.train, cfg.batch_size, cfg.seed, run.pad, device, group)
    # Several processes weigh each shard's loss by its tokens as one piece (.distributed): no parts there.
    budget = resolve_pass_tokens(cfg.pass_tokens, device) if group is None else 0
    step = steps.choose(model, params, precision, batches, cfg, budget, private, group, penalty)
    optimizer = torch.optim.AdamW(params.values(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    step.attach(optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.schedule, cfg.warmup_steps, run.total))
    state = State()
    if checkpoints is not None:
        state = checkpoints.resume(params, optimizer, precision, scheduler, run.total) or state
    if group is not None:
        group.agree(params.values(), state.step)
    autocast = precision.autocast()
    val_size = cfg.batch_size if group is None else cfg.batch_size // group.world
    started = time.time()
    model.train()
    with _progress(run.total, state.step, cfg.progress and (group is None or group.main), desc) as bar:
        while state.step < run.total:
            diverged_here = lambda what: _diverged(state.step + 1, what, checkpoints, cfg)  # noqa: E731
            loss_sum, norm = step.gradients(state.step, diverged_here)  # one call per step, whatever the mode
            # Clipping cannot rescue inf/NaN gradients; only fp16 overflow is skipped (by the loss scaler).
            if not math.isfinite(norm) and not precision.overflow_skips():
                raise _diverged(state.step + 1, f"gradient norm is {norm}", checkpoints, cfg)
            precision.step(optimizer)
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.log["train"].append({"step": state.step, "loss": round(loss_sum, 5),
                                       "lr": scheduler.get_last_lr()[0]})
            if run.val and (state.step % run.eval_every == 0 or state.step == run.total):
                val_loss = validate(model, run.val, val_size, run.pad, device, autocast, group, cfg.logits, budget)
                state.log["val"].append({"step": state.step, "loss": val_loss})
                if val_loss < state.best_loss and step.keeps_best:
                    state.best_loss, state.best = val_loss, {k: p.detach().clone() for k, p in params.items()}
                model.train()
            if checkpoints is not None:
                checkpoints.after_step(state, params, optimizer, precision, run.total)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum:.4f}")

    if state.best is not None:  # keep the weights with the lowest emulator validation loss
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(state.best[name])
    check_finite(params, state.step, checkpoints, cfg)
    state.log.update(steps=state.step, best_val_loss=None if math.isinf(state.best_loss) else state.best_loss,
                     train_examples=len(run.train), val_examples=len(run.val),
                     seconds=round(time.time() - started, 2))
    return state


def check_finite(tensors: dict, step: int, checkpoints, cfg) -> None:
    """Stop before a checkpoint, an adapter or a score could come from NaN/inf weights."""
    bad = first_nonfinite(tensors)
    if bad is not None:
        raise _diverged(step, f"trainable tensor '{bad}' holds NaN or infinite values", checkpoints, cfg)


def _diverged(step: int, what: str, checkpoints, cfg) -> OffsiteError:
    folder, saved = (None, None) if checkpoints is None else (checkpoints.folder, checkpoints.saved)
    return diverged(step, what, folder, saved, cfg.lr)


class Batcher:
    """Micro-batches of a deterministic per-epoch shuffle, addressed by index (so resuming is exact).

    The shuffled order of the current epoch is cached: indices arrive in sequence, so one entry
    turns the O(N) reshuffle per micro-batch into one per epoch, with the very same order.

    With a ``group`` (multi-process run) each call returns this process's shard of the micro-batch
    the single-process run would draw at that index.
    """

    def __init__(self, examples: list, size: int, seed: int, pad: int, device, group=None):
        self.examples, self.size, self.seed, self.pad, self.device = examples, size, seed, pad, device
        self.group = group
        self.per_epoch = max(1, len(examples) // size)
        self._epoch, self._order = None, []

    def order(self, epoch: int) -> list:
        """The example order of ``epoch``: ``range(N)`` shuffled by a per-epoch seeded RNG."""
        if epoch != self._epoch:
            order = list(range(len(self.examples)))
            random.Random(self.seed * 100003 + epoch).shuffle(order)
            self._epoch, self._order = epoch, order
        return self._order

    def __call__(self, index: int) -> dict:
        """Micro-batch ``index``: ``input_ids``, ``attention_mask``, ``labels`` of shape ``(size, seq)``."""
        epoch, offset = divmod(index, self.per_epoch)
        order = self.order(epoch)
        chosen = [self.examples[i] for i in order[offset * self.size:(offset + 1) * self.size]]
        chosen = chosen or [self.examples[order[0]]]
        if self.group is not None:
            chosen = self.group.shard(chosen)
        return {k: v.to(self.device) for k, v in collate(chosen, self.pad).items()}


@torch.no_grad()
def validate(model, examples, size: int, pad: int, device, autocast, group=None, logits: str = "scored",
             pass_tokens: int = 0) -> float:
    """Token-weighted mean loss over the validation examples (batches of ``(size, seq)`` token ids).

    With a ``group`` each process scores its shard and the sums are added over processes, so every
    process returns the same loss. ``logits`` and ``pass_tokens`` as in :class:`FinetuneConfig`
    (:mod:`offsite.data.token_loss`, :mod:`.parts`; the budget in effect, 0 = whole batches).
    """
    model.eval()
    total, count = 0.0, 0
    if group is not None:
        examples = group.shard(examples)
    for start in range(0, len(examples), size):
        batch = {k: v.to(device) for k, v in collate(examples[start:start + size], pad).items()}
        for part, _ in split(batch, pass_tokens):
            with autocast:
                losses = token_losses(model, part, logits).losses  # (scored tokens,) in fp32
            total += losses.sum().item()
            count += losses.numel()
    if group is not None:
        total, count = group.sum([total, count])
    return total / max(1, count)


def _progress(total: int, start: int, enabled: bool, desc: str):
    return bar(total, desc, "step", initial=start, enabled=enabled, leave=False)
