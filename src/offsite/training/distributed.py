"""Multi-process data-parallel fine-tuning: ``offsite finetune`` under ``torchrun`` or ``accelerate launch``.

Launch (the command line is the single-process one, unchanged)::

    torchrun --nproc_per_node 2 -m offsite.cli finetune --emulator EMU --data FILE --out ADAPTER ...
    accelerate launch --multi_gpu --num_processes 2 -m offsite.cli finetune ...   # one GPU per process

A run is distributed when the launcher's environment says so (``WORLD_SIZE`` > 1, or an MPI
world size); otherwise nothing here runs and a run is bit for bit what it always was. On CPU
the processes talk over gloo (``torchrun --nproc_per_node N`` works as is; ``accelerate launch
--cpu`` starts several CPU processes only through ``--mpirun_hostfile``), on CUDA over NCCL with
process ``LOCAL_RANK`` on GPU ``cuda:LOCAL_RANK``. The process group is set up by accelerate's
:class:`accelerate.PartialState`, which reads every launcher's environment.

Semantics:

* ``--batch-size`` is the **global** micro-batch: each optimizer step still consumes
  ``batch_size x grad_accum`` examples in the single-process order (same shuffle, same steps,
  same schedule), and each of the ``N`` processes takes a disjoint contiguous ``batch_size / N``
  of every micro-batch. ``batch_size`` must divide by ``N`` (else one error before any work).
* The loss of a micro-batch is the token mean over the *whole* micro-batch, as in one process:
  each process weights its shard's mean by its share of the micro-batch's target tokens, and the
  gradients of the trained parameters are summed over processes before clipping. Every process
  therefore clips, steps and schedules the same gradients, so the trained weights and AdamW's
  state stay identical everywhere; only the floating-point order of the sums differs from a single
  process (measured on the test model, 4 fp32 steps at global batch 4: max abs difference of the
  adapter tensors 8e-8, of LoRA's 4e-7; tests/test_distributed.py allows 1e-5).
* Validation is sharded too and summed, so every process sees the same validation loss and keeps
  the same best weights.
* Only rank 0 writes checkpoints, the artifact and progress; the others wait at a barrier. Each
  process reads ``<out>.ckpt`` when resuming, so it must lie on a folder every process sees. The
  global-batch semantics make a checkpoint resumable under any number of processes.

Why not ``Accelerator.prepare`` / DDP: only the adapter (or its LoRA) trains, inside a frozen
emulator that has no gradients. DDP would wrap (and broadcast) the whole emulator, every forward
of the shared loop (:mod:`.loop`, also run by the audit's attacks) would have to go through the
wrapper, and gradient accumulation would need ``no_sync`` around the micro-batches. One summed
all-reduce of the trained gradients per optimizer step (bucketed, in :meth:`Group.sum_grads`) is
the same arithmetic with one synchronisation point, and leaves the loop untouched when not
distributed. DP-SGD (Opacus) is refused under several processes for now, and so is FSDP: the
frozen emulator is replicated on every process.
"""

from __future__ import annotations

import os

import torch

from ..core.device import process_device
from ..core.errors import OffsiteError

_WORLD_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
"""Environment variables a launcher (torchrun, accelerate, mpirun) sets to the number of processes."""
BUCKET = 1 << 24
"""Gradient elements all-reduced at once (64 MiB of fp32): bounds the extra memory of the flat buffer."""


def world_size() -> int:
    """The number of processes this one was launched among (1 when not launched distributed).

    Read from the launcher's environment, so it is known before any process group exists and a
    bad setting is refused before any work.

    Raises:
        OffsiteError: a world-size variable that is not a positive integer.
    """
    for name in _WORLD_VARS:
        value = os.environ.get(name)
        if value is None or value.strip() == "":
            continue
        try:
            size = int(value)
        except ValueError:
            size = 0
        if size < 1:
            raise OffsiteError(f"environment variable {name}={value!r} must be a positive number of processes")
        return size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()  # a caller's own process group (finetune called from a script)
    return 1


def lone_process_note() -> str | None:
    """A warning when ``accelerate launch --cpu --num_processes N`` started this one process alone, else None.

    Without ``--mpirun_hostfile`` accelerate's CPU launcher starts one process however many are
    asked for (it sets ``MASTER_ADDR`` for them but no world size): the run is then an ordinary
    single-process one, and the user should know it is not parallel.
    """
    accelerate_cpu = os.environ.get("ACCELERATE_USE_CPU", "").strip().lower() in ("1", "true", "yes")
    if accelerate_cpu and os.environ.get("MASTER_ADDR") and not any(os.environ.get(n) for n in _WORLD_VARS):
        return ("accelerate launch --cpu started a single process (its CPU launcher starts several only with "
                "--mpirun_hostfile); training in one process. For several CPU processes on this machine use "
                "torchrun --nproc_per_node N -m offsite.cli finetune ...")
    return None


def writes() -> bool:
    """Whether this process writes (and reports) the run's output: rank 0, or the only process."""
    initialized = torch.distributed.is_available() and torch.distributed.is_initialized()
    return not initialized or torch.distributed.get_rank() == 0


