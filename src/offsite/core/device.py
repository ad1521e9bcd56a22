"""Where a workflow runs: one ``device`` value, resolved to a ``torch.device`` or refused.

Every workflow (``emulate``, ``finetune``, ``plug``, ``eval``, ``report``, ``demo``) takes
``device``: ``"auto"`` (CUDA when present, else the CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or
``"mps"``. The workflow resolves it first, before it reads a model or writes anything, so a device
this machine does not have, or a name torch does not know, costs nothing but one error that says
what is available here.

Placement rule the workflows follow: the model is loaded onto the resolved device once and every
tensor a step makes (calibration batches, statistics, scores, optimiser state) is made where the
model's parameters are; only what leaves the run (artifact tensors at save time, JSON numbers,
hashes) is copied to the CPU.

A process of a multi-process run (``torchrun --nproc_per_node N -m offsite.cli finetune ...``)
resolves its device with :func:`process_device` instead: its own GPU ``cuda:LOCAL_RANK``, or the CPU.
"""

from __future__ import annotations

import os

import torch

from .errors import OffsiteError

KINDS = ("cpu", "cuda", "mps")
"""Device types offsite runs on (torch knows more, e.g. ``meta``, that cannot hold a real model)."""


def model_device(module) -> torch.device:
    """The device of a module's first parameter (CPU for a module without parameters)."""
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def available_devices() -> list:
    """Device names this machine accepts, ``"auto"`` first.

    Returns:
        e.g. ``["auto", "cpu"]`` on a CPU-only machine, ``["auto", "cpu", "cuda", "cuda:0"]`` with one GPU.
    """
    names = ["auto", "cpu"]
    if torch.cuda.is_available():
        names += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if _mps_available():
        names.append("mps")
    return names


def _refuse(name, why: str) -> OffsiteError:
    return OffsiteError(f"device {name!r} {why}; choose --device from: {', '.join(available_devices())}")


def resolve_device(name="auto") -> torch.device:
    """The ``torch.device`` a workflow runs on.

    Args:
        name: ``"auto"`` (or None), ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"``, or a
            ``torch.device``. Case and surrounding spaces are ignored.

    Returns:
        The device; ``auto`` gives ``cuda`` when ``torch.cuda.is_available()``, else ``cpu``.

    Raises:
        OffsiteError: an unknown name (``"tpu"``, ``"cuda:x"``), or a device this machine does not
            have (``"cuda"`` without CUDA, ``"cuda:3"`` with two GPUs, ``"mps"`` off Apple silicon).
    """
    if name is None:
        name = "auto"
    if isinstance(name, torch.device):
        name = str(name)
    if not isinstance(name, str):
        raise OffsiteError(f"device must be a name such as 'auto', 'cpu' or 'cuda:0', got {name!r}")
    text = name.strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):  # torch's own refusal of the string ("Invalid device string")
        device = None
    if device is None or device.type not in KINDS:
        raise _refuse(name, f"is not a device name offsite knows ({', '.join(KINDS)}, cuda:N or auto)")
    if device.type == "cpu":
        return torch.device("cpu")  # "cpu:0" is the same CPU; one spelling keeps records comparable
    if device.type == "mps" and not _mps_available():
        raise _refuse(name, "is not available here (torch.backends.mps.is_available() is False)")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise _refuse(name, "is not available here (torch.cuda.is_available() is False)")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise _refuse(name, f"is not available here (this machine has {count} CUDA device(s))")
    return device


def process_device(name, local_rank: int, world: int) -> torch.device:
    """The device of one process of a multi-process run (``torchrun``, ``accelerate launch``).

    Each process of a node takes its own GPU, ``cuda:LOCAL_RANK``; on CPU they share the CPU.

    Args:
        name: the ``--device`` value: ``"auto"`` (CUDA when present, unless ``accelerate launch
            --cpu`` set ``ACCELERATE_USE_CPU``), ``"cuda"`` or ``"cpu"``.
        local_rank: the process's index on its node (the launcher's ``LOCAL_RANK``).
        world: number of processes of the run (for the messages).

    Raises:
        OffsiteError: what :func:`resolve_device` refuses, ``cuda:N`` or ``mps`` (one device for
            every process), or more processes on this node than it has GPUs.
    """
    text = name.strip().lower() if isinstance(name, str) else name
    if text in (None, "auto") and os.environ.get("ACCELERATE_USE_CPU", "").strip().lower() in ("1", "true", "yes"):
        text = "cpu"  # accelerate launch --cpu: the user asked for the CPU although a GPU may be present
    device = resolve_device(text)
    if device.type == "cpu":
        return device
    if device.type != "cuda" or device.index is not None:
        raise _refuse(name, f"would be shared by all {world} processes of this multi-process run (each takes its "
                            "own GPU, cuda:LOCAL_RANK); pass --device cuda (or auto) or cpu")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise OffsiteError(f"process with LOCAL_RANK {local_rank} has no GPU of its own: this machine has {count}; "
                           f"launch at most {count} processes per node, or pass --device cpu")
    return torch.device("cuda", local_rank)
