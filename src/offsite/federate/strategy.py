"""Flower's strategies around the adapter: FedAvg / FedProx, optionally client-level DP, in a seeded wrapper.

Method. Aggregation is Flower's own: FedAvg (``flwr.serverapp.strategy.FedAvg``, McMahan et al.
2017), w_{t+1} = sum_k n_k w_t^k / sum_k n_k over the round's clients, or FedProx (``FedProx``, Li
et al. 2020), the same mean with ``proximal-mu`` sent to the clients, which add mu/2 ||w - w_t||^2
to their loss. Client-level DP wraps either in ``DifferentialPrivacyServerSideFixedClipping``
(Geyer et al. 2017, McMahan et al. 2018): each client's update w_t^k - w_t is clipped to L2 norm C,
the *unweighted* mean is taken and Gaussian noise of std sigma * C / m added (m clients per round).

:class:`Federation` wraps the Flower strategy and departs from it in three places:

* client choice is seeded: round t trains m of the N partitions drawn by ``Random((seed, t))``
  (Flower samples node ids, which change every run); the partition -> node map comes from a query
  before round 1 (:func:`offsite.federate.server.discover`);
* a failed client, or a reply whose tensors differ from the global adapter's in names, shapes or
  finiteness, stops the run with one error (Flower would average the others and go on);
* under client DP the mean is unweighted (each client reports ``unit-weight`` 1): sigma * C / m
  calibrates the noise to a mean of m updates, and weighting by examples would let one client move
  it by more than C / m.

The DP noise is drawn by Flower from NumPy's global generator, never from ``--seed`` (a known seed
would let anyone subtract it); everything else of a run is reproducible from the seed.
"""

from __future__ import annotations

import random

import numpy as np
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg, FedProx, Strategy

from ..core.errors import OffsiteError

WEIGHTS = {"examples": "num-examples", "uniform": "unit-weight"}
"""The metric each reply is weighted by: its examples (FedAvg, FedProx) or 1 each (client-level DP)."""


def base_strategy(cfg):
    """Flower's strategy for ``cfg`` (a :class:`offsite.federate.config.FederateConfig`), DP-wrapped if asked."""
    # Sampling is Federation's (fraction_train 1 of the nodes it hands over); evaluation is the server's own.
    common = dict(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=1, min_evaluate_nodes=0,
                  min_available_nodes=1, weighted_by_key=WEIGHTS["uniform" if cfg.client_dp else "examples"])
    inner = FedProx(**common, proximal_mu=cfg.mu) if cfg.strategy == "fedprox" else FedAvg(**common)
    if not cfg.client_dp:
        return inner
    return DifferentialPrivacyServerSideFixedClipping(inner, cfg.client_dp_noise_multiplier,
                                                      cfg.client_dp_clipping_norm, cfg.per_round)


class _Nodes:
    """The chosen nodes as the grid Flower's sampling sees (it only asks for node ids)."""

    def __init__(self, grid, nodes: list):
        self.grid, self.nodes = grid, nodes

    def get_node_ids(self):
        return list(self.nodes)

    def __getattr__(self, name):
        return getattr(self.grid, name)


def choose(server_round: int, clients: int, per_round: int, seed: int) -> list:
    """The partitions trained in ``server_round``: all of them, or ``per_round`` seeded by (seed, round)."""
    if per_round >= clients:
        return list(range(clients))
    return sorted(random.Random(f"{seed}:{server_round}").sample(range(clients), per_round))


class Federation(Strategy):
    """A Flower ``Strategy`` delegating to :func:`base_strategy` (see the module docstring).

    Args:
        cfg: the run's :class:`offsite.federate.config.FederateConfig`.
        shapes: ``{name: shape}`` of the global adapter (every reply must match it).
        nodes: partition -> node id (:func:`offsite.federate.server.discover`); tests that call
            :meth:`aggregate_train` directly leave it out.
        report: called with each round's history entry (the progress line).

    Attributes:
        history: one entry per round: clients, their examples and losses, the weighted train loss.
    """

    def __init__(self, cfg, shapes: dict, nodes: dict | None = None, report=None):
        super().__init__()
        self.cfg, self.inner, self.shapes, self.nodes = cfg, base_strategy(cfg), shapes, nodes or {}
        self.report, self.history = report, []

    def configure_train(self, server_round, arrays, config, grid):
        chosen = [self.nodes[p] for p in choose(server_round, self.cfg.clients, self.cfg.per_round, self.cfg.seed)]
        return self.inner.configure_train(server_round, arrays, config, _Nodes(grid, chosen))

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        for msg in replies:
            if msg.has_error():
                raise OffsiteError(f"round {server_round}: a client failed: {msg.error.reason}")
            check_reply(msg.content, self.shapes, server_round)
        if len(replies) != self.cfg.per_round:
            raise OffsiteError(f"round {server_round}: {len(replies)} of {self.cfg.per_round} clients replied")
        metrics = [msg.content["metrics"] for msg in replies]
        arrays, _ = self.inner.aggregate_train(server_round, replies)
        total = sum(m["num-examples"] for m in metrics)
        order = sorted(range(len(metrics)), key=lambda i: metrics[i]["partition-id"])
        self.history.append({
            "round": server_round, "clients": [int(metrics[i]["partition-id"]) for i in order],
            "examples": [int(metrics[i]["num-examples"]) for i in order],
            "client_losses": [round(float(metrics[i]["train-loss"]), 5) for i in order],
            "train_loss": round(sum(m["train-loss"] * m["num-examples"] for m in metrics) / total, 5),
            "emulator_loads": max(int(m.get("emulator-loads", 0)) for m in metrics)})  # per client process
        if self.report is not None:
            self.report(self.history[-1])
        return arrays, None

    def configure_evaluate(self, server_round, arrays, config, grid):
        return []

    def aggregate_evaluate(self, server_round, replies):
        return None

    def summary(self):
        self.inner.summary()


def check_reply(content, shapes: dict, server_round: int) -> None:
    """Refuse a client's reply whose tensors are not the global adapter's names and shapes, or not finite."""
    records = list(content.array_records.values())
    if len(records) != 1 or "metrics" not in content:
        raise OffsiteError(f"round {server_round}: a client replied without exactly one ArrayRecord and its metrics")
    arrays = records[0]
    if set(arrays) != set(shapes):
        raise OffsiteError(f"round {server_round}: a client returned tensors {sorted(set(arrays) ^ set(shapes))[:3]} "
                           "that are not (all) the adapter's; refused")
    for name in arrays:
        value = arrays[name].numpy()
        if tuple(value.shape) != tuple(shapes[name]) or not np.isfinite(value).all():
            raise OffsiteError(f"round {server_round}: a client's tensor '{name}' has shape {tuple(value.shape)} "
                               f"(expected {tuple(shapes[name])}) or non-finite values; refused")
    metrics = content["metrics"]
    if not (isinstance(metrics.get("num-examples"), int) and metrics["num-examples"] > 0):
        raise OffsiteError(f"round {server_round}: a client reported {metrics.get('num-examples')!r} examples")
