"""The model owner's side of federated offsite-tuning: the global adapter, the ServerApp and its round loop.

Method. The model owner holds the emulator package it shipped: the initial global adapter w_0 is
the package's adapter (or a LoRA initialised by the seed, as ``offsite finetune`` would), the
rounds are Flower's ``Strategy.start`` with the strategy of :mod:`.strategy`, and the final w_R is
written with the writers of ``offsite finetune`` (:func:`offsite.adapters.artifact.save_full_adapter`,
:func:`~offsite.adapters.artifact.save_lora_adapter`): an ordinary adapter artifact bound to the emulator,
which ``offsite plug``, ``verify`` and ``inspect`` take as they take a fine-tuned one. With
``val_data`` the server scores w_t on it after every round (centralised evaluation; clients never
see it) and logs the loss; the written adapter is the last round's, not the best-scored one.

Before round 1 a query asks every client its partition number and emulator ``artifact_id``: the
partition -> node map makes the seeded client choice possible, and a client holding any other
emulator package stops the run there, before any training.
"""

from __future__ import annotations

import sys
import threading
import time

import torch

from ..adapters.artifact import save_full_adapter, save_lora_adapter
from ..artifacts import guard_output
from ..core.errors import OffsiteError
from ..core.progress import showing
from ..training.loop import prepare, validate
from .client import cpu_copy, trainable
from .config import local_config, split_settings


class Server:
    """The model owner's emulator and global adapter for one federated run.

    Args:
        emulator: the emulator package folder (the one shipped to the clients).
        cfg: the run's :class:`offsite.federate.config.FederateConfig`.
        local: the per-round fine-tuning settings (what trains: adapter or LoRA).
        trusted_keys: public key files the package must be signed by, if given.

    Attributes:
        emu, params, peft_model: as in ``offsite finetune``; ``history``: per-round log entries.
    """

    def __init__(self, emulator, cfg, local: dict, trusted_keys=None):
        self.cfg, self.local, self.lcfg = cfg, local, local_config(local)
        trainable(self, emulator, self.lcfg, trusted_keys)  # LoRA's initial A, exactly as finetune draws it
        self.val = prepare(self.emu, cfg.val_data, self.lcfg).train[:self.lcfg.val_limit] if cfg.val_data else []
        self.pad = self.emu.tokenizer.pad_token_id or 0
        self.stop = threading.Event()  # set by the caller when the engine died: the rounds then end with an error
        self.reset()

    def reset(self) -> None:
        """Forget what a run recorded (before a restart of the engine)."""
        self.history, self.seconds, self.initial_val_loss = [], None, None
        self.best = None  # (val loss, round, arrays) of the best round so far, for keep="best"

    def arrays(self) -> dict:
        """The global adapter now, ``{name: CPU fp32 tensor}``."""
        return cpu_copy(self.params)

    def load(self, arrays: dict) -> None:
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(arrays[name].to(p.device, p.dtype))

    def evaluate(self, server_round: int, record):
        """Flower's ``evaluate_fn``: the validation loss of the global adapter ``record``."""
        from flwr.app import MetricRecord

        arrays = record.to_torch_state_dict()
        self.load(arrays)
        loss = validate(self.emu.model, self.val, self.lcfg.batch_size, self.pad, self.device,
                        self.precision.autocast())
        # round 0 is the untouched adapter: like finetune, only trained weights can be the best
        if server_round > 0 and (self.best is None or loss < self.best[0]):
            self.best = (loss, server_round, {k: v.detach().clone() for k, v in arrays.items()})
        if self.cfg.progress:
            _say(f"[offsite] round {server_round}/{self.cfg.rounds}: global adapter val loss {loss:.4f}")
        return MetricRecord({"val-loss": loss})

    def run(self, grid) -> None:
        """The ServerApp's main: discover the clients, run the rounds, keep w_R in the emulator."""
        from flwr.app import ArrayRecord

        from .strategy import Federation  # subclasses Flower's strategies: needs the fl extra

        started = time.time()
        grid = Watched(grid, self.stop)
        nodes = discover(grid, self.cfg, self.emu.artifact_id)
        shapes = {k: tuple(p.shape) for k, p in self.params.items()}
        report = (lambda entry: _say(round_line(entry, self.cfg.rounds))) if self.cfg.progress else None
        strategy = Federation(self.cfg, shapes, nodes, report=report)
        result = strategy.start(grid=grid, initial_arrays=ArrayRecord(self.arrays()), num_rounds=self.cfg.rounds,
                                evaluate_fn=self.evaluate if self.val else None)
        keep_best = self.cfg.keep == "best" and self.best is not None
        self.load(self.best[2] if keep_best else result.arrays.to_torch_state_dict())
        self.kept_round = self.best[1] if keep_best else self.cfg.rounds
        scores = result.evaluate_metrics_serverapp
        for entry in strategy.history:
            if entry["round"] in scores:
                entry["val_loss"] = round(float(scores[entry["round"]]["val-loss"]), 5)
        self.history = strategy.history
        self.initial_val_loss = float(scores[0]["val-loss"]) if 0 in scores else None
        self.seconds = round(time.time() - started, 2)

    def write(self, out, settings: dict, overwrite=False, inputs=(), sign_key=None):
        """Write w_R as the adapter artifact ``out`` (kind ``adapter``, or ``lora``)."""
        self.trained.release()  # the fp32 masters stay; the writers cast them to the base dtype
        self.emu.model.eval()
        log = {"rounds": self.history, "initial_val_loss": self.initial_val_loss,
               "rounds_run": len(self.history), "kept_round": getattr(self, "kept_round", None),
               "seconds": self.seconds}
        if self.lcfg.lora:
            return save_lora_adapter(out, self.emu, self.peft_model, settings, log, overwrite=overwrite,
                                     inputs=inputs, sign_key=sign_key)
        return save_full_adapter(out, self.emu, settings, log, overwrite=overwrite, inputs=inputs, sign_key=sign_key)


