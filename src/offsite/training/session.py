"""One training session: what every trainer of an emulator sets up before it chooses what trains.

``offsite finetune``, the attacks of ``offsite audit`` and the clients (and server) of ``offsite
federate`` train the same way, and the audit's same-budget guarantee rests on it: the seed is set,
then the emulator package is loaded (and checked) onto the device, then the mixed-precision policy
follows from its checkpoint dtype and the device (:mod:`offsite.core.precision`). Seeding before the load
matters: LoRA's initial A and the dropout streams are drawn after it, in the same order everywhere.
What trains (:func:`offsite.training.loop.select`) and on which data (:func:`~offsite.training.loop.prepare`)
stays with each caller: the attacks train the emulator's middle, in stages.
"""

from __future__ import annotations

import dataclasses

import torch

from ..core.precision import Policy, base_dtype, policy
from ..emulator.package import Emulator, load_emulator


@dataclasses.dataclass
class Session:
    """A loaded emulator ready to train.

    Attributes:
        device: where it trains.
        emu: the loaded, checked :class:`offsite.emulator.package.Emulator`.
        precision: the mixed-precision policy for its dtype on ``device``.
    """

    device: torch.device
    emu: Emulator
    precision: Policy


def open_session(emulator, cfg, device, trusted_keys=None) -> Session:
    """Seed, load ``emulator`` onto ``device``, and pick the precision policy (``cfg``: a FinetuneConfig).

    Args:
        emulator: emulator package folder.
        cfg: :class:`offsite.training.config.FinetuneConfig` (its ``seed`` and ``precision``).
        device: a resolved device (:func:`offsite.core.device.resolve_device`).
        trusted_keys: public key files; when given, the package must be signed by one.
    """
    torch.manual_seed(cfg.seed)
    emu = load_emulator(emulator, device=device, trusted_keys=trusted_keys)
    return Session(device, emu, policy(cfg.precision, base_dtype(emu.model), device))
