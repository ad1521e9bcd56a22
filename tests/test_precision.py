"""Mixed precision (``offsite.core.precision``): fp32 masters for what trains, the checkpoint dtype elsewhere.

A bf16 Llama and an fp16 GPT-2 go through emulate -> finetune -> plug at ``dtype auto``. What is
checked is what broke before the policy: trained in bf16 without an fp32 copy, 20 steps at lr 2e-5
left 78 % of adapter entries unchanged and every RMSNorm weight frozen. Here at least 99 % of the
fp32 master entries (every norm weight included) must move, the artifact must be exactly those
masters rounded to the base dtype, the loss curve must follow the fp32 run of the same weights,
and the adapter, emulator packages and plugged models must come out in the base dtype (LoRA in
fp32, see below) and load with stock transformers.

Why the masters and not the artifact carry the 99 %: a written bf16 entry changes only when its
total drift exceeds half a bf16 step at its value (2**-9 to 2**-8 of it). 20 AdamW steps at lr 2e-5
on a cosine schedule move an entry by at most ~2e-4 (sum of the lr), which is never enough for
|w| >= 1/16 nor for norm scales near 1.0, and for |w| >= 1/32 only if nearly every step pushes the
same way. So the bf16 adapter shows ~79 % changed entries (without fp32 masters: 21 %), fp16 with 3
more mantissa bits ~96 %; ``ARTIFACT_SHARE`` asserts those levels minus a margin. LoRA is written
as its fp32 masters (rounded to bf16, only ~63 % of its entries would show a change: lora_A starts
at ~0.1 and moves ~2e-4), so there the 99 % holds in the artifact itself.

Tolerance of the loss curves: the low-precision run computes its frozen layers in bf16 / fp16 (and,
for bf16 on CPU, the adapter under bf16 autocast), the fp32 run everything in fp32, from identical
weight values. Per-step training losses may differ by at most ``BF16_TOL`` = 0.01 (bf16: 8
mantissa bits, ~0.4 % relative rounding per op, averaging out over a loss of ~4.8) and ``FP16_TOL``
= 0.001 (fp16: 11 bits). Observed on torch 2.13 CPU: 0.0014 (bf16 Llama) and 0.00003 (fp16 GPT-2),
about 7x and 30x inside; the tests print them (``-s``).
"""

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import offsite.workflows.finetune as ft
from conftest import make_model
from offsite.adapters.artifact import load_adapter, reindex
from offsite.workflows.emulate import emulate
from offsite.emulator.methods.scaleot.harmonizer import HarmonizerLayer
from offsite.core.errors import OffsiteError
from offsite.families import get_family, get_layers, named_layer_parameters
from offsite.workflows.finetune import finetune
from offsite.emulator.package import load_emulator
from offsite.workflows.plug import plug
from offsite.core.precision import PRECISIONS, base_dtype, policy

FT = dict(max_steps=20, lr=2e-5, block_size=16, batch_size=4, progress=False, device="cpu", seed=0)
BF16_TOL, FP16_TOL = 0.01, 0.001
ARTIFACT_SHARE = {torch.bfloat16: 0.7, torch.float16: 0.9}
CAL = dict(seq_len=16, num_sequences=16, batch_size=4)


def _save(model, path, tokenizer):
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def bases(tmp_path_factory, tokenizer):
    """``{name: (low-precision folder, fp32 folder with the same values, dtype)}``, emulators made lazily."""
    root = tmp_path_factory.mktemp("precision")
    out = {}
    for name, model_type, dtype in (("llama", "llama", torch.bfloat16), ("gpt2", "gpt2", torch.float16)):
        low = make_model(model_type, 6).to(dtype)
        out[name] = (_save(low, root / f"{name}-low", tokenizer), _save(low.float(), root / f"{name}-fp32", tokenizer),
                     dtype)
    return out


def _changed(before: torch.Tensor, after: torch.Tensor) -> tuple:
    return int((before != after).sum()), before.numel()


def _share_changed(pairs) -> float:
    counts = [_changed(b, a) for b, a in pairs]
    return sum(c for c, _ in counts) / sum(n for _, n in counts)


def _losses(adapter) -> list:
    return [t["loss"] for t in json.loads((adapter / "training_log.json").read_text())["train"]]


