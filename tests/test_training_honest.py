"""Fine-tuning is honest: whole-unit checkpoints, content-keyed resume, divergence stops the run."""

import os
import random
import re
import shutil

import pytest
import torch

import offsite.workflows.finetune as ft
import offsite.training.checkpoint as ck
import offsite.training.loop as loop
from conftest import make_model
from offsite.artifacts.tensors import load_tensors
from offsite.cli import main
from offsite.data.examples import collate
from offsite.workflows.emulate import emulate
from offsite.core.errors import OffsiteError
from offsite.workflows.finetune import finetune

# The file names are spelled out (not taken from the module) so the tests read against the format.
TRAINABLE, BEST, OPTIMIZER = "trainable.safetensors", "best.safetensors", "optimizer.safetensors"
KW = dict(block_size=16, batch_size=2, lr=3e-3, progress=False, device="cpu")


@pytest.fixture(scope="module")
def emu(tmp_path_factory, tokenizer):
    """One tiny llama emulator (1 emulator layer) shared by the module: building it is the slow part."""
    root = tmp_path_factory.mktemp("honest")
    make_model("llama", 4).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    return emulate(str(root / "model"), root / "emu", adapter_layers="1,1", emulator_layers=1)


def _crash_after(monkeypatch, n: int, snapshots=None):
    """Make the n-th checkpoint write the last thing the run does, optionally copying each one."""
    real, calls = ck.save_checkpoint, []

    def save(folder, *args):
        real(folder, *args)
        calls.append(1)
        if snapshots is not None:
            shutil.copytree(folder, snapshots / f"ckpt{len(calls)}")
        if len(calls) == n:
            raise KeyboardInterrupt  # the process dies right after this checkpoint

    monkeypatch.setattr(ft, "save_checkpoint", save)
    return real


def _tiny_checkpoint(folder, step: int, value: float):
    """A checkpoint of a single parameter without any model (for the swap mechanics)."""
    w = torch.nn.Parameter(torch.full((3,), value))
    opt = torch.optim.AdamW([w], lr=0.1)
    w.grad = torch.ones(3)
    opt.step()
    ck.save_checkpoint(folder, {"w": w}, None, opt, {"step": step, "resume_key": None})


def test_a_failed_checkpoint_write_leaves_the_previous_one_whole(tmp_path, monkeypatch):
    folder = tmp_path / "ad.ckpt"
    _tiny_checkpoint(folder, 1, 1.0)
    before = load_tensors(folder / TRAINABLE)["w"]

    def killed(*_):
        raise KeyboardInterrupt  # dies after trainable.safetensors was written, before the optimizer

    monkeypatch.setattr(ck, "optimizer_tensors", killed)
    with pytest.raises(KeyboardInterrupt):
        _tiny_checkpoint(folder, 2, 2.0)
    assert torch.equal(load_tensors(folder / TRAINABLE)["w"], before)
    assert ck.verified_state(folder)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad.ckpt"]


