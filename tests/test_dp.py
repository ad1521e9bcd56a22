"""DP-SGD fine-tuning (offsite.training.dp): the accountant's epsilon, exact per-example clipping, what
changes, every refusal, resumption and the CLI."""

import contextlib
import json
import math
import sys
import warnings

import pytest
import torch

import offsite.workflows.finetune as ft
from offsite.adapters.artifact import load_adapter
from offsite.cli import main
from offsite.workflows.emulate import emulate
from offsite.core.errors import OffsiteError
from offsite.training import dp
from offsite.workflows.finetune import finetune, make_config
from offsite.training.loop import prepare, select
from offsite.emulator.package import load_emulator
from offsite.core.precision import base_dtype, policy
from fixtures.tolerance import assert_close_to_scale

DP = dict(dp_delta=1e-5, block_size=16, batch_size=4, lr=1e-3, progress=False)


@pytest.fixture
def emu(small_emulator):
    return small_emulator


def _nothing_written(out) -> bool:
    return not out.exists() and not out.with_name(out.name + ".ckpt").exists()


def test_target_epsilon_is_reached_and_reported(emu, tmp_path, text_file):
    out = finetune(emu, text_file, tmp_path / "ad", max_steps=5, dp_epsilon=3.0, **DP)
    manifest, _ = load_adapter(out)
    record = manifest["dp"]
    log = json.loads((out / "training_log.json").read_text())
    assert 0.9 * 3.0 <= record["epsilon"] <= 3.0  # within the search tolerance below the target, never above
    assert record["steps"] == log["steps"] == 5 and record["delta"] == 1e-5 and record["noise_multiplier"] > 0
    assert record["sample_rate"] == pytest.approx(4 / log["train_examples"])
    assert (record["accountant"], record["sampling"], record["max_grad_norm"]) == ("rdp", "poisson", 1.0)
    assert record["unit"] == "one block of 16 tokens"
    # Losses of private data never reach the shipped log; the settings record DP-SGD.
    assert all(set(entry) == {"step", "lr"} for entry in log["train"]) and log["val"] == []
    assert json.loads((out / "settings.json").read_text())["dp_epsilon"] == 3.0


def test_noise_multiplier_run_reports_the_epsilon_it_gives(emu, tmp_path, text_file):
    out = finetune(emu, text_file, tmp_path / "ad", max_steps=3, dp_noise_multiplier=1.0, dp_accountant="prv", **DP)
    record = load_adapter(out)[0]["dp"]
    # The accountant's own value for this history: the record is Opacus' bound, not a number of ours.
    from opacus.accountants import PRVAccountant

    accountant = PRVAccountant()
    accountant.history = [(1.0, record["sample_rate"], 3)]
    assert record["epsilon"] == pytest.approx(accountant.get_epsilon(delta=1e-5))
    assert record["target_epsilon"] is None and record["accountant"] == "prv"


def _reference_update(model, params: dict, examples: list, chosen: list, clip: float, expected: int) -> dict:
    """DP-SGD's gradient without noise, from per-example gradients computed here with torch.func."""
    from torch.func import functional_call, grad, vmap

    def loss(trainable, ids):  # one example's mean next-token loss (text blocks: every token is a label)
        logits = functional_call(model, trainable, args=(), kwargs={"input_ids": ids.unsqueeze(0)}).logits[0]
        return torch.nn.functional.cross_entropy(logits[:-1].float(), ids[1:])

    ids = torch.tensor([examples[i]["input_ids"] for i in chosen])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.func's slow-fallback notices
        per_example = vmap(grad(loss), in_dims=(None, 0))({n: p.detach() for n, p in params.items()}, ids)
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in per_example.values()], dim=1).norm(dim=1)
    factor = (clip / (norms + 1e-6)).clamp(max=1.0)  # Opacus' clipping rule
    return {n: torch.einsum("i,i...->...", factor, g) / expected for n, g in per_example.items()}, norms


def _private(emu, text_file, cfg, noise: float) -> tuple:
    """The emulator, its trained tensors and a DP-SGD step machinery at ``noise`` on CPU, seeded (secret 7)."""
    loaded = load_emulator(emu)
    precision = policy(cfg.precision, base_dtype(loaded.model), "cpu")
    params, peft_model, _ = select(loaded, cfg, precision)
    run = prepare(loaded, text_file, cfg)
    rate, expected = dp.check_run(cfg, len(run.train), precision)
    private = dp.DPSGD(loaded.model, params, run.train, cfg, run.pad, "cpu", noise, rate, expected, secret=7)
    private.attach(torch.optim.AdamW(params.values(), lr=cfg.lr))
    return loaded, params, peft_model, run, private, expected