def _float_dtypes(path) -> set:
    return {t.dtype for t in load_file(str(path)).values() if t.is_floating_point()}


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_adapter_learns_in_fp32_masters_and_ships_in_the_base_dtype(name, bases, tmp_path, text_file,
                                                                     monkeypatch):
    low_path, fp32_path, dtype = bases[name]
    emu = emulate(low_path, tmp_path / "emu", emulator_layers=1)
    emu32 = emulate(fp32_path, tmp_path / "emu32", emulator_layers=1)
    before = load_emulator(emu)
    assert base_dtype(before.model) == dtype and _float_dtypes(emu / "model.safetensors") == {dtype}

    masters = {}
    real_save = ft.save_full_adapter

    def capture(out, emulator, *args, **kwargs):  # the trained weights as the optimizer left them
        if not masters:
            layers = named_layer_parameters(emulator.model, emulator.family, emulator.adapter_positions)
            masters.update({k: p.detach().clone() for k, p in layers.items()})
        return real_save(out, emulator, *args, **kwargs)

    monkeypatch.setattr(ft, "save_full_adapter", capture)
    adapter = finetune(emu, text_file, tmp_path / "ad", **FT)
    reference = finetune(emu32, text_file, tmp_path / "ad32", **FT)
    manifest, tensors = load_adapter(adapter)
    assert {t.dtype for t in tensors.values()} == {dtype}
    assert {t.dtype for t in masters.values()} == {torch.float32}
    old = named_layer_parameters(before.model, before.family, before.adapter_positions)
    full = reindex(old, before.family, dict(zip(before.adapter_positions, before.split.adapter)))
    master_share = _share_changed((p.detach().float(), masters[k]) for k, p in old.items())
    norms = [k for k in old if old[k].ndim == 1 and ("norm" in k or ".ln_" in k)]
    assert norms and all(not torch.equal(old[k].float(), masters[k]) for k in norms)  # no norm scale frozen
    assert all(torch.equal(masters[k].to(dtype), tensors[full[k]]) for k in old)  # the artifact: masters rounded
    share = _share_changed((p.detach(), tensors[full[k]]) for k, p in old.items())
    low, ref = _losses(adapter), _losses(reference)
    gap = max(abs(a - b) for a, b in zip(low, ref))
    print(f"\n{name}: {master_share:.4f} of fp32 master entries changed, {share:.4f} of the {dtype} artifact's; "
          f"max |loss - fp32 loss| = {gap:.5f} (first {low[0]:.4f} vs {ref[0]:.4f}, last {low[-1]:.4f} vs "
          f"{ref[-1]:.4f})")
    assert master_share >= 0.99 and share >= ARTIFACT_SHARE[dtype]
    assert len(low) == len(ref) == 20 and gap <= (BF16_TOL if dtype == torch.bfloat16 else FP16_TOL)
    settings = json.loads((adapter / "settings.json").read_text())
    assert settings["mixed_precision"]["trained"] == "float32"
    assert settings["mixed_precision"]["loss_scaling"] == (dtype == torch.float16)

    plugged = plug(low_path, adapter, tmp_path / "plugged")
    assert _float_dtypes(plugged / "model.safetensors") == {dtype}
    stock = AutoModelForCausalLM.from_pretrained(plugged)
    assert {p.dtype for p in stock.parameters()} == {dtype}
    family = get_family(stock)
    for key, value in tensors.items():
        assert torch.equal(stock.get_parameter(key), value), key
    assert len(get_layers(stock, family)) == 6


def test_lora_trains_and_is_written_in_fp32_and_merges_into_a_bf16_checkpoint(bases, tmp_path, text_file):
    low_path, _, dtype = bases["llama"]
    emu = emulate(low_path, tmp_path / "emu", emulator_layers=1)
    untouched = finetune(emu, text_file, tmp_path / "lora0", lora=True, **{**FT, "max_steps": 0})
    trained = finetune(emu, text_file, tmp_path / "lora", lora=True, **FT)
    _, start = load_adapter(untouched)
    _, end = load_adapter(trained)
    assert {t.dtype for t in end.values()} == {torch.float32} and start.keys() == end.keys()
    share = _share_changed((start[k], end[k]) for k in start)
    a_share = _share_changed((start[k], end[k]) for k in start if "lora_A" in k)
    print(f"\nlora: {share:.4f} of LoRA entries changed ({a_share:.4f} of lora_A)")
    assert share >= 0.99 and a_share >= 0.99
    plugged = plug(low_path, trained, tmp_path / "plugged")
    assert _float_dtypes(plugged / "model.safetensors") == {dtype}
    assert {p.dtype for p in AutoModelForCausalLM.from_pretrained(plugged).parameters()} == {dtype}


