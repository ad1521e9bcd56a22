"""Data-parallel fine-tuning (offsite.training.distributed): two CPU processes over gloo, launched by
torchrun exactly as a user would, train the same adapter as one process with the same global batch;
and what a multi-process run refuses."""

import os
import subprocess
import sys

import pytest
import torch

from conftest import artifact_tensors
from offsite.cli import main
from offsite.core.device import process_device
from offsite.core.errors import OffsiteError
from offsite.workflows.finetune import finetune

TOLERANCE = 1e-5
"""Max abs difference allowed between 1 and 2 processes after 4 fp32 steps (measured: ~1e-7, the order of
the gradient sums differs); a wrong shard, a missing all-reduce or a mean of means is off by >1e-4."""
SETTINGS = {"max_steps": 4, "batch_size": 4, "block_size": 16, "lr": 3e-3, "seed": 0}

gloo = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                          reason="torch.distributed with the gloo backend is not available")


@pytest.fixture
def emu(small_emulator):
    return small_emulator


_tensors = artifact_tensors


WORKER = """
import runpy, sys
codes = []
for argv in {runs!r}:  # each run through `python -m offsite.cli` (its __main__), in one launch: imports are slow
    sys.argv = ["offsite", *argv]
    try:
        runpy.run_module("offsite.cli", run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        codes.append(exc.code or 0)
sys.exit(max(codes))
"""


def _torchrun(runs: list, folder, timeout: float = 900):
    """Run each argument list as ``python -m offsite.cli ARGS`` under ``torchrun --nproc_per_node 2`` on CPU."""
    script = folder / "worker.py"
    script.write_text(WORKER.format(runs=runs))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    try:
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:  # a hung launcher or a deadlock is a failure, never a skip
        tail = "\n".join(str(s if isinstance(s, str) else (s or b"").decode(errors="replace"))[-3000:]
                         for s in (exc.stdout, exc.stderr))
        pytest.fail(f"torchrun with 2 processes did not finish in {timeout:.0f} s; its output:\n{tail}")


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.mark.slow
@gloo
def test_two_processes_train_what_one_does(emu, tmp_path, text_file):
    runs, kinds = [], {"adapter": [], "lora": ["--lora"]}
    for kind, extra in kinds.items():
        args = ["finetune", "--emulator", str(emu), "--data", str(text_file), "--out", str(tmp_path / f"two-{kind}"),
                "--device", "cpu", "--no-progress", *extra]
        for key, value in SETTINGS.items():
            args += [f"--{key.replace('_', '-')}", str(value)]
        runs.append(args)
    done = _torchrun(runs, tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("adapter written to") == 2  # once per run: rank 0 alone reports (and writes)
    for kind in kinds:
        lora = kind == "lora"
        two = tmp_path / f"two-{kind}"
        assert not two.with_name(two.name + ".ckpt").exists()
        assert main(["verify", str(two)]) == 0  # `offsite verify`: schema, hashes, shapes, finite values
        one = finetune(emu, text_file, tmp_path / f"one-{kind}", device="cpu", progress=False, lora=lora, **SETTINGS)
        diff = _max_diff(_tensors(one), _tensors(two))
        assert diff <= TOLERANCE, f"{kind}: 1 vs 2 processes differ by {diff}"
        start = finetune(emu, text_file, tmp_path / f"start-{kind}", device="cpu", progress=False, lora=lora,
                         **{**SETTINGS, "max_steps": 0})
        # The agreement is not that of two untrained adapters.
        assert _max_diff(_tensors(one), _tensors(start)) > 100 * TOLERANCE


def test_batch_must_divide_by_the_processes(emu, tmp_path, text_file, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it; refused before any process group exists
    with pytest.raises(OffsiteError, match="global batch and must divide by the 2 processes"):
        finetune(emu, text_file, tmp_path / "ad", device="cpu", progress=False, **{**SETTINGS, "batch_size": 3})
    assert main(["finetune", "--emulator", str(emu), "--data", str(text_file), "--out", str(tmp_path / "ad"),
                 "--batch-size", "5", "--device", "cpu"]) == 2
    assert not (tmp_path / "ad").exists() and not (tmp_path / "ad.ckpt").exists()


def test_dp_sgd_is_refused_under_several_processes(emu, tmp_path, text_file, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(OffsiteError, match="DP-SGD .* not supported under 2 processes"):
        finetune(emu, text_file, tmp_path / "ad", device="cpu", progress=False, dp_noise_multiplier=1.0,
                 dp_delta=1e-5, **SETTINGS)
    assert not (tmp_path / "ad").exists()


def test_bad_world_size_and_shared_devices_are_refused(monkeypatch):
    from offsite.training.distributed import world_size

    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(OffsiteError, match="positive number of processes"):
        world_size()
    assert process_device("cpu", 1, 2) == torch.device("cpu")
    for name in ("cuda:0", "mps", "tpu"):  # one device for every process, or none here: one clear error each
        with pytest.raises(OffsiteError):
            process_device(name, 0, 2)
