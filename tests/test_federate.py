"""Federated offsite-tuning (offsite.federate): Flower's simulation from the CLI into `offsite plug`, the
aggregation and FedProx math through the same client step and Flower strategy in-process, the splits,
and every refusal."""

import json
import math
import subprocess
import sys
import time

import pytest
import torch

from conftest import artifact_tensors
from offsite.cli import main
from offsite.core.errors import OffsiteError

flwr = pytest.importorskip("flwr", reason="the fl extra (flwr) is not installed")

from offsite.federate import federate  # noqa: E402
from offsite.federate.client import Trainer, proximal  # noqa: E402
from offsite.federate.config import split_settings  # noqa: E402
from offsite.federate.partition import partition, record_labels, skew  # noqa: E402
from offsite.federate.server import Server  # noqa: E402
from offsite.federate.strategy import Federation, choose  # noqa: E402
from offsite.workflows.finetune import finetune  # noqa: E402

LOCAL = {"block_size": 16, "batch_size": 4, "lr": 3e-3, "max_steps": 3, "device": "cpu", "seed": 0}


@pytest.fixture
def emu(small_emulator):
    return small_emulator


_tensors = artifact_tensors


def _reply(tensors: dict, metrics: dict, node: int):
    """A client's reply as Flower's engine hands it to the strategy (explicit metadata: no running engine)."""
    from flwr.app import ArrayRecord, Message, Metadata, MetricRecord, RecordDict

    meta = Metadata(run_id=1, message_id=f"r{node}", src_node_id=node, dst_node_id=0, reply_to_message_id=f"i{node}",
                    group_id="", created_at=time.time(), ttl=3600.0, message_type="train")
    return Message(RecordDict({"arrays": ArrayRecord(tensors), "metrics": MetricRecord(metrics)}), metadata=meta)


def _aggregate(cfg, server, replies) -> dict:
    shapes = {k: tuple(p.shape) for k, p in server.params.items()}
    arrays, _ = Federation(cfg, shapes).aggregate_train(1, replies)
    return arrays.to_torch_state_dict()


@pytest.mark.slow
def test_cli_simulation_of_three_clients_plugs_in(emu, saved_model, tmp_path, text_file, capfd):
    """The real `offsite federate` on Flower's simulation engine (Ray): 3 clients, 2 rounds, then `offsite plug`.

    Measured 113-152 s on 2 cores shared with other jobs, of which Ray's start-up alone is 42-45 s.
    """
    base, _ = saved_model("llama", 6)
    out = tmp_path / "fed"
    args = ["federate", "--emulator", str(emu), "--data", str(text_file), "--clients", "3", "--rounds", "2",
            "--split", "dirichlet", "--dirichlet-alpha", "1.0", "--max-steps", "2", "--block-size", "16",
            "--batch-size", "4", "--lr", "3e-3", "--val-data", str(text_file), "--device", "cpu", "--out", str(out)]
    started = time.time()
    code = main(args)
    err = capfd.readouterr().err
    # Ray failing to start is a failure with its output, not a skip (federate itself retries once)
    assert code == 0, f"offsite federate exited {code}; stderr:\n{err[-4000:]}"
    seconds = time.time() - started
    settings = json.loads((out / "settings.json").read_text())
    fed = settings["federation"]
    assert (fed["clients"], fed["rounds"], fed["split"], fed["dirichlet_by"], fed["strategy"]) == \
        (3, 2, "dirichlet", "size", "fedavg")
    assert settings["command"] == "federate" and settings["max_steps"] == 2 and settings["seed"] == 0
    log = json.loads((out / "training_log.json").read_text())
    assert [r["clients"] for r in log["rounds"]] == [[0, 1, 2], [0, 1, 2]]
    assert all(sum(r["examples"]) == sum(fed["partition_sizes"]) for r in log["rounds"])
    assert log["rounds"][-1]["val_loss"] < log["initial_val_loss"]  # the global adapter learned something
    assert log["rounds"][-1]["emulator_loads"] == 1  # each client process loaded the emulator once, for all rounds
    assert main(["verify", str(out)]) == 0 and main(["inspect", str(out)]) == 0
    assert main(["plug", "--model", str(base), "--adapter", str(out), "--out", str(tmp_path / "plugged")]) == 0
    untouched = finetune(emu, text_file, tmp_path / "zero", max_steps=0, progress=False, block_size=16)
    fedt, zero = _tensors(out), _tensors(untouched)
    assert fedt.keys() == zero.keys()
    assert max((fedt[k].float() - zero[k].float()).abs().max().item() for k in fedt) > 1e-3
    print(f"federate CLI, 3 clients x 2 rounds: {seconds:.1f} s")