def test_recovery_after_a_killed_swap(tmp_path):
    folder, old = tmp_path / "ad.ckpt", tmp_path / ".ad.ckpt.old"
    _tiny_checkpoint(folder, 1, 1.0)
    os.replace(folder, old)  # killed between "rename old away" and "rename new in"
    (tmp_path / ".ad.ckpt.tmp-dead0001").mkdir()  # and a half-written temp folder
    (tmp_path / ".ad.ckpt.tmp-dead0001" / TRAINABLE).write_bytes(b"half")
    ck.recover_checkpoint(folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad.ckpt"]
    assert ck.verified_state(folder)["step"] == 1
    shutil.copytree(folder, old)  # killed after "rename new in", before "delete old"
    ck.recover_checkpoint(folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad.ckpt"]
    _tiny_checkpoint(folder, 2, 2.0)  # an ordinary swap leaves nothing else behind either
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad.ckpt"] and ck.verified_state(folder)["step"] == 2


def test_torn_or_truncated_checkpoints_are_refused(emu, tmp_path, text_file, monkeypatch):
    kw = dict(KW, max_steps=6, save_every=2, eval_every=3)
    snaps = tmp_path / "snaps"
    snaps.mkdir()
    real = _crash_after(monkeypatch, 2, snaps)
    with pytest.raises(KeyboardInterrupt):
        finetune(emu, text_file, tmp_path / "ad", **kw)
    monkeypatch.setattr(ft, "save_checkpoint", real)
    ckpt = tmp_path / "ad.ckpt"

    # A torn write: step-2 state with step-4 trainable tensors.
    shutil.rmtree(ckpt)
    shutil.copytree(snaps / "ckpt1", ckpt)
    shutil.copy(snaps / "ckpt2" / TRAINABLE, ckpt / TRAINABLE)
    with pytest.raises(OffsiteError, match=r"torn or corrupt checkpoint \(trainable.safetensors does not match.*"
                                           r"--no-resume"):
        finetune(emu, text_file, tmp_path / "ad", **kw)

    # A truncated file.
    shutil.rmtree(ckpt)
    shutil.copytree(snaps / "ckpt2", ckpt)
    data = (ckpt / OPTIMIZER).read_bytes()
    (ckpt / OPTIMIZER).write_bytes(data[:len(data) // 2])
    with pytest.raises(OffsiteError, match=r"torn or corrupt checkpoint \(optimizer.safetensors does not match"):
        finetune(emu, text_file, tmp_path / "ad", **kw)

    # A missing file.
    (ckpt / OPTIMIZER).unlink()
    with pytest.raises(OffsiteError, match=r"torn or corrupt checkpoint \(optimizer.safetensors is missing"):
        finetune(emu, text_file, tmp_path / "ad", **kw)
    assert not (tmp_path / "ad").exists()

    # The untouched checkpoint still resumes, and --no-resume starts over past a torn one.
    shutil.rmtree(ckpt)
    shutil.copytree(snaps / "ckpt2", ckpt)
    out = finetune(emu, text_file, tmp_path / "ad", **kw)
    assert '"steps": 6' in (out / "training_log.json").read_text()
    shutil.copytree(snaps / "ckpt1", ckpt)
    (ckpt / TRAINABLE).write_bytes(b"garbage")
    finetune(emu, text_file, tmp_path / "ad", overwrite=True, **dict(kw, max_steps=1, resume=False))
    assert not ckpt.exists()


def test_resume_is_keyed_on_the_data_content(emu, tmp_path, text_file, monkeypatch):
    val = tmp_path / "val.txt"
    val.write_text(text_file.read_text()[:2000])
    kw = dict(KW, max_steps=4, save_every=2, eval_every=2, val_data=str(val))
    real = _crash_after(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        finetune(emu, text_file, tmp_path / "ad", **kw)
    monkeypatch.setattr(ft, "save_checkpoint", real)

    original = text_file.read_text()
    text_file.write_text(original.replace("cat", "dog", 1))  # same path, same size class, other content
    with pytest.raises(OffsiteError, match="training data changed since.*--no-resume"):
        finetune(emu, text_file, tmp_path / "ad", **kw)
    text_file.write_text(original)
    val.write_text(val.read_text() + " more")
    with pytest.raises(OffsiteError, match="validation data changed since"):
        finetune(emu, text_file, tmp_path / "ad", **kw)
    val.write_text(original[:2000])
    with pytest.raises(OffsiteError, match=r"different settings \(seed 0 -> 1\)"):
        finetune(emu, text_file, tmp_path / "ad", **dict(kw, seed=1))

    # The same content at another path resumes: the key is the content, not the file name.
    moved = tmp_path / "moved.txt"
    shutil.move(text_file, moved)
    out = finetune(emu, moved, tmp_path / "ad", **kw)
    assert '"steps": 4' in (out / "training_log.json").read_text()


def _check_diverged(message: str, ckpt) -> tuple:
    found = re.match(r"training diverged at step (\d+): .*(nan|inf|NaN).*lower --lr", message)
    assert found, message
    step = int(found.group(1))
    if ckpt.exists():
        state = ck.verified_state(ckpt)
        assert state["step"] < step and f"(step {state['step']})" in message and str(ckpt) in message
        for name in (TRAINABLE, BEST):
            if (ckpt / name).exists():
                assert all(torch.isfinite(t).all() for t in load_tensors(ckpt / name).values())
    return step


def test_a_diverging_run_stops_and_keeps_only_finite_checkpoints(emu, tmp_path, text_file):
    kw = dict(KW, max_steps=6, save_every=1, eval_every=1, lr=1e30, warmup_steps=0, schedule="constant")
    with pytest.raises(OffsiteError) as err:
        finetune(emu, text_file, tmp_path / "ad", **kw)
    step = _check_diverged(str(err.value), tmp_path / "ad.ckpt")
    assert step <= 6 and not (tmp_path / "ad").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ad")]  # no temp or swap leftovers


def test_cli_exits_2_on_divergence(emu, tmp_path, text_file, capsys):
    args = ["finetune", "--emulator", str(emu), "--data", str(text_file), "--out", str(tmp_path / "ad"),
            "--lr", "1e30", "--max-steps", "6", "--save-every", "1", "--block-size", "16", "--batch-size", "2",
            "--schedule", "constant", "--device", "cpu", "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    _check_diverged(err.split("error: ", 1)[1], tmp_path / "ad.ckpt")
    assert not (tmp_path / "ad").exists()


def _old_batch(examples, index, size, seed, pad):
    """The batcher formula as committed before the cache (reshuffles for every micro-batch)."""
    per_epoch = max(1, len(examples) // size)
    epoch, offset = divmod(index, per_epoch)
    order = list(range(len(examples)))
    random.Random(seed * 100003 + epoch).shuffle(order)
    chosen = [examples[i] for i in order[offset * size:(offset + 1) * size]] or [examples[order[0]]]
    return collate(chosen, pad)


@pytest.mark.parametrize("n, size", [(11, 3), (2, 4), (6, 2)])
def test_cached_batcher_returns_the_old_batches(n, size, monkeypatch):
    examples = [{"input_ids": [i + 1] * (1 + i % 3), "labels": [i + 1] * (1 + i % 3)} for i in range(n)]
    batcher = loop.Batcher(examples, size, 7, 0, "cpu")
    indices = list(range(4 * batcher.per_epoch + 1)) + [0, 0, 3 * batcher.per_epoch]  # in order, then back
    expected = [_old_batch(examples, i, size, 7, 0) for i in indices]
    shuffles = []
    real = random.Random

    def counting(seed):
        shuffles.append(seed)
        return real(seed)

    monkeypatch.setattr(loop.random, "Random", counting)
    for i, want in zip(indices, expected):
        got = batcher(i)
        assert all(torch.equal(got[k], want[k]) for k in want), i
    # Sequential indices shuffle once per epoch (5 epochs), then each jump to another epoch once more.
    assert len(shuffles) == 5 + 2
