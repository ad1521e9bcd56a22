"""Fine-tuning: data formats, learning, resumption, and the CLI spine end to end."""

import dataclasses
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import offsite.workflows.finetune as ft
from conftest import state_equal
from offsite.adapters.artifact import load_adapter
from offsite.artifacts import unique_state_dict
from offsite.cli import main
from offsite.data.records import IGNORE
from offsite.data.examples import load_examples
from offsite.workflows.emulate import emulate
from offsite.core.errors import OffsiteError
from offsite.workflows.finetune import finetune
from offsite.eval.loading import load_for_eval


def test_prompt_format_masks_the_prompt(tmp_path, tokenizer):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "Question: what colour is the sky? Answer:", "completion": " blue"}) + "\n")
    (ex,) = load_examples(path, "prompt", tokenizer, 64)
    n_target = len(tokenizer(" blue", add_special_tokens=False)["input_ids"]) + 1  # + EOS
    assert ex["labels"][:-n_target] == [IGNORE] * (len(ex["labels"]) - n_target)
    assert ex["labels"][-n_target:] == ex["input_ids"][-n_target:]
    assert ex["labels"][-1] == tokenizer.eos_token_id


def test_mc_format_targets_the_gold_answer(mc_file, tokenizer):
    examples = load_examples(mc_file, "mc", tokenizer, 64)
    assert len(examples) == 40
    first = examples[0]
    target = [t for t in first["labels"] if t != IGNORE]
    assert tokenizer.decode(target[:-1]).strip() == "red"


def test_bad_data_is_refused(tmp_path, tokenizer):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    with pytest.raises(OffsiteError, match="lacks 'prompt'/'completion'"):
        load_examples(bad, "prompt", tokenizer, 64)
    with pytest.raises(OffsiteError, match="does not exist"):
        load_examples(tmp_path / "missing.txt", "text", tokenizer, 64)
    with pytest.raises(OffsiteError, match="allowed: text, prompt, mc"):
        load_examples(bad, "csv", tokenizer, 64)
    bad.write_text("not json\n")
    with pytest.raises(OffsiteError, match="bad.jsonl:1 is not valid JSON"):
        load_examples(bad, "mc", tokenizer, 64)


def test_training_lowers_validation_loss_and_keeps_the_best(saved_model, tmp_path, text_file):
    path, _ = saved_model("llama", 6)
    emu = emulate(str(path), tmp_path / "emu", emulator_layers=1)
    out = finetune(emu, text_file, tmp_path / "ad", max_steps=30, lr=3e-3, block_size=16, batch_size=4,
                   eval_every=5, warmup_steps=3, schedule="linear", grad_accum=2, progress=False)
    log = json.loads((out / "training_log.json").read_text())
    val = [v["loss"] for v in log["val"]]
    assert val[-1] < val[0] - 0.3
    assert log["best_val_loss"] == min(val)
    assert not (tmp_path / "ad.ckpt").exists()
    manifest, tensors = load_adapter(out)
    assert manifest["split"]["adapter"] == [0, 1, 4, 5]
    assert {k.split(".")[2] for k in tensors} == {"0", "1", "4", "5"}  # full-model numbering


@pytest.mark.parametrize("part, trained", [("top", {"4", "5"}), ("bottom", {"0", "1"})])
def test_train_adapter_part_trains_only_that_part(saved_model, tmp_path, text_file, part, trained):
    path, _ = saved_model("llama", 6)
    base = AutoModelForCausalLM.from_pretrained(path).state_dict()
    emu = emulate(str(path), tmp_path / "emu", emulator_layers=1)
    out = finetune(emu, text_file, tmp_path / "ad", max_steps=3, lr=3e-3, block_size=16, batch_size=4,
                   train_adapter=part, progress=False)
    _, tensors = load_adapter(out)
    assert {k.split(".")[2] for k in tensors} == {"0", "1", "4", "5"}  # the whole adapter travels back
    changed = {k.split(".")[2] for k, v in tensors.items() if not torch.equal(v, base[k])}
    assert changed == trained  # the frozen part is bitwise the base model's