def server_app(server: Server):
    """A Flower ``ServerApp`` whose main runs ``server`` (simulation: the caller writes the artifact)."""
    from flwr.serverapp import ServerApp

    flower = ServerApp()

    @flower.main()
    def main(grid, context):
        server.run(grid)

    return flower


def _deployed(grid, context) -> None:
    """The ServerApp of a real deployment: every setting from the run config, then the artifact."""
    from pathlib import Path

    settings = {k.replace("-", "_"): v for k, v in context.run_config.items()}
    missing = [k for k in ("emulator", "out") if k not in settings]
    if missing:
        raise OffsiteError(f"the run config lacks {missing}: the server's emulator package folder and the adapter "
                           "folder to write (flwr run --run-config 'emulator=\"emu/\" out=\"adapter/\" ...')")
    emulator, out = settings.pop("emulator"), Path(settings.pop("out"))
    cfg, local = split_settings(settings)
    guard_output(out, "lora" if local.get("lora") else "adapter", False, [emulator, cfg.val_data])
    server = Server(emulator, cfg, local)
    server.run(grid)
    resolved = {"command": "federate (deployment)", "emulator": str(emulator), **settings,
                "federation": federation_record(cfg, None)}
    server.write(out, resolved, inputs=[emulator, cfg.val_data])


def federation_record(cfg, parts: list | None) -> dict:
    """The settings' ``federation`` entry: how the adapter was trained across the clients."""
    import flwr

    return {"clients": cfg.clients, "rounds": cfg.rounds, "strategy": cfg.strategy, "mu": cfg.mu,
            "fraction": cfg.fraction, "clients_per_round": cfg.per_round, "seed": cfg.seed,
            "split": cfg.split if parts is not None else "each client's own data",
            "dirichlet_alpha": cfg.dirichlet_alpha if cfg.split == "dirichlet" else None,
            "dirichlet_by": cfg.dirichlet_by if cfg.split == "dirichlet" else None,
            "partition_sizes": None if parts is None else [len(p) for p in parts],
            "aggregation": "unweighted mean" if cfg.client_dp else "mean weighted by examples",
            "client_dp": client_dp_record(cfg), "val_data": cfg.val_data,
            "engine": "flwr.simulation (Ray)" if parts is not None else "Flower deployment",
            "library": f"flwr {flwr.__version__}"}


