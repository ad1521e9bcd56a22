"""Every workflow end to end through the CLI, as a user runs it: each method built, verified,
fine-tuned and plugged on two families; eval of a plug-in against the adapter plugged on the fly;
report; streamed builds. Marked ``compat``: ``.ci/run`` also runs these on the newest versions the
ranges in pyproject allow, so a new transformers/peft release that breaks a workflow fails CI."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from offsite.artifacts import read_manifest
from offsite.cli import main
from offsite.families import get_family, get_layers

pytestmark = pytest.mark.compat

CALIB = ["--set", "seq_len=16", "num_sequences=4", "batch_size=2"]
METHODS = {
    "uniform": ["--set", "emulator_layers=2"],
    "crash": ["--set", "emulator_layers=2", "share=true", "seq_len=16", "num_sequences=4", "batch_size=2"],
    "distill": ["--set", "emulator_layers=2", "steps=2", "seq_len=16", "num_sequences=4", "batch_size=2"],
    "scaleot": ["--set", "alpha=0.5", "beta=0.5", "steps=2", "harmonizer_rank=8", "seq_len=16",
                "num_sequences=4", "batch_size=2"],
    "gradot": ["--set", "param_budget=0.3", "seq_len=16", "num_sequences=4", "batch_size=2"],
}


def run(*argv) -> None:
    code = main([str(a) for a in argv])
    assert code == 0, f"offsite {' '.join(map(str, argv))} exited {code}"


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_build_verify_finetune_plug(method, model_type, saved_model, text_file, mc_file, tmp_path):
    """The plugged folder is a stock checkpoint equal to the base model outside the adapter layers
    and equal to the trained adapter inside them; every artifact verifies."""
    path, base = saved_model(model_type, 6)
    emu, adapter, plugged = tmp_path / "emu", tmp_path / "adapter", tmp_path / "plugged"
    run("emulate", "--model", path, "--method", method, "--adapter-layers", "1,1", "--calibration", text_file,
        "--out", emu, "--quiet", *METHODS[method])
    run("verify", emu)
    run("finetune", "--emulator", emu, "--data", mc_file, "--format", "mc", "--max-steps", 2, "--batch-size", 4,
        "--lr", 1e-3, "--out", adapter, "--quiet")
    run("verify", adapter)
    run("plug", "--model", path, "--adapter", adapter, "--out", plugged, "--quiet")
    run("verify", plugged)
    family = get_family(base)
    stock = AutoModelForCausalLM.from_pretrained(plugged).eval()
    got, orig = get_layers(stock, family), get_layers(base, family)
    changed = [i for i in range(6)
               if any(not torch.equal(a, b) for a, b in zip(got[i].state_dict().values(),
                                                            orig[i].state_dict().values()))]
    assert changed and set(changed) <= {0, 5}, changed  # trained, and only the adapter moved
    assert read_manifest(plugged)["kind"] == "plugged"


def test_eval_of_a_plugin_equals_the_adapter_plugged_on_the_fly(saved_model, text_file, mc_task, tmp_path):
    path, _ = saved_model("llama", 6)
    template, _ = mc_task
    emu, adapter, plugged = tmp_path / "emu", tmp_path / "adapter", tmp_path / "plugged"
    run("emulate", "--model", path, "--adapter-layers", "1,1", "--out", emu, "--quiet", *METHODS["uniform"])
    run("finetune", "--emulator", emu, "--data", template.format(split="train"), "--format", "mc",
        "--max-steps", 2, "--batch-size", 4, "--lr", 1e-3, "--out", adapter, "--quiet")
    run("plug", "--model", path, "--adapter", adapter, "--out", plugged, "--quiet")
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    run("eval", "--model", plugged, "--tasks", template, "--limit", 8, "--details", "--out", a, "--quiet")
    run("eval", "--model", path, "--adapter", adapter, "--tasks", template, "--limit", 8, "--details",
        "--out", b, "--quiet")
    first, second = (json.loads(f.read_text()) for f in (a, b))
    assert first["details"] and json.dumps(first["details"]) == json.dumps(second["details"])  # every loglik
    for task in first["results"]:
        scores = [{k: v for k, v in r["results"][task].items() if k != "seconds"} for r in (first, second)]
        assert scores[0] == scores[1]


def test_report_runs_the_protocol(saved_model, mc_task, tmp_path):
    path, _ = saved_model("llama", 6)
    template, _ = mc_task
    work = tmp_path / "work"
    run("report", "--model", path, "--tasks", template, "--methods", "uniform", "--adapter-layers", "1,1",
        "--emulator-layers", 2, "--limit", 8, "--train-limit", 16, "--max-steps", 2, "--batch-size", 4,
        "--workdir", work, "--quiet")
    report = json.loads((work / "report.json").read_text())
    text = json.dumps(report)
    assert "uniform" in text and (work / "report.md").exists()


@pytest.mark.parametrize("method", ["uniform", "gradot"])
def test_streamed_build_writes_the_in_memory_package(method, saved_model, text_file, tmp_path):
    path, _ = saved_model("llama", 6)
    common = ["--model", path, "--method", method, "--adapter-layers", "1,1", "--calibration", text_file,
              "--quiet", *METHODS[method]]
    run("emulate", *common, "--out", tmp_path / "mem")
    run("emulate", *common, "--stream", "--out", tmp_path / "streamed")
    assert read_manifest(tmp_path / "mem")["tensors"] == read_manifest(tmp_path / "streamed")["tensors"]