def test_train_adapter_refuses_a_part_the_split_lacks(saved_model, tmp_path, text_file):
    path, _ = saved_model("llama", 6)
    emu = emulate(str(path), tmp_path / "emu", emulator_layers=1, adapter_layers="0,2")
    with pytest.raises(OffsiteError, match="train_adapter='bottom': this emulator has no adapter layer there"):
        finetune(emu, text_file, tmp_path / "ad", max_steps=1, block_size=16, train_adapter="bottom", progress=False)
    assert not (tmp_path / "ad").exists()
    with pytest.raises(OffsiteError, match="train_adapter 'middle' unknown; allowed: all, top, bottom"):
        finetune(emu, text_file, tmp_path / "ad", max_steps=1, train_adapter="middle", progress=False)


def test_init_adapter_starts_from_that_adapter_and_refuses_another_emulators(saved_model, tmp_path, text_file):
    path, _ = saved_model("llama", 6)
    emu = emulate(str(path), tmp_path / "emu", emulator_layers=1)
    first = finetune(emu, text_file, tmp_path / "a1", max_steps=2, lr=3e-3, block_size=16, progress=False)
    # zero steps from a starting adapter writes that adapter back, bitwise
    again = finetune(emu, text_file, tmp_path / "a2", max_steps=0, block_size=16, init_adapter=str(first),
                     progress=False)
    _, t1 = load_adapter(first)
    _, t2 = load_adapter(again)
    assert t1.keys() == t2.keys() and all(torch.equal(t1[k], t2[k]) for k in t1)
    # the resume key holds the starting adapter by content: its artifact_id, not where it lies
    from offsite.artifacts import read_manifest
    from offsite.workflows.finetune import _resumable, make_config, start_from
    from offsite.emulator.package import load_emulator

    start_id = start_from(load_emulator(emu, device="cpu"), str(first))
    assert start_id == read_manifest(first)["artifact_id"]
    assert _resumable(make_config({"init_adapter": str(first)}), start_id)["init_adapter"] == start_id
    # an adapter of another emulator of the same model is refused, and nothing is written
    other = emulate(str(path), tmp_path / "emu2", emulator_layers=0)
    with pytest.raises(OffsiteError, match="emulator"):
        finetune(other, text_file, tmp_path / "a3", max_steps=1, block_size=16, init_adapter=str(first),
                 progress=False)
    assert not (tmp_path / "a3").exists()
    lora = finetune(emu, text_file, tmp_path / "l1", max_steps=1, block_size=16, lora=True, progress=False)
    with pytest.raises(OffsiteError, match="only a full adapter"):
        finetune(emu, text_file, tmp_path / "a4", max_steps=1, block_size=16, init_adapter=str(lora),
                 progress=False)