@pytest.mark.parametrize("lora", [False, True])
def test_one_client_one_round_is_plain_finetune(emu, tmp_path, text_file, lora):
    """FedAvg over a single client holding all the data for one round == `offsite finetune` of the same steps.

    Bitwise: same examples in file order, same seed (round 1's client 0 keeps it), same loop, one reply
    weighted n/n = 1.0 exactly, same writer.
    """
    settings = {**LOCAL, "lora": lora, "lora_r": 2, "schedule": "cosine"}
    cfg, local = split_settings({"clients": 1, "rounds": 1, **settings})
    server = Server(emu, cfg, local)
    tensors, metrics = Trainer(emu, text_file, local).fit(server.arrays(), None, 1, 0)
    server.load(_aggregate(cfg, server, [_reply(tensors, {**metrics, "partition-id": 0}, 1)]))
    fed = server.write(tmp_path / "fed", {"command": "test"})
    plain = finetune(emu, text_file, tmp_path / "plain", val_fraction=0.0, progress=False, **settings)
    a, b = _tensors(fed), _tensors(plain)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    start = finetune(emu, text_file, tmp_path / "start", progress=False, **{**settings, "max_steps": 0})
    assert any(not torch.equal(a[k], _tensors(start)[k]) for k in a)  # not the agreement of two untrained ones


def test_aggregate_is_the_example_weighted_mean(emu, text_file):
    cfg, local = split_settings({"clients": 3, "rounds": 1, **LOCAL})
    server = Server(emu, cfg, local)
    trainer = Trainer(emu, text_file, local)
    parts = partition(len(trainer.examples), 3, "dirichlet", 0.5, 0)
    sizes = [len(p) for p in parts]
    assert len(set(sizes)) == 3  # unequal weights, or a plain mean would pass too
    start = server.arrays()
    replies, returned = [], []
    for k, part in enumerate(parts):
        tensors, metrics = trainer.fit(start, part, 1, k)
        assert metrics["num-examples"] == len(part)
        returned.append(tensors)
        replies.append(_reply(tensors, {**metrics, "partition-id": k}, 10 + k))
    got = _aggregate(cfg, server, replies)
    for name in start:
        want = sum(n * t[name].double() for n, t in zip(sizes, returned)) / sum(sizes)
        assert torch.allclose(got[name].double(), want, rtol=0, atol=1e-6), name
    gap = max((sum(t[n].double() for t in returned) / 3 - got[n].double()).abs().max().item() for n in start)
    assert gap > 1e-5  # the unweighted mean is measurably different
    # The clients started from the same global adapter and drew different batches (seeded per client).
    assert not torch.equal(returned[0][name], returned[1][name])


def test_fedprox_moves_less_from_the_global_adapter(emu, text_file):
    _, local = split_settings({**LOCAL, "lr": 1e-2, "max_steps": 5})
    trainer = Trainer(emu, text_file, local)
    start = {k: p.detach().float().clone() for k, p in trainer.params.items()}

    def distance(mu):
        tensors, _ = trainer.fit(start, None, 1, 0, mu=mu)
        return sum(((tensors[k] - start[k]) ** 2).sum() for k in start).sqrt().item()

    free, held = distance(0.0), distance(50.0)
    assert held < 0.8 * free
    assert distance(0.0) == free  # seeded: the same round gives the same update
    # The term itself: mu/2 ||w - w_global||^2, zero at the anchor.
    penalty = proximal(trainer.params, 2.0)
    assert penalty().item() == 0.0
    with torch.no_grad():
        first = next(iter(trainer.params.values()))
        first.add_(0.5)
    assert penalty().item() == pytest.approx(0.5 * 2.0 * 0.25 * first.numel(), rel=1e-5)