def test_distilled_student_trains_in_fp32_and_the_package_is_bf16(bases, tmp_path, text_file):
    low_path, _, dtype = bases["llama"]
    out = emulate(low_path, tmp_path / "emu", method="distill", calibration=text_file, emulator_layers=1,
                  steps=10, lr=1e-4, warmup_steps=0, **CAL)
    assert _float_dtypes(out / "model.safetensors") == {dtype}
    emu, base = load_emulator(out), AutoModelForCausalLM.from_pretrained(low_path)
    family = get_family(base)
    middle = emu.layer_map.index(2)  # uniform keeps middle layer 2 of 2..3 for one emulator layer
    pairs = [(p.detach(), emu_p.detach()) for p, emu_p in zip(get_layers(base, family)[2].parameters(),
                                                               get_layers(emu.model, family)[middle].parameters())]
    share = _share_changed(pairs)
    print(f"\ndistill: {share:.4f} of the student's middle-layer entries changed")
    assert share >= 0.9
    assert {p.dtype for p in AutoModelForCausalLM.from_pretrained(out).parameters()} == {dtype}


def test_scaleot_harmonizers_and_scores_train_in_fp32_and_ship_in_bf16(bases, tmp_path, text_file):
    low_path, _, dtype = bases["llama"]
    settings = dict(alpha=0.5, beta=0.0, steps=6, harmonizer_rank=8, seed=0, **CAL)
    out = emulate(low_path, tmp_path / "emu", method="scaleot", adapter_layers="1,1", calibration=text_file,
                  **settings)
    assert _float_dtypes(out / "model.safetensors") == {dtype}
    emu = load_emulator(out)
    plan = emu.manifest["plan"]
    assert len({round(v, 6) for v in plan["importance"].values()}) > 1  # the scores moved off zero
    torch.manual_seed(0)  # the builder's seeded init of one harmonizer per middle layer, in order
    fresh = {i: HarmonizerLayer(32, 8).to(dtype) for i in range(1, 5)}
    layers = get_layers(emu.model, get_family(emu.model))
    pairs = []
    for i in plan["replaced"]:
        assert isinstance(layers[i], HarmonizerLayer)
        assert {p.dtype for p in layers[i].parameters()} == {dtype}
        pairs += [(p.detach(), q.detach()) for p, q in zip(fresh[i].parameters(), layers[i].parameters())]
    share = _share_changed(pairs)
    print(f"\nscaleot: {share:.4f} of the replacing harmonizers' entries changed")
    assert share >= 0.9


def test_policy_table_and_refusals():
    cpu = torch.device("cpu")
    assert policy("auto", torch.bfloat16, cpu).compute == torch.bfloat16
    assert policy("auto", torch.float32, cpu).compute is None and policy("auto", torch.float32, cpu).scaler is None
    fp16 = policy("auto", torch.float16, cpu)
    assert fp16.compute is None and fp16.scaler is not None  # fp32 compute at the boundary, loss scaling
    assert policy("fp16", torch.float32, cpu).compute == torch.float16
    assert PRECISIONS == ("auto", "fp32", "bf16", "fp16")
    with pytest.raises(OffsiteError, match="precision 'fp8' unknown"):
        policy("fp8", torch.float32, cpu)
    with pytest.raises(OffsiteError, match="precision 'half' unknown; allowed: auto, fp32, bf16, fp16"):
        finetune("unused", "unused", "unused", precision="half")