@pytest.mark.parametrize("lora", [False, True])
def test_each_example_is_clipped_exactly(emu, text_file, lora):
    """Noise 0, a tiny C: the gradient Opacus hands AdamW is the mean of our own clipped per-example grads."""
    clip = 1e-3
    # grad_accum 2: the Poisson batch is processed in chunks of batch_size 2, accumulated by Opacus.
    cfg = make_config(dict(DP, dp_noise_multiplier=1.0, dp_max_grad_norm=clip, batch_size=2, grad_accum=2,
                           max_steps=1, lora=lora, lora_r=2, val_fraction=0))
    loaded, params, peft_model, run, private, expected = _private(emu, text_file, cfg, 0.0)
    chosen = private.sample(0)
    assert len(chosen) > cfg.batch_size  # more than one chunk
    loaded.model.train()
    private.backward(0, contextlib.nullcontext(), OffsiteError)
    private.privatize(0)
    private.close()
    got = {n: p.grad.clone() for n, p in params.items()}
    want, norms = _reference_update(peft_model or loaded.model, params, run.train, chosen, clip, expected)
    assert bool((norms > 10 * clip).all())  # every example was clipped: the bound is what is tested
    for name in params:
        # two fp32 sums of <= 8 clipped per-example gradients, in different orders
        assert_close_to_scale(got[name], want[name], k=64, what=name)
    total = torch.cat([g.flatten() for g in got.values()]).norm()
    assert total <= clip * len(chosen) / expected * (1 + 1e-5)


def test_an_empty_poisson_batch_is_a_noise_only_step(emu, text_file):
    cfg = make_config(dict(DP, dp_noise_multiplier=2.0, max_steps=1, val_fraction=0))
    loaded, params, _, run, private, expected = _private(emu, text_file, cfg, 2.0)
    private.sample = lambda step: []
    assert private.backward(0, contextlib.nullcontext(), OffsiteError) == 0.0
    norm = private.privatize(0)
    private.close()
    noise = torch.cat([p.grad.flatten() for p in params.values()])
    # Only noise: N(0, (sigma C)^2) per coordinate, averaged over the expected batch size.
    assert noise.std().item() == pytest.approx(2.0 * 1.0 / expected, rel=0.05) and math.isfinite(norm)
    assert private.record()["steps"] == 1  # the step is accounted like any other


@pytest.mark.parametrize("lora", [False, True])
def test_only_the_trained_parameters_change(emu, tmp_path, text_file, monkeypatch, lora):
    seen = {}
    import offsite.training.session as session

    real = session.load_emulator

    def spy(*args, **kwargs):
        seen["emu"] = real(*args, **kwargs)
        return seen["emu"]

    monkeypatch.setattr(session, "load_emulator", spy)
    finetune(emu, text_file, tmp_path / "ad", max_steps=3, dp_epsilon=8.0, lora=lora, lora_r=2, **DP)
    trained = seen["emu"]
    fresh = real(emu)
    before = dict(fresh.model.named_parameters())
    changed, frozen = [], 0
    for name, p in trained.model.named_parameters():
        if "lora_" in name:
            changed.append(not torch.equal(p, torch.zeros_like(p)) if "lora_B" in name else True)
            continue
        key = name.replace(".base_layer", "")
        in_adapter = any(key.startswith(f"model.layers.{i}.") for i in trained.adapter_positions)
        if in_adapter and not lora:
            changed.append(not torch.equal(p.to(before[key].dtype), before[key]))
        else:
            assert torch.equal(p, before[key]), f"{name} changed"  # the emulator middle, bitwise
            frozen += 1
    assert frozen and changed and all(changed)


def test_refusals_write_nothing(emu, tmp_path, text_file, monkeypatch):
    out = tmp_path / "ad"
    cases = [
        (dict(dp_epsilon=8.0, dp_noise_multiplier=1.0), "not both"),
        (dict(dp_epsilon=8.0, dp_delta=None), "needs dp_delta"),
        (dict(dp_max_grad_norm=1.0), "given without dp_epsilon or dp_noise_multiplier"),
        (dict(dp_epsilon=0.0), "dp_epsilon must be > 0"),
        (dict(dp_noise_multiplier=-1.0), "dp_noise_multiplier must be > 0"),
        (dict(dp_epsilon=8.0, dp_max_grad_norm=0.0), "dp_max_grad_norm must be > 0"),
        (dict(dp_epsilon=8.0, dp_delta=1.0), r"dp_delta must be in \(0, 1\)"),
        (dict(dp_epsilon=8.0, dp_delta=0.05), r"must be < 1/N"),
        (dict(dp_epsilon=8.0, dp_accountant="gdp"), "dp_accountant 'gdp' unknown; allowed: rdp, prv"),
        (dict(dp_epsilon=8.0, gradient_checkpointing=True), "gradient checkpointing"),
        (dict(dp_epsilon=8.0, precision="fp16"), "--precision fp16"),
        (dict(dp_epsilon=8.0, batch_size=500), r"> 1; lower --batch-size"),
        (dict(dp_epsilon=1e-6, max_steps=50), "out of reach"),
    ]
    for settings, message in cases:
        with pytest.raises(OffsiteError, match=message):
            finetune(emu, text_file, out, **{**DP, "max_steps": 2, **settings})
        assert _nothing_written(out), settings
    monkeypatch.setitem(sys.modules, "opacus", None)  # as if the extra were not installed
    with pytest.raises(OffsiteError, match=r"install the dp extra: pip install 'offsite\[dp\]'"):
        finetune(emu, text_file, out, max_steps=2, dp_epsilon=8.0, **DP)
    assert _nothing_written(out)


