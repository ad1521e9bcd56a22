"""The data owner's side of federated offsite-tuning: one local round, and the Flower ClientApp around it.

Method. A round of client k (FedAvg, McMahan et al. 2017; FedProx, Li et al. 2020): copy the
global adapter w_t into the emulator's trained tensors, run the fine-tuning loop of ``offsite
finetune`` (:func:`offsite.training.loop.train`: AdamW, schedule, accumulation, clipping, the
precision policy) for the round's local steps on the client's own examples, seeded by (run seed,
round, client), and return the trained tensors w_t^k with the number of examples n_k. FedProx adds
mu/2 * ||w - w_t||^2 to every step's loss (the loop's ``penalty`` hook). Only the trained tensors
cross: the adapter layers' weights, or LoRA's A/B with ``lora`` — never data, never the emulator;
beside them a reply carries n_k, the mean local loss, the step count and the client's number
(statistics of the local data that client-level DP does not cover, as in Flower).

Where it departs from plain ``offsite finetune``: the optimizer and schedule restart every round
(AdamW's moments are local state, as in FedAvg with a local optimizer); a client holds out no
validation data and returns its last weights (validation, if any, is the server's); checkpoints
are not written (a round is short; a failed run is rerun).

Cost: the emulator is loaded once per process and reused by every round and every client the
process serves (each round overwrites the trained tensors with the global ones anyway).

A real deployment (one SuperNode per data owner, see :mod:`offsite.federate`) uses :data:`app`:
the emulator package and the local data file come from the node's ``--node-config``
(``emulator``, ``data``), the fine-tuning settings from the run config (``flwr run --run-config``).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch

from ..core.device import resolve_device
from ..core.errors import OffsiteError
from ..training.loop import Prepared, prepare, select, train as train_loop
from ..training.session import open_session
from .config import local_config, local_seed, split_settings

_TRAINERS: dict = {}
"""Per process: (emulator, data, settings) -> :class:`Trainer`, so rounds reuse the loaded emulator."""
_LOADS = [0]
"""Trainers this process has built (reported with every reply: the cache is observable)."""


def trainable(party, emulator, local_cfg, trusted_keys=None) -> None:
    """Give ``party`` (the server or a client) what ``offsite finetune`` trains with, as finetune sets it up.

    Sets ``device``, ``emu`` (the loaded package), ``precision``, ``params`` / ``peft_model`` /
    ``trained`` (:func:`offsite.training.loop.select`); LoRA's initial A is drawn from the seed, as
    finetune draws it, so server and clients start from the same global adapter.
    """
    session = open_session(emulator, local_cfg, resolve_device(local_cfg.device), trusted_keys)
    party.device, party.emu, party.precision = session.device, session.emu, session.precision
    party.params, party.peft_model, party.trained = select(party.emu, local_cfg, party.precision, "adapter")


def cpu_copy(params: dict) -> dict:
    """``{name: CPU fp32 copy}`` of the trained tensors: what crosses between server and clients."""
    return {k: p.detach().float().cpu().clone() for k, p in params.items()}


class Trainer:
    """One data owner's emulator, trained tensors and examples; :meth:`fit` runs one local round.

    Args:
        emulator: emulator package folder.
        data: the local training file.
        local: per-round fine-tuning settings (:data:`offsite.federate.config.LOCAL_SETTINGS`).
        threads: torch CPU threads of this process (a simulated client gets its share of cores).

    Attributes:
        emu: the loaded :class:`offsite.emulator.package.Emulator`; ``params``: ``{name: parameter}`` trained.
        examples: the file's tokenised examples in file order (the split indexes into them).
    """

    def __init__(self, emulator, data, local: dict, threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)
        self.cfg = local_config(local)
        trainable(self, emulator, self.cfg)  # LoRA's init is replaced by the global adapter anyway
        self.run = prepare(self.emu, data, self.cfg)  # val_fraction 0: every example, in file order
        self.examples = self.run.train

    def load(self, arrays: dict) -> None:
        """Copy ``{name: tensor}`` into the trained tensors, refusing any other set of names or shapes."""
        if set(arrays) != set(self.params):
            extra, missing = sorted(set(arrays) - set(self.params)), sorted(set(self.params) - set(arrays))
            raise OffsiteError(f"the global adapter does not fit this emulator: unexpected {extra[:3]}, missing "
                               f"{missing[:3]}; server and client must use the same emulator package and lora settings")
        with torch.no_grad():
            for name, p in self.params.items():
                value = arrays[name]
                if tuple(value.shape) != tuple(p.shape) or not torch.isfinite(value).all():
                    raise OffsiteError(f"global tensor '{name}' has shape {tuple(value.shape)} (expected "
                                       f"{tuple(p.shape)}) or non-finite values; refused")
                p.copy_(value.to(p.device, p.dtype))

    def fit(self, arrays: dict, indices: list | None, server_round: int, partition: int, mu: float = 0.0) -> tuple:
        """One local round from the global tensors ``arrays``.

        Args:
            arrays: the global adapter ``{name: tensor}`` (names of :func:`offsite.training.loop.select`).
            indices: this client's examples (None: all of them, a real data owner's own file).
            server_round: the round (1-based); with ``partition`` it seeds the round.
            partition: the client's number.
            mu: FedProx's proximal weight (0: plain FedAvg, no penalty at all).

        Returns:
            ``(tensors, metrics)``: the trained ``{name: CPU fp32 tensor}`` and ``{"num-examples",
            "unit-weight", "train-loss", "steps"}``.
        """
        self.load(arrays)
        examples = self.examples if indices is None else [self.examples[i] for i in indices]
        if not examples:
            raise OffsiteError(f"client {partition} has no training examples")
        seed = local_seed(self.cfg.seed, server_round, partition)
        cfg = dataclasses.replace(self.cfg, seed=seed)
        steps = cfg.max_steps if cfg.max_steps is not None else math.ceil(
            cfg.epochs * len(examples) / (cfg.batch_size * cfg.grad_accum))
        run = Prepared(examples, [], steps, max(1, steps), self.run.pad)
        penalty = proximal(self.params, mu) if mu > 0 else None
        torch.manual_seed(seed)
        state = train_loop(self.emu.model, self.params, self.precision, run, cfg, self.device,
                           desc=f"client {partition}", penalty=penalty)
        losses = [entry["loss"] for entry in state.log["train"]]
        metrics = {"num-examples": len(examples), "unit-weight": 1, "steps": steps,
                   "train-loss": float(sum(losses) / len(losses)) if losses else 0.0}
        return cpu_copy(self.params), metrics


def proximal(params: dict, mu: float):
    """FedProx's term mu/2 * sum ||w - w_global||^2 over ``params``, anchored at their values now."""
    anchor = {k: p.detach().clone() for k, p in params.items()}

    def penalty():
        return 0.5 * mu * sum(((p - anchor[k]) ** 2).sum() for k, p in params.items())

    return penalty