@pytest.mark.parametrize("name,precision", [("llama", "fp32"), ("llama", "bf16"), ("gpt2", "fp32"), ("gpt2", "fp16")])
def test_every_precision_runs_beside_16_bit_frozen_layers(name, precision, bases, tmp_path, text_file):
    """Autocast on or off, the boundary hooks keep 16-bit neighbours and fp32 adapter layers compatible."""
    low_path, _, dtype = bases[name]
    emu = emulate(low_path, tmp_path / "emu", emulator_layers=1)
    adapter = finetune(emu, text_file, tmp_path / "ad", precision=precision, **{**FT, "max_steps": 3})
    assert {t.dtype for t in load_adapter(adapter)[1].values()} == {dtype}
    assert all(math.isfinite(v) for v in _losses(adapter))


@pytest.mark.parametrize("name,precision", [("llama", "fp16"), ("gpt2", "bf16")])
def test_autocast_to_the_other_16_bit_format_is_refused(name, precision, bases, tmp_path, text_file):
    low_path, _, _ = bases[name]
    emu = emulate(low_path, tmp_path / "emu", emulator_layers=1)
    with pytest.raises(OffsiteError, match=f"precision {precision} on a model stored in .*mix two 16-bit formats"):
        finetune(emu, text_file, tmp_path / "ad", precision=precision, **FT)
    assert not (tmp_path / "ad").exists()


def test_fp16_run_resumes_bitwise_with_its_loss_scale(bases, tmp_path, text_file, monkeypatch):
    """The loss scaler's state travels in the checkpoint, so an fp16 run resumes exactly."""
    low_path, _, _ = bases["gpt2"]
    emu = emulate(low_path, tmp_path / "emu", emulator_layers=1)
    kw = {**FT, "max_steps": 6, "save_every": 2, "eval_every": 3, "lr": 1e-3}
    straight = finetune(emu, text_file, tmp_path / "straight", **kw)
    real, calls = ft.save_checkpoint, []

    def crash_after_second(*args):
        real(*args)
        calls.append(json.loads((args[0] / "state.json").read_text()))
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(ft, "save_checkpoint", crash_after_second)
    with pytest.raises(KeyboardInterrupt):
        finetune(emu, text_file, tmp_path / "resumed", **kw)
    assert calls[-1]["scaler"]["scale"] > 0
    monkeypatch.setattr(ft, "save_checkpoint", real)
    resumed = finetune(emu, text_file, tmp_path / "resumed", **kw)
    a, b = load_adapter(straight)[1], load_adapter(resumed)[1]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_an_unchanged_best_is_linked_into_the_next_checkpoint(tmp_path):
    """best.safetensors is written once per improvement; later checkpoints share it and still verify."""
    import offsite.training.checkpoint as ck

    folder = tmp_path / "ad.ckpt"
    w = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.AdamW([w], lr=0.1)
    best = {"w": torch.full((4,), 2.0)}
    ck.save_checkpoint(folder, {"w": w}, best, opt, {"step": 1, "resume_key": None})
    first = (folder / "best.safetensors").stat()
    ck.save_checkpoint(folder, {"w": w}, best, opt, {"step": 2, "resume_key": None}, True)
    again = (folder / "best.safetensors").stat()
    assert (again.st_ino, again.st_dev) == (first.st_ino, first.st_dev)  # linked, not rewritten
    assert ck.verified_state(folder)["step"] == 2
    ck.save_checkpoint(folder, {"w": w}, {"w": torch.full((4,), 3.0)}, opt, {"step": 3, "resume_key": None})
    assert ck.verified_state(folder)["step"] == 3
    assert torch.equal(load_file(str(folder / "best.safetensors"))["w"], torch.full((4,), 3.0))


def test_fp16_overflow_skips_the_step_and_halves_the_scale():
    """An overflowing fp16 step is the scaler's business; only overflow below scale 1 is a divergence."""
    prec = policy("fp16", torch.float16, torch.device("cpu"))
    w = torch.nn.Parameter(torch.ones(3, dtype=torch.float16))
    prec.train(params=[w])
    opt = torch.optim.AdamW([w], lr=0.1)
    prec.backward((w * torch.tensor(float("inf"))).sum())
    scale = prec.scaler.get_scale()
    norm = prec.clip(opt, [w], 1.0)
    assert w.dtype == torch.float32 and not math.isfinite(norm)
    assert prec.overflow_skips()
    prec.step(opt)
    assert torch.equal(w.detach(), torch.ones(3)) and prec.scaler.get_scale() == scale / 2
    prec.load_state({**prec.state(), "scale": 0.5})
    assert not prec.overflow_skips()