def test_fp16_emulator_is_refused(saved_model, tmp_path, text_file):
    path, _ = saved_model("llama", 4)
    half = emulate(str(path), tmp_path / "emu16", adapter_layers="1,1", emulator_layers=1, dtype="float16")
    with pytest.raises(OffsiteError, match="fp16 loss scaling"):
        finetune(half, text_file, tmp_path / "ad", max_steps=2, dp_epsilon=8.0, **DP)
    assert _nothing_written(tmp_path / "ad")


def _crash_after_first_checkpoint(monkeypatch):
    real = ft.save_checkpoint

    def crash(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(ft, "save_checkpoint", crash)
    return real


def test_resume_refuses_a_non_private_checkpoint(emu, tmp_path, text_file, monkeypatch):
    out = tmp_path / "ad"
    real = _crash_after_first_checkpoint(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        finetune(emu, text_file, out, max_steps=3, save_every=1, **{**DP, "dp_delta": None})
    monkeypatch.setattr(ft, "save_checkpoint", real)
    with pytest.raises(OffsiteError, match="written by a run without DP-SGD"):
        finetune(emu, text_file, out, max_steps=3, save_every=1, dp_epsilon=8.0, **DP)
    assert not out.exists()


def test_resume_continues_the_same_private_run(emu, tmp_path, text_file, monkeypatch):
    monkeypatch.setattr(dp.secrets, "randbits", lambda bits: 12345)  # both runs draw the same secret
    kw = dict(max_steps=4, save_every=2, dp_epsilon=8.0, **DP)
    straight = finetune(emu, text_file, tmp_path / "straight", **kw)
    real = _crash_after_first_checkpoint(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        finetune(emu, text_file, tmp_path / "resumed", **kw)
    monkeypatch.setattr(ft, "save_checkpoint", real)
    monkeypatch.setattr(dp.secrets, "randbits", lambda bits: 999)  # the checkpoint's secret must win
    resumed = finetune(emu, text_file, tmp_path / "resumed", **kw)
    (m1, t1), (m2, t2) = load_adapter(straight), load_adapter(resumed)
    assert t1.keys() == t2.keys() and all(torch.equal(t1[k], t2[k]) for k in t1)
    assert m1["dp"] == m2["dp"] and m2["dp"]["steps"] == 4  # steps before the crash are accounted


def test_cli_finetune_with_dp_and_inspect(emu, tmp_path, text_file, capsys):
    ad = str(tmp_path / "ad")
    assert main(["finetune", "--emulator", str(emu), "--data", str(text_file), "--out", ad, "--max-steps", "3",
                 "--block-size", "16", "--batch-size", "4", "--dp-epsilon", "8", "--dp-delta", "1e-5",
                 "--no-progress"]) == 0
    epsilon = json.loads((tmp_path / "ad" / "manifest.json").read_text())["dp"]["epsilon"]
    assert 7.2 <= epsilon <= 8
    assert main(["verify", ad]) == 0
    capsys.readouterr()
    assert main(["inspect", ad]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("differential privacy")]
    assert len(lines) == 1 and f"epsilon {epsilon:.4g} at delta 1e-05" in lines[0] and "3 steps" in lines[0]


def test_without_dp_nothing_of_it_is_recorded(emu, tmp_path, text_file):
    out = finetune(emu, text_file, tmp_path / "ad", max_steps=1, **{**DP, "dp_delta": None})
    assert "dp" not in json.loads((out / "manifest.json").read_text())
    assert not any(k.startswith("dp_") for k in json.loads((out / "settings.json").read_text()))
    assert not math.isnan(json.loads((out / "training_log.json").read_text())["train"][0]["loss"])