def test_fedprox_strategy_at_mu_zero_aggregates_like_fedavg(emu, text_file):
    cfg_avg, local = split_settings({"clients": 2, **LOCAL})
    cfg_prox, _ = split_settings({"clients": 2, "strategy": "fedprox", "mu": 0.0, **LOCAL})
    server = Server(emu, cfg_avg, local)
    trainer = Trainer(emu, text_file, local)
    parts = partition(len(trainer.examples), 2, "iid", 1.0, 0)
    outs = [trainer.fit(server.arrays(), p, 1, k) for k, p in enumerate(parts)]
    replies = lambda: [_reply(t, {**m, "partition-id": k}, k + 1) for k, (t, m) in enumerate(outs)]  # noqa: E731
    a, b = _aggregate(cfg_avg, server, replies()), _aggregate(cfg_prox, server, replies())
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_client_level_dp_clips_each_update_and_adds_the_noise(emu, text_file):
    """Flower's server-side fixed clipping: global + unweighted mean of updates clipped to C + N(0, (sigma C/m)^2)."""
    from flwr.app import ArrayRecord

    from offsite.federate.server import client_dp_record

    clip = 0.05
    _, local = split_settings(LOCAL)
    trainer = Trainer(emu, text_file, local)
    parts = partition(len(trainer.examples), 2, "dirichlet", 0.5, 1)
    start = {k: p.detach().float().clone() for k, p in trainer.params.items()}
    outs = [trainer.fit(start, p, 1, k) for k, p in enumerate(parts)]
    clipped = []
    for tensors, _ in outs:
        norm = sum(((tensors[k] - start[k]).double() ** 2).sum() for k in start).sqrt().item()
        assert norm > 10 * clip  # every update is clipped: the bound is what is tested
        clipped.append({k: start[k].double() + (tensors[k] - start[k]).double() * clip / norm for k in start})
    want = {k: (clipped[0][k] + clipped[1][k]) / 2 for k in start}  # unweighted, though the sizes differ
    shapes = {k: tuple(v.shape) for k, v in start.items()}
    for sigma in (1e-9, 1.0):
        cfg, _ = split_settings({"clients": 2, "client_dp_noise_multiplier": sigma, "client_dp_clipping_norm": clip,
                                 "client_dp_delta": 1e-5, **LOCAL})
        strategy = Federation(cfg, shapes)
        strategy.inner.current_arrays = ArrayRecord(start)  # what its configure_train records in a running round
        replies = [_reply(t, {**m, "partition-id": k}, k + 1) for k, (t, m) in enumerate(outs)]
        got = strategy.aggregate_train(1, replies)[0].to_torch_state_dict()
        noise = torch.cat([(got[k].double() - want[k]).flatten() for k in start])
        if sigma < 1:
            assert noise.abs().max().item() < 1e-6
        else:
            assert noise.std().item() == pytest.approx(sigma * clip / 2, rel=0.1)
    record = client_dp_record(cfg)
    assert (record["noise_multiplier"], record["clipping_norm"], record["noise_std"]) == (1.0, clip, clip / 2)
    assert 0 < record["epsilon"] < math.inf


def test_bad_replies_stop_the_round(emu):
    cfg, local = split_settings({"clients": 1, **LOCAL})
    server = Server(emu, cfg, local)
    good = server.arrays()
    name = next(iter(good))
    metrics = {"num-examples": 3, "unit-weight": 1, "train-loss": 1.0, "steps": 1, "partition-id": 0}
    for bad, message in [({**good, name: torch.zeros(3)}, "has shape"), ({k: good[k] for k in list(good)[1:]}, "not"),
                         ({**good, name: good[name] * float("nan")}, "non-finite")]:
        with pytest.raises(OffsiteError, match=message):
            _aggregate(cfg, server, [_reply(bad, metrics, 1)])


def test_splits_are_deterministic_disjoint_and_complete(mc_file):
    labels = record_labels(mc_file, "label") * 5  # 200 examples, 3 classes
    n = len(labels)
    for split, lab in (("iid", None), ("dirichlet", None), ("dirichlet", labels)):
        for clients in (1, 3, 7):
            parts = partition(n, clients, split, 0.3, 5, lab)
            assert parts == partition(n, clients, split, 0.3, 5, lab)  # same seed, same split
            flat = [i for p in parts for i in p]
            assert sorted(flat) == list(range(n)) and all(p and p == sorted(p) for p in parts)
        if split == "iid":
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
        assert partition(n, 7, split, 0.3, 6, lab) != parts  # another seed, another split
    # Contiguous runs for the size split (text: neighbouring blocks, hence documents, stay together).
    assert all(p == list(range(p[0], p[-1] + 1)) for p in partition(n, 5, "dirichlet", 0.3, 0))
    # Smaller alpha, more skew (averaged over seeds: one draw can be unlucky).
    for lab in (None, labels):
        low = sum(skew(partition(n, 5, "dirichlet", 0.05, s, lab), lab) for s in range(10))
        high = sum(skew(partition(n, 5, "dirichlet", 100.0, s, lab), lab) for s in range(10))
        assert low > 3 * high
    assert skew(partition(n, 5, "iid", 1.0, 0), None) < 0.05
    # Every client non-empty even when a tiny alpha gives some nothing, and no more clients than examples.
    assert all(partition(12, 12, "dirichlet", 0.01, 0, labels[:12]))
    with pytest.raises(OffsiteError, match="cannot be split over 13 clients"):
        partition(12, 13, "iid", 1.0, 0)


def test_client_choice_is_seeded_per_round():
    assert choose(1, 5, 5, 0) == [0, 1, 2, 3, 4]
    picks = [choose(r, 10, 3, 7) for r in range(1, 6)]
    assert picks == [choose(r, 10, 3, 7) for r in range(1, 6)] and all(len(set(p)) == 3 for p in picks)
    assert len({tuple(p) for p in picks}) > 1 and picks != [choose(r, 10, 3, 8) for r in range(1, 6)]


