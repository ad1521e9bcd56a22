"""Workflow: federated offsite-tuning on Flower — one emulator package, N data owners, one adapter artifact.

Method. Offsite-tuning (OT) across many data owners, as FedBiOT (Wu et al., KDD 2024) frames it:
the model owner sends its emulator package once; then for R rounds the server broadcasts the
global adapter w_t, each selected client fine-tunes it against the frozen emulator on its own data
(the loop of ``offsite finetune``) and returns only the adapter tensors w_t^k (a Flower
``ArrayRecord``: the adapter layers, or LoRA's A/B), and the server aggregates them with FedAvg
(McMahan et al. 2017, weighted by examples) or FedProx (Li et al. 2020, the clients add
mu/2 ||w - w_t||^2), optionally with client-level DP (Flower's server-side fixed clipping). w_R is
written by ``offsite finetune``'s writers: an adapter artifact bound to the emulator, ready for
``offsite plug``; its ``settings.json`` records the federation (clients, rounds, split, strategy,
mu, fraction, seed, DP). Pieces: :mod:`.partition` (the split), :mod:`.client` (one local round),
:mod:`.strategy` (Flower's aggregation, seeded), :mod:`.server` (the rounds and the artifact).

Where it departs from FedBiOT: the emulator is the package as built by ``offsite emulate``; it is
not distilled further during the rounds, and the adapter is the OT adapter (or LoRA on it).

Simulation on one machine (what :func:`federate` and ``offsite federate`` run): the data file is
split N ways (:mod:`.partition`, IID or Dirichlet) and Flower's simulation engine
(``flwr.simulation.run_simulation``, Ray) runs N virtual SuperNodes, ``client_cpus`` cores each;
every worker process loads the emulator once and serves its clients every round.

A real deployment uses the same ServerApp/ClientApp (``offsite.federate.server:app``,
``offsite.federate.client:app``) through Flower's deployment engine. A Flower app folder holds a
``pyproject.toml`` naming them::

    [tool.flwr.app.components]
    serverapp = "offsite.federate.server:app"
    clientapp = "offsite.federate.client:app"

    [tool.flwr.app.config]
    emulator = "emu/"          # the model owner's copy of the package it shipped
    out = "fed-adapter/"
    clients = 3
    rounds = 5
    max-steps = 50             # local steps per round; any setting of offsite federate, dashes allowed
    lr = 1e-4

The model owner starts ``flower-superlink``; each data owner runs its own SuperNode with its
copy of the emulator package and its own local data file (which never leaves it)::

    flower-supernode --superlink HOST:9092 --node-config 'emulator="emu/" data="my-train.jsonl" partition-id=0'

(``partition-id``: a distinct number 0..N-1 per data owner, which seeds its rounds and the client
choice); then ``flwr run . <federation>`` starts the rounds, and the server writes ``out``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from pathlib import Path

from ..artifacts import guard_output
from ..core.errors import OffsiteError
from ..training.config import recorded
from ..training.dp import require_opacus
from ..training.loop import prepare
from .client import client_app
from .config import FederateConfig, local_config, split_settings
from .partition import partition, record_labels
from .server import Server, federation_record, server_app

__all__ = ["federate", "FederateConfig"]


def federate(emulator, data, out, overwrite: bool = False, sign_key=None, trusted_keys=None, **settings) -> Path:
    """Simulate ``clients`` data owners on one machine and write the federated adapter artifact.

    Args:
        emulator: emulator package folder.
        data: the training file, split over the simulated clients.
        out: adapter artifact folder to write.
        overwrite: replace ``out`` if it is an adapter artifact already.
        sign_key: Ed25519 private key file to sign the adapter with.
        trusted_keys: public key files; when given, the emulator package must be signed by one.
        **settings: fields of :class:`FederateConfig` and the per-round fine-tuning settings
            (:data:`offsite.federate.config.LOCAL_SETTINGS`; ``max_steps``/``epochs`` per round).

    Returns:
        The artifact folder (kind ``adapter``, or ``lora`` with ``lora=True``).
    """
    cfg, local = split_settings(settings)
    lcfg = local_config(local)  # every fine-tuning refusal, before any work
    by = _split_by(cfg, lcfg.format)
    require_flwr()
    if cfg.client_dp_delta is not None:
        require_opacus()  # the accountant of the epsilon
    inputs = [emulator, data, cfg.val_data]
    guard_output(Path(out), "lora" if lcfg.lora else "adapter", overwrite, inputs)

    server = Server(emulator, cfg, local, trusted_keys=trusted_keys)
    count = len(prepare(server.emu, data, server.lcfg).train)  # the clients tokenise the file the same way
    labels = record_labels(data, by) if cfg.split == "dirichlet" and by != "size" else None
    if labels is not None and len(labels) != count:
        raise OffsiteError(f"{data}: {len(labels)} records gave {count} examples; a split by {by} needs one example "
                           "per record; use --dirichlet-by size")
    parts = partition(count, cfg.clients, cfg.split, cfg.dirichlet_alpha, cfg.seed, labels)
    spec = {"emulator": str(Path(emulator).resolve()), "data": str(Path(data).resolve()), "local": local,
            "parts": parts, "threads": max(1, int(cfg.client_cpus))}
    initial = server.arrays()
    for attempt in (1, 2):
        try:
            simulate(server_app(server), client_app(spec), cfg)
            break
        except OffsiteError as exc:
            # Ray's start-up has a hard-coded 30 s wait that a busy machine overruns (seen 1 in 5 runs on
            # 2 loaded cores): one clean restart, from the initial adapter; any other error stands.
            if attempt == 2 or "simulation engine failed" not in str(exc):
                raise
            print(f"warning: {exc}; starting the simulation once more", file=sys.stderr)
        finally:
            server.stop.set()  # a ServerApp thread still waiting on a dead engine ends now
        server.stop.clear()
        server.load(initial)
        server.reset()
    resolved = {"command": "federate", "emulator": str(emulator), "data": str(data), **recorded(server.lcfg),
                "device": str(server.device), "federation": federation_record(cfg, parts)}
    return server.write(out, resolved, overwrite=overwrite, inputs=inputs, sign_key=sign_key)


def _split_by(cfg: FederateConfig, fmt: str) -> str:
    """What a Dirichlet split is over (recorded back into ``cfg``): answer for mc data, size otherwise.

    Not mc's ``label``: the gold choice's position is arbitrary when choices are shuffled, so a skew
    in it is no skew in what clients know (measured on the demo world: bench/federated_demo.py).
    """
    by = cfg.dirichlet_by or ("answer" if fmt == "mc" else "size")
    if by != "size" and fmt != "mc":
        raise OffsiteError(f"--dirichlet-by {by} needs multiple-choice data (--format mc), whose records carry "
                           f"answers; {fmt} data has none: use --dirichlet-by size")
    if cfg.split == "dirichlet":
        cfg.dirichlet_by = by
    return by


def require_flwr():
    """Import Flower with its simulation engine, or one error saying how to install it."""
    try:
        import flwr

        if importlib.util.find_spec("ray") is None:  # Flower's simulation engine; Flower would exit the process
            raise ImportError("ray")
    except ImportError:
        raise OffsiteError("offsite federate needs Flower with its simulation engine; install the fl extra: "
                           "pip install 'offsite[fl]'") from None
    return flwr


def simulate(server, client, cfg: FederateConfig) -> None:
    """Run ``server`` and ``client`` (Flower apps) on Flower's simulation engine, ``cfg.clients`` SuperNodes."""
    from flwr.simulation import run_simulation

    # Ray's raylet waits 30 s for its helper processes and then aborts; on a busy machine they start
    # slower than that (measured: 15-35 s on 2 loaded cores), so give them longer.
    os.environ.setdefault("RAY_agent_register_timeout_ms", "300000")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # silences a FutureWarning per worker
    cores = float(max(cfg.client_cpus, min(os.cpu_count() or 1, cfg.clients * cfg.client_cpus)))
    backend = {"client_resources": {"num_cpus": cfg.client_cpus, "num_gpus": cfg.client_gpus},
               "init_args": {"num_cpus": cores, "include_dashboard": False, "logging_level": "ERROR"}}
    flwr_log = logging.getLogger("flwr")
    level = flwr_log.level
    # Flower logs every message and warns about what offsite does on purpose (no federated evaluation);
    # offsite prints one line per round, and failures reach the caller as errors.
    flwr_log.setLevel(logging.ERROR)
    try:
        run_simulation(server, client, num_supernodes=cfg.clients, backend_config=backend)
    except RuntimeError as exc:  # Flower's wrapper of an engine failure (Ray did not start, a worker died)
        cause = exc
        while cause.__cause__ is not None:  # Flower wraps twice; the innermost error says what happened
            cause = cause.__cause__
        raise OffsiteError(f"Flower's simulation engine failed: {type(cause).__name__}: {cause}") from exc
    finally:
        flwr_log.setLevel(level)
