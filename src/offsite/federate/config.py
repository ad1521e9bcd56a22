"""Settings of federated offsite-tuning: the federation's own, and which fine-tuning settings apply per round."""

from __future__ import annotations

import dataclasses

from ..core.errors import OffsiteError
from ..core.settings_types import check_range, check_types
from ..workflows.finetune import make_config
from .partition import DIRICHLET_BY, SPLITS

STRATEGIES = ("fedavg", "fedprox")
KEEP = ("last", "best")

LOCAL_SETTINGS = ("format", "task", "lora", "lora_r", "lora_alpha", "lora_dropout", "lora_targets", "lr",
                  "weight_decay", "epochs", "max_steps", "batch_size", "grad_accum", "warmup_steps", "schedule",
                  "max_grad_norm", "block_size", "precision", "gradient_checkpointing", "device", "seed")
"""Fields of :class:`offsite.workflows.finetune.FinetuneConfig` a federated run takes; ``epochs`` and
``max_steps`` count *per round*. Left out: validation hold-out on clients (each client trains on all
of its data and returns its last weights; ``val_data`` is the server's), checkpoints and resumption
(a round is short; a run restarts), and DP-SGD (client-level DP is the server's setting here)."""


@dataclasses.dataclass
class FederateConfig:
    """Every setting of ``offsite federate`` besides the per-round fine-tuning ones (:data:`LOCAL_SETTINGS`)."""

    clients: int = 2
    """N, the data owners (simulated: the data file is split N ways)."""
    rounds: int = 3
    """R, the federated rounds: broadcast the adapter, train locally, aggregate."""
    split: str = "iid"
    """How the data file is split over the clients: iid or dirichlet (offsite.federate.partition)."""
    dirichlet_alpha: float = 0.5
    """Dirichlet concentration of --split dirichlet: smaller is more skewed."""
    dirichlet_by: str | None = None
    """What the Dirichlet is over: label, answer (mc data) or size; default label for mc, else size."""
    fraction: float = 1.0
    """Share of the clients sampled each round (at least one), seeded by (seed, round)."""
    strategy: str = "fedavg"
    """fedavg (McMahan et al. 2017) or fedprox (Li et al. 2020: + mu/2 ||w - w_global||^2 locally)."""
    mu: float = 0.0
    """FedProx's proximal weight (0 trains as FedAvg does)."""
    val_data: str | None = None
    """Server-side validation file: the global adapter's loss after every round (never sent to clients)."""
    client_dp_noise_multiplier: float | None = None
    """Client-level DP (Flower's server-side fixed clipping): noise std = this x clip / clients per round."""
    client_dp_clipping_norm: float | None = None
    """Client-level DP: each client's update (its adapter minus the global one) is clipped to this L2 norm."""
    client_dp_delta: float | None = None
    """Client-level DP: report epsilon at this delta (Opacus' RDP accountant; needs the dp extra)."""
    client_cpus: float = 1.0
    """CPU cores Flower's simulation reserves per client (Ray resources; concurrency = cores / this)."""
    client_gpus: float = 0.0
    """GPUs per simulated client (e.g. 0.5: two clients share one GPU)."""
    seed: int = 0
    """Seeds the split, the client choice and (with round and client) every local round; shared with
    the fine-tuning settings."""
    keep: str = "last"
    """Which global adapter is written: last (round R) or best (the lowest server validation loss of
    the trained rounds, as finetune keeps its best-validated weights; needs val_data)."""
    progress: bool = True
    """One line per round on stderr (the clients never show progress bars)."""

    @property
    def client_dp(self) -> bool:
        return self.client_dp_noise_multiplier is not None

    @property
    def per_round(self) -> int:
        """Clients sampled each round."""
        return max(1, int(self.fraction * self.clients))

    def __post_init__(self):
        given = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name, value in check_types(type(self), given, "federation setting").items():
            setattr(self, name, value)
        for name in ("clients", "rounds"):
            check_range(name, getattr(self, name), at_least=1)
        if self.split not in SPLITS:
            raise OffsiteError(f"split {self.split!r} unknown; allowed: {', '.join(SPLITS)}")
        check_range("dirichlet_alpha", self.dirichlet_alpha, above=0)
        if self.dirichlet_by is not None and self.dirichlet_by not in DIRICHLET_BY:
            raise OffsiteError(f"dirichlet_by {self.dirichlet_by!r} unknown; allowed: {', '.join(DIRICHLET_BY)}")
        check_range("fraction", self.fraction, above=0, at_most=1)
        if self.keep not in KEEP:
            raise OffsiteError(f"keep {self.keep!r} unknown; allowed: {', '.join(KEEP)}")
        if self.keep == "best" and not self.val_data:
            raise OffsiteError("keep='best' chooses the round by the server's validation loss: give val_data "
                               "(--val-data) too, or keep the last round")
        if self.strategy not in STRATEGIES:
            raise OffsiteError(f"strategy {self.strategy!r} unknown; allowed: {', '.join(STRATEGIES)}")
        check_range("mu", self.mu, at_least=0)
        if self.mu > 0 and self.strategy != "fedprox":
            raise OffsiteError(f"mu {self.mu} is FedProx's proximal weight; pass --strategy fedprox with it")
        if self.client_cpus <= 0 or self.client_gpus < 0:
            raise OffsiteError(f"client_cpus must be > 0 and client_gpus >= 0, got {self.client_cpus}, "
                               f"{self.client_gpus}")
        self._check_dp()

    def _check_dp(self) -> None:
        noise, clip, delta = self.client_dp_noise_multiplier, self.client_dp_clipping_norm, self.client_dp_delta
        if noise is None:
            if clip is not None or delta is not None:
                raise OffsiteError("client_dp_clipping_norm / client_dp_delta given without "
                                   "client_dp_noise_multiplier; client-level DP runs only with a noise multiplier")
            return
        check_range("client_dp_noise_multiplier", noise, above=0)
        if clip is None or clip <= 0:
            raise OffsiteError(f"client-level DP needs client_dp_clipping_norm > 0 (the L2 bound of one client's "
                               f"update), got {clip}")
        if delta is not None:
            check_range("client_dp_delta", delta, above=0, below=1)


def split_settings(settings: dict) -> tuple:
    """``(FederateConfig, per-round fine-tuning settings)`` from keyword settings; unknown names refused at once."""
    fed = {f.name for f in dataclasses.fields(FederateConfig)}
    unknown = sorted(set(settings) - fed - set(LOCAL_SETTINGS))
    if unknown:
        raise OffsiteError(f"unknown federation setting(s) {unknown}; known: {sorted(fed | set(LOCAL_SETTINGS))}")
    cfg = FederateConfig(**{k: v for k, v in settings.items() if k in fed})  # seed goes to both
    # A constant local learning rate by default, as in FedAvg: a schedule restarts every round.
    local = {"schedule": "constant", **{k: v for k, v in settings.items() if k in LOCAL_SETTINGS}}
    return cfg, local


def local_config(local: dict, seed: int | None = None):
    """The :class:`offsite.workflows.finetune.FinetuneConfig` of one client's round: no hold-out, no progress bar."""
    settings = {**local, "val_fraction": 0.0, "progress": False}
    if seed is not None:
        settings["seed"] = seed
    return make_config(settings)


def local_seed(seed: int, server_round: int, partition: int) -> int:
    """The seed of one client's round (its batch order, dropout): distinct per (round, client).

    Round 1's client 0 keeps ``seed`` itself, so one client for one round draws exactly the batches
    ``offsite finetune --seed seed`` draws.
    """
    return seed + 1_000_003 * (server_round - 1) + partition