def test_refusals_write_nothing(emu, tmp_path, text_file, monkeypatch):
    out = tmp_path / "fed"
    cases = [
        (dict(clients=0), "clients must be >= 1"),
        (dict(rounds=0), "rounds must be >= 1"),
        (dict(clients=500), "cannot be split over 500 clients"),
        (dict(fraction=0.0), r"fraction must be in \(0, 1\]"),
        (dict(fraction=1.5), r"fraction must be in \(0, 1\]"),
        (dict(strategy="fedprox", mu=-1.0), "mu must be >= 0"),
        (dict(mu=0.1), "pass --strategy fedprox"),
        (dict(split="dirichlet", dirichlet_alpha=0.0), "dirichlet_alpha must be > 0"),
        (dict(split="shards"), "split 'shards' unknown; allowed: iid, dirichlet"),
        (dict(split="dirichlet", dirichlet_by="label"), "needs multiple-choice data"),
        (dict(strategy="fedsgd"), "strategy 'fedsgd' unknown"),
        (dict(client_dp_noise_multiplier=1.0), "needs client_dp_clipping_norm > 0"),
        (dict(client_dp_clipping_norm=1.0), "without client_dp_noise_multiplier"),
        (dict(dp_epsilon=8.0), "unknown federation setting"),
        (dict(keep="best"), "give val_data"),
        (dict(keep="first"), "keep 'first' unknown; allowed: last, best"),
        (dict(lr=-1.0), "lr must be > 0"),
    ]
    for settings, message in cases:
        with pytest.raises(OffsiteError, match=message):
            federate(emu, text_file, out, **{**LOCAL, "clients": 2, **settings})
        assert not out.exists(), settings
    assert main(["federate", "--emulator", str(emu), "--data", str(text_file), "--out", str(out), "--clients",
                 "0"]) == 2 and not out.exists()
    monkeypatch.setitem(sys.modules, "flwr", None)  # as if the extra were not installed
    with pytest.raises(OffsiteError, match=r"install the fl extra: pip install 'offsite\[fl\]'"):
        federate(emu, text_file, out, **LOCAL)
    assert not out.exists()


def test_keep_best_writes_the_round_with_the_lowest_validation_loss(emu, text_file):
    """Round 0 (the untouched adapter) is never the best; of the trained rounds, the lowest loss wins."""
    from flwr.app import ArrayRecord

    cfg, local = split_settings({"clients": 1, "rounds": 3, "val_data": str(text_file), "keep": "best", **LOCAL})
    server = Server(emu, cfg, local)
    start = server.arrays()
    server.evaluate(0, ArrayRecord(start))
    assert server.best is None
    rounds = [{k: v + scale * torch.randn(v.shape, generator=torch.Generator().manual_seed(r))
               for k, v in start.items()} for r, scale in enumerate((0.3, 0.05, 0.3), start=1)]
    losses = [server.evaluate(r, ArrayRecord(a))["val-loss"] for r, a in enumerate(rounds, start=1)]
    assert len(set(losses)) == 3
    loss, best_round, arrays = server.best
    assert best_round == 1 + losses.index(min(losses)) and loss == min(losses)
    assert all(torch.equal(arrays[k], rounds[best_round - 1][k]) for k in start)


def test_a_failed_engine_start_is_retried_once_from_the_initial_adapter(emu, tmp_path, text_file, monkeypatch,
                                                                         capsys):
    import offsite.federate as fed

    calls = []

    def flaky(server_app, client_app, cfg):
        calls.append(1)
        if len(calls) == 1:
            raise OffsiteError("Flower's simulation engine failed: Exception: The current node timed out")

    monkeypatch.setattr(fed, "simulate", flaky)
    out = federate(emu, text_file, tmp_path / "fed", **{**LOCAL, "clients": 2})
    assert len(calls) == 2 and "starting the simulation once more" in capsys.readouterr().err
    untouched = finetune(emu, text_file, tmp_path / "zero", max_steps=0, progress=False, block_size=16)
    assert _tensors(out).keys() == _tensors(untouched).keys()

    def broken(server_app, client_app, cfg):
        calls.append(1)
        raise OffsiteError("a client failed before round 1: boom")

    monkeypatch.setattr(fed, "simulate", broken)
    with pytest.raises(OffsiteError, match="boom"):
        federate(emu, text_file, tmp_path / "fed2", **{**LOCAL, "clients": 2})
    assert len(calls) == 3 and not (tmp_path / "fed2").exists()  # not retried


def test_everything_else_works_without_flower():
    code = ("import sys; sys.modules['flwr'] = sys.modules['ray'] = None\n"
            "import offsite, offsite.federate, offsite.federate.client, offsite.federate.server\n"
            "from offsite.cli import build_parser, main\n"
            "assert 'federate' in build_parser()._subparsers._group_actions[0].choices\n"
            "assert main(['families']) == 0\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