class Watched:
    """A Flower grid whose waits end with an error once ``stop`` is set (Flower's would wait out their timeout).

    In a simulation the ServerApp runs in a thread of its own; if the engine dies, that thread would
    otherwise sit in ``send_and_receive`` for the whole round timeout and keep the process alive.
    """

    def __init__(self, grid, stop: threading.Event, poll: float = 0.2):
        self.grid, self.stop, self.poll = grid, stop, poll

    def __getattr__(self, name):
        return getattr(self.grid, name)

    def _check(self) -> None:
        if self.stop.is_set():
            raise OffsiteError("the federated run was stopped: Flower's simulation engine is gone")

    def get_node_ids(self):
        self._check()
        return self.grid.get_node_ids()

    def send_and_receive(self, messages, *, timeout: float | None = None):
        waiting = set(self.grid.push_messages(messages))
        end = None if timeout is None else time.time() + timeout
        replies = []
        while waiting and (end is None or time.time() < end):
            self._check()
            got = list(self.grid.pull_messages(waiting))
            replies += got
            waiting -= {m.metadata.reply_to_message_id for m in got}
            if waiting:
                time.sleep(self.poll)
        return replies


def discover(grid, cfg, emulator_id: str, timeout: float = 600.0) -> dict:
    """Wait for the N clients, ask each its partition and emulator; ``{partition: node id}``.

    Raises:
        OffsiteError: a client holds another emulator package, two claim one partition, or not
            all N connect within ``timeout`` seconds.
    """
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict

    started = time.time()
    while len(nodes := list(grid.get_node_ids())) < cfg.clients:
        if time.time() - started > timeout:
            raise OffsiteError(f"only {len(nodes)} of {cfg.clients} clients connected within {timeout:.0f} s")
        time.sleep(1)
    messages = [Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=n, message_type=MessageType.QUERY)
                for n in nodes]
    mapping = {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        if reply.has_error():
            raise OffsiteError(f"a client failed before round 1: {reply.error.reason}")
        info = reply.content["config"]
        if info["emulator"] != emulator_id:
            raise OffsiteError(f"client {info['partition-id']} holds emulator {str(info['emulator'])[:16]}, not the "
                               f"server's {emulator_id[:16]}; every data owner needs the same emulator package")
        mapping[int(info["partition-id"])] = reply.metadata.src_node_id
    if len(mapping) != cfg.clients:
        raise OffsiteError(f"{len(mapping)} distinct partitions among {cfg.clients} clients")
    return mapping


def client_dp_record(cfg) -> dict | None:
    """What the settings record of client-level DP: mechanism, sigma, C, noise std and, with a delta, epsilon."""
    if not cfg.client_dp:
        return None
    record = {"mechanism": "client-level DP (Flower DifferentialPrivacyServerSideFixedClipping): update clipped "
                           "to C, unweighted mean, Gaussian noise", "noise_multiplier": cfg.client_dp_noise_multiplier,
              "clipping_norm": cfg.client_dp_clipping_norm, "clients_per_round": cfg.per_round,
              "noise_std": cfg.client_dp_noise_multiplier * cfg.client_dp_clipping_norm / cfg.per_round,
              "releases": cfg.rounds, "adjacency": "add or remove one client's whole data", "epsilon": None,
              "delta": cfg.client_dp_delta}
    if cfg.client_dp_delta is not None:
        from opacus.accountants import RDPAccountant

        # Sample rate 1: no amplification by client sampling is claimed (conservative for fraction < 1).
        accountant = RDPAccountant()
        accountant.history = [(cfg.client_dp_noise_multiplier, 1.0, cfg.rounds)]
        record["epsilon"] = float(accountant.get_epsilon(delta=cfg.client_dp_delta))
        record["accountant"] = "opacus rdp, no sampling amplification"
    return record


def round_line(entry: dict, total: int) -> str:
    """One progress line per round."""
    return (f"[offsite] round {entry['round']}/{total}: clients {entry['clients']} ({sum(entry['examples'])} "
            f"examples), mean local train loss {entry['train_loss']:.4f}")


def _say(line: str) -> None:
    if showing():
        print(line, file=sys.stderr, flush=True)


def __getattr__(name):
    # `app` for Flower deployments (serverapp = "offsite.federate.server:app"), built on first access.
    if name == "app":
        from flwr.serverapp import ServerApp

        flower = ServerApp()
        flower.main()(_deployed)
        return flower
    raise AttributeError(name)