def check(cfg, world: int) -> None:
    """Refuse settings a run over ``world`` processes cannot honour (before any work or output).

    Raises:
        OffsiteError: ``batch_size`` not divisible by ``world``, or DP-SGD.
    """
    if cfg.batch_size % world:
        raise OffsiteError(f"--batch-size {cfg.batch_size} is the global batch and must divide by the {world} "
                           f"processes (each takes batch-size / {world} examples of every micro-batch); pick a "
                           f"multiple of {world}")
    if cfg.dp:
        raise OffsiteError(f"DP-SGD (--dp-*) is not supported under {world} processes yet: its Poisson batches, "
                           "per-example clipping and noise would have to be drawn once for all of them; run it "
                           "in one process")


def join(name, world: int):
    """Join the launcher's process group; returns ``(Group, device)`` of this process.

    Args:
        name: the ``--device`` value (see :func:`offsite.core.device.process_device`).
        world: :func:`world_size`.

    Raises:
        OffsiteError: a bad ``LOCAL_RANK``, a device a multi-process run cannot use, or a process
            group of another size.
    """
    from accelerate import PartialState

    text = os.environ.get("LOCAL_RANK", os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK", "0")).strip() or "0"
    if not text.isdigit():
        raise OffsiteError(f"environment variable LOCAL_RANK={text!r} must be this process's index on its node")
    local = int(text)
    device = process_device(name, local, world)
    state = PartialState(cpu=device.type == "cpu")
    if state.num_processes != world:
        raise OffsiteError(f"the launcher announced {world} processes but the process group has "
                           f"{state.num_processes}; launch with torchrun or accelerate launch")
    return Group(state.process_index, state.num_processes, device), device


class Group:
    """This process's place among the processes of one run, and the collectives the loop needs.

    Attributes:
        rank: this process's index (0 writes everything).
        world: number of processes.
        device: where this process computes (collectives run on it: NCCL needs CUDA tensors).
    """

    def __init__(self, rank: int, world: int, device):
        self.rank, self.world, self.device = rank, world, torch.device(device)

    @property
    def main(self) -> bool:
        """Whether this is rank 0, the process that writes checkpoints, the artifact and progress."""
        return self.rank == 0

    def shard(self, items: list) -> list:
        """This process's contiguous share of ``items`` (sizes differ by at most one)."""
        n = len(items)
        return items[n * self.rank // self.world:n * (self.rank + 1) // self.world]

    def sum(self, values) -> list:
        """``values`` (floats) summed over every process, in float64; every process gets the same sums."""
        tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(tensor)
        return tensor.tolist()

    def weigh(self, loss: torch.Tensor, labels: torch.Tensor, anchor: torch.Tensor) -> tuple:
        """This shard's share of the micro-batch loss, and that loss's value (the same on every process).

        Args:
            loss: the model's token-mean loss over this shard (already divided by ``grad_accum``).
            labels: this shard's labels ``(batch, seq)``, ``-100`` where nothing is predicted.
            anchor: a tensor of the forward pass, the scored hidden states or the logits
                (:func:`offsite.data.token_loss.mean_loss`), to backpropagate a zero through an empty shard.

        Returns:
            ``(local, value)``: ``local`` weighted by this shard's share of the micro-batch's target
            tokens, so that gradients summed over processes are those of the whole micro-batch's
            token mean; ``value`` that mean (NaN everywhere if it is NaN anywhere).
        """
        count = int((labels[:, 1:] != -100).sum())  # the tokens a causal LM's shifted loss averages over
        tokens, total = self.sum([count, loss.detach().float().item() * count if count else 0.0])
        value = total / tokens if tokens else float("nan")  # one process with no tokens at all: as HF's 0/0
        if not count:
            # HF's mean over no token is NaN; this shard adds nothing but must still run backward.
            return anchor.sum() * 0.0, value
        return loss * (count / tokens), value

    @torch.no_grad()
    def sum_grads(self, params) -> None:
        """Sum the gradients of ``params`` over every process, in place, in buckets of :data:`BUCKET` elements.

        A parameter without a gradient gets zeros, so every process all-reduces the same sizes.
        """
        params = list(params)
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        start = 0
        while start < len(params):
            end, size = start, 0
            while end < len(params) and (end == start or size + params[end].numel() <= BUCKET):
                size += params[end].numel()
                end += 1
            grads = [p.grad for p in params[start:end]]
            flat = torch.cat([g.reshape(-1) for g in grads])
            torch.distributed.all_reduce(flat)
            offset = 0
            for g in grads:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()
            start = end

    @torch.no_grad()
    def agree(self, params, step: int) -> None:
        """Start every process from rank 0's weights, and refuse processes that resumed different steps.

        Raises:
            OffsiteError: the processes resumed from different checkpoint steps (``<out>.ckpt`` not
                on a folder every process sees).
        """
        # One MAX over (step, -step) gives the highest and the lowest step resumed by any process.
        steps = torch.tensor([step, -step], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(steps, op=torch.distributed.ReduceOp.MAX)
        if steps[0].item() != -steps[1].item():
            raise OffsiteError(f"the {self.world} processes resumed from different steps ({int(-steps[1].item())} to "
                               f"{int(steps[0].item())}): the checkpoint folder must be one every process sees "
                               "(a shared file system), or pass --no-resume")
        for p in params:
            torch.distributed.broadcast(p.data, src=0)

    def barrier(self) -> None:
        """Wait until every process got here (the others wait for rank 0's writes)."""
        torch.distributed.barrier()