def test_resume_reproduces_an_uninterrupted_run(saved_model, tmp_path, text_file, monkeypatch):
    path, _ = saved_model("llama", 6)
    emu = emulate(str(path), tmp_path / "emu", emulator_layers=1)
    kw = dict(max_steps=8, lr=3e-3, block_size=16, batch_size=2, save_every=3, eval_every=4, progress=False)
    straight = finetune(emu, text_file, tmp_path / "straight", **kw)

    real_save = ft.save_checkpoint
    calls = []

    def crash_after_second_checkpoint(*args, **kwargs):
        real_save(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process dies right after writing the step-6 checkpoint

    monkeypatch.setattr(ft, "save_checkpoint", crash_after_second_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        finetune(emu, text_file, tmp_path / "resumed", **kw)
    assert not (tmp_path / "resumed").exists() and (tmp_path / "resumed.ckpt" / "state.json").is_file()
    monkeypatch.setattr(ft, "save_checkpoint", real_save)
    with pytest.raises(OffsiteError, match="different settings"):
        finetune(emu, text_file, tmp_path / "resumed", **{**kw, "lr": 1e-3})
    resumed = finetune(emu, text_file, tmp_path / "resumed", **kw)
    assert state_equal(load_adapter(straight)[1], load_adapter(resumed)[1])
    log = json.loads((resumed / "training_log.json").read_text())
    assert [t["step"] for t in log["train"]] == list(range(1, 9))


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_cli_emulate_finetune_plug_end_to_end(model_type, saved_model, tmp_path, mc_file, capsys):
    path, model = saved_model(model_type, 8)
    emu, ad, lora, out = (str(tmp_path / n) for n in ("emu", "ad", "lora", "plugged"))
    assert main(["emulate", "--model", str(path), "--method", "uniform", "--adapter-layers", "2,2",
                 "--emulator-layers", "2", "--out", emu]) == 0
    assert main(["finetune", "--emulator", emu, "--data", str(mc_file), "--format", "mc", "--out", ad,
                 "--max-steps", "4", "--lr", "1e-3", "--no-progress"]) == 0
    assert main(["finetune", "--emulator", emu, "--data", str(mc_file), "--format", "mc", "--out", lora, "--lora",
                 "--max-steps", "2", "--no-progress"]) == 0
    assert main(["plug", "--model", str(path), "--adapter", ad, "--out", out]) == 0
    for folder in (emu, ad, lora, out):
        assert main(["verify", folder]) == 0
        assert main(["inspect", folder]) == 0
        assert (tmp_path / folder / "settings.json").is_file()
    plugged = AutoModelForCausalLM.from_pretrained(out)
    assert type(plugged) is type(model)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out) is not None
    # plug-in in memory (eval path) equals the written folder
    mem, _, info = load_for_eval(str(path), adapter=ad)
    assert info["kind"] == "plug-in"
    assert state_equal(unique_state_dict(mem), unique_state_dict(plugged))
    x = torch.randint(4, 100, (1, 8))
    with torch.no_grad():
        assert torch.equal(plugged(x).logits, mem(x).logits)


def test_cli_reaches_every_finetune_setting_and_passes_only_the_given_ones(monkeypatch, tmp_path):
    seen = {}

    def fake(emulator, data, out, **kwargs):
        seen.update(kwargs)
        return out

    monkeypatch.setattr(ft, "finetune", fake)
    assert main(["finetune", "--emulator", "E", "--data", "D", "--out", str(tmp_path / "A"), "--val-limit", "3",
                 "--keep-checkpoint", "--lora-targets", "q_proj", "v_proj", "--train-adapter", "top"]) == 0
    assert seen["val_limit"] == 3 and seen["keep_checkpoint"] is True
    assert seen["lora_targets"] == ["q_proj", "v_proj"] and seen["train_adapter"] == "top"
    assert "val_fraction" not in seen and "lora_dropout" not in seen  # not given: the config's default applies
    from offsite.workflows.finetune import FinetuneConfig
    ft.make_config({k: v for k, v in seen.items() if k not in ("overwrite", "sign_key", "trusted_keys")})
    assert {f.name for f in dataclasses.fields(FinetuneConfig)} >= set(seen) - {"overwrite", "sign_key", "trusted_keys"}


def test_the_resume_key_leaves_out_exactly_the_declared_runtime_and_by_content_settings():
    from offsite.workflows.finetune import _resumable, make_config
    from offsite.training.config import resume_settings

    base = make_config({})
    declared = {f.name: f.metadata["resume_key"] for f in dataclasses.fields(base) if "resume_key" in f.metadata}
    assert declared == {"val_data": "content", "init_adapter": "content", "logits": "runtime",
                        "pass_tokens": "runtime", "save_every": "runtime", "resume": "runtime",
                        "keep_checkpoint": "runtime", "device": "runtime", "progress": "runtime"}
    assert not set(declared) & set(resume_settings(base))
    runtime = make_config({"device": "cpu", "progress": False, "pass_tokens": 0, "keep_checkpoint": True,
                           "val_data": "elsewhere.jsonl", "init_adapter": "moved/adapter"})
    assert _resumable(runtime, "id") == _resumable(base, "id")  # paths and runtime choices: same key
    assert _resumable(make_config({"lr": 3e-4}), "id") != _resumable(base, "id")
    assert _resumable(base, "other") != _resumable(base, "id")  # another starting adapter's content


@pytest.mark.parametrize("bad, message", [
    ({"stepz": 1}, r"fine-tuning has no setting\(s\) \['stepz'\]; known: \['batch_size'"),
    ({"lr": "abc"}, r"fine-tuning setting lr must be a finite number, got 'abc'"),
    ({"lora": 1}, r"fine-tuning setting lora must be true or false, got 1"),
])
def test_finetune_settings_are_checked_as_method_settings_are(bad, message):
    """One settings builder (core.settings_types.build_settings) for methods and fine-tuning."""
    with pytest.raises(OffsiteError, match=message):
        ft.make_config(bad)
    assert ft.make_config({"lr": 3, "val_data": __import__("pathlib").Path("v.jsonl")}).val_data == "v.jsonl"
