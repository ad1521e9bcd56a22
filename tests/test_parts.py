"""A micro-batch in parts of similar length: the same loss and gradients as the padded whole."""

import json

import pytest
import torch

from conftest import make_model
from offsite.data.records import IGNORE
from offsite.data.examples import collate
from offsite.workflows.emulate import emulate
from offsite.core.errors import OffsiteError
from offsite.workflows.finetune import finetune, make_config
from offsite.training.parts import CPU_PASS_TOKENS, resolve_pass_tokens, split
from offsite.data.token_loss import mean_loss

EPS = torch.finfo(torch.float32).eps


def close(got, want, k: float, what: str = ""):
    """``max |got - want| <= k * eps32 * max |want|``: a few roundings of the largest magnitude."""
    got, want = torch.as_tensor(got).double(), torch.as_tensor(want).double()
    err, scale = float((got - want).abs().max()), float(want.abs().max())
    assert err <= k * EPS * scale, f"{what}: max |diff| {err:.3g} > {k} eps * {scale:.3g}"


def _batch(lengths, scored=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    examples = []
    for n in lengths:
        ids = torch.randint(3, 120, (n,), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": [IGNORE] * (n - scored) + ids[n - scored:]})
    return collate(examples, 0)


def test_parts_cover_every_scored_row_once_within_the_budget():
    batch = _batch([30, 5, 12, 29, 6, 7, 31, 8])
    parts = split(batch, 64)
    assert sum(share for _, share in parts) == pytest.approx(1.0)
    seen = []
    for part, share in parts:
        width = part["input_ids"].shape[1]
        assert width == int(part["attention_mask"].sum(1).max())  # trimmed to its own longest row
        assert part["input_ids"].shape[0] * width <= 64 or part["input_ids"].shape[0] == 1
        assert share == pytest.approx(int((part["labels"][:, 1:] != IGNORE).sum()) / 24)
        seen += [tuple(r[m.bool()].tolist()) for r, m in zip(part["input_ids"], part["attention_mask"])]
    assert sorted(seen) == sorted(tuple(r[m.bool()].tolist()) for r, m in zip(batch["input_ids"],
                                                                               batch["attention_mask"]))
    assert split(batch, 0) == [(batch, 1.0)]


def test_a_part_with_nothing_to_score_is_left_out_and_an_empty_batch_stays_whole():
    batch = _batch([20, 4, 4])
    batch["labels"][1:] = IGNORE
    assert [p["input_ids"].shape[0] for p, _ in split(batch, 8)] == [1]
    batch["labels"][:] = IGNORE
    assert split(batch, 8) == [(batch, 1.0)]  # HF's NaN then stops the run, as it always did


def test_the_budget_setting():
    assert resolve_pass_tokens(None, "cpu") == CPU_PASS_TOKENS and resolve_pass_tokens(None, "cuda") == 0
    assert resolve_pass_tokens(0, "cpu") == 0 and resolve_pass_tokens(100, "cuda") == 100
    with pytest.raises(OffsiteError, match="pass_tokens"):
        make_config({"pass_tokens": -1})


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
@pytest.mark.parametrize("logits", ["scored", "full"])
def test_gradients_of_the_parts_add_up_to_the_whole_batch(model_type, logits):
    model = make_model(model_type, 3)  # eval mode: no dropout, so both runs see the same network
    batch = _batch([30, 5, 12, 29, 6, 7, 31, 8], scored=4)
    grads = {}
    for budget in (0, 40):
        model.zero_grad(set_to_none=True)
        total = 0.0
        for part, share in split(batch, budget):
            loss, _ = mean_loss(model, part, logits)
            (loss * share).backward()
            total += float(loss.detach() * share)
        grads[budget] = total, torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    assert len(split(batch, 40)) >= 3
    close(grads[40][0], grads[0][0], 16, "loss")
    close(grads[40][1], grads[0][1], 64, "gradient")


def test_finetune_in_parts_equals_whole_micro_batches(saved_model, tmp_path, mc_file):
    path, _ = saved_model("llama", 6)  # no dropout in the tiny Llama: the same network either way
    emu = emulate(str(path), tmp_path / "emu", emulator_layers=1)
    logs = {}
    for budget in (0, 24):
        out = finetune(emu, mc_file, tmp_path / f"a{budget}", format="mc", max_steps=3, batch_size=8, lr=1e-3,
                       eval_every=3, pass_tokens=budget, progress=False)
        logs[budget] = json.loads((out / "training_log.json").read_text())
    for a, b in zip(logs[0]["train"], logs[24]["train"]):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-4)
    assert logs[24]["val"][-1]["loss"] == pytest.approx(logs[0]["val"][-1]["loss"], rel=1e-5)