def trainer(emulator, data, local: dict, threads: int | None = None) -> Trainer:
    """The process's :class:`Trainer` for these inputs, built on first use."""
    key = (str(emulator), str(data), repr(sorted(local.items())))
    if key not in _TRAINERS:
        _TRAINERS.clear()  # one emulator per process: a new run's inputs replace the last run's
        _TRAINERS[key] = Trainer(emulator, data, local, threads)
        _LOADS[0] += 1
    return _TRAINERS[key]


def handle_train(spec: dict | None, msg, context):
    """Flower train handler: global ArrayRecord in, trained ArrayRecord + MetricRecord out.

    ``spec`` (simulation): ``emulator``, ``data``, ``local``, ``parts`` (indices per partition),
    ``threads``; None (deployment): paths from the node config, settings from the run config.
    """
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

    emulator, data, local, parts, threads, partition = _inputs(spec, context)
    config = msg.content["config"]
    arrays = msg.content["arrays"].to_torch_state_dict()
    tensors, metrics = trainer(emulator, data, local, threads).fit(
        arrays, None if parts is None else parts[partition], int(config["server-round"]), partition,
        float(config.get("proximal-mu", 0.0)))
    metrics.update({"partition-id": partition, "emulator-loads": _LOADS[0]})
    return Message(RecordDict({"arrays": ArrayRecord(tensors), "metrics": MetricRecord(metrics)}), reply_to=msg)


def handle_query(spec: dict | None, msg, context):
    """Flower query handler: which partition this node is and which emulator it holds (checked by the server)."""
    from flwr.app import ConfigRecord, Message, RecordDict

    emulator, data, local, parts, threads, partition = _inputs(spec, context)
    held = trainer(emulator, data, local, threads)  # loads here, so a bad input fails before round 1
    size = len(held.examples) if parts is None else len(parts[partition])
    return Message(RecordDict({"config": ConfigRecord({"partition-id": partition, "examples": size,
                                                        "emulator": held.emu.artifact_id})}), reply_to=msg)


def _inputs(spec: dict | None, context) -> tuple:
    if spec is not None:
        partition = int(context.node_config["partition-id"])
        return spec["emulator"], spec["data"], spec["local"], spec["parts"], spec["threads"], partition
    node, run = context.node_config, context.run_config
    missing = [k for k in ("emulator", "data") if k not in node]
    if missing:
        raise OffsiteError(f"this SuperNode's --node-config lacks {missing}: give the emulator package folder and "
                           "the local data file, e.g. --node-config 'emulator=\"emu/\" data=\"train.jsonl\"'")
    # The run config every node and the server share: the per-round settings the server also applies.
    _, local = split_settings({k.replace("-", "_"): v for k, v in run.items() if k not in ("emulator", "out")})
    partition = int(node.get("partition-id", context.node_id % 2**31))
    return str(Path(node["emulator"])), str(Path(node["data"])), local, None, None, partition


def client_app(spec: dict | None = None):
    """A Flower ``ClientApp`` running :func:`handle_train` / :func:`handle_query` with ``spec``."""
    from flwr.clientapp import ClientApp

    flower = ClientApp()

    # The handlers stay module functions: Flower ships this app to each simulation worker by value,
    # and a module function is shipped by reference, so the process cache survives between rounds.
    @flower.train()
    def train(msg, context):
        return handle_train(spec, msg, context)

    @flower.query()
    def query(msg, context):
        return handle_query(spec, msg, context)

    return flower


def __getattr__(name):
    # `app` for Flower deployments (clientapp = "offsite.federate.client:app"), built on first access so
    # that importing this module needs no flwr.
    if name == "app":
        return client_app(None)
    raise AttributeError(name)
