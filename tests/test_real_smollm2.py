"""The ``real`` tier: offsite's workflow on a real pretrained LM, SmolLM2-135M-Instruct.

Opt-in (``pytest -m real``; the default run skips it) and skipped with the reason when the model is
not prepared (``offsite models prepare smollm2-135m``) or the shared SciQ data is absent. What it
holds on a model that knows things, at small settings so each test takes a few minutes on a CPU:

* before any fine-tuning, the plug-in (the emulator's adapter layers, untrained, plugged back) is the
  full model bitwise and scores exactly the full model on 100 SciQ validation questions, while the
  emulator alone (the default: 18 of 26 middle layers) scores clearly below it;
* ``offsite demo --quick`` runs the workflow on the real model at the defaults (the README's first command);
* every method builds an emulator in memory and streamed (the same package), fine-tunes a few
  steps, and plugs; the plugged folder loads with stock transformers;
* a ``.gguf`` input gives the same emulator as its converted folder, and scores as the folder does.
"""

from __future__ import annotations

import gzip
import json

import pytest
import torch

from conftest import artifact_tensors, state_equal
from fixtures.llama2c import shared_dir

pytestmark = pytest.mark.real

MODEL = "smollm2-135m"
QUESTIONS = 100
CALIBRATION = dict(seq_len=64, num_sequences=8, batch_size=4)  # small windows: minutes, not hours
METHODS = {  # method -> (settings, streams)
    "uniform": ({}, True),
    "crash": (CALIBRATION, True),
    "distill": ({**CALIBRATION, "steps": 2}, True),
    "gradot": (CALIBRATION, True),
    "scaleot": ({**CALIBRATION, "steps": 2}, False),
}


def _prepared(fmt: str):
    from offsite.model.realmodels import find_prepared

    path = find_prepared(MODEL, fmt)
    if path is None:
        pytest.skip(f"{MODEL} ({fmt}) is not prepared: run offsite models prepare {MODEL}")
    return str(path)


@pytest.fixture(scope="module")
def smol():
    return _prepared("fp32")


@pytest.fixture(scope="module")
def data_dir():
    shared = shared_dir()
    if shared is None or not (shared / "data/mc/sciq/validation.jsonl.gz").is_file():
        pytest.skip("shared SciQ data not found (set OFFSITE_SHARED or provide ../shared)")
    return shared / "data"


@pytest.fixture(scope="module")
def sciq_train(data_dir, tmp_path_factory):
    """The first 64 SciQ training questions (mc schema), for fine-tuning a few steps."""
    path = tmp_path_factory.mktemp("sciq") / "train.jsonl"
    with gzip.open(data_dir / "mc/sciq/train.jsonl.gz", "rt") as f:
        path.write_text("".join(line for _, line in zip(range(64), f)))
    return path


def _score(model, tokenizer, data_dir, limit=QUESTIONS):
    from offsite.eval.run import evaluate

    report = evaluate(model, tokenizer, "sciq", data_dir, limit=limit, batch_size=8, progress=False,
                      keep_details=True)
    return report["results"]["sciq"], report["details"]["sciq"]


@pytest.fixture(scope="module")
def full_scores(smol, data_dir):
    from offsite.model.loading import load_model

    model, tokenizer = load_model(smol)
    return _score(model, tokenizer, data_dir)


def test_untrained_plugin_is_the_full_model_and_the_emulator_scores_below(smol, data_dir, sciq_train,
                                                                          full_scores, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from offsite.workflows.emulate import emulate
    from offsite.workflows.finetune import finetune
    from offsite.eval.loading import load_for_eval
    from offsite.workflows.plug import plug

    emu = emulate(smol, tmp_path / "emu", method="uniform", adapter_layers="2,2")
    adapter = finetune(emu, sciq_train, tmp_path / "adapter", format="mc", task="sciq", max_steps=0,
                       progress=False, device="cpu")
    plugged = plug(smol, adapter, tmp_path / "plugged", device="cpu")
    stock = AutoModelForCausalLM.from_pretrained(str(plugged)).eval()
    full = AutoModelForCausalLM.from_pretrained(smol)
    assert state_equal(stock.state_dict(), full.state_dict())
    metrics, details = _score(stock, AutoTokenizer.from_pretrained(str(plugged)), data_dir)
    full_metrics, full_details = full_scores
    assert metrics["acc"] == full_metrics["acc"] and metrics["acc_norm"] == full_metrics["acc_norm"]
    assert details == full_details  # every question, every choice's log-likelihood
    assert full_metrics["acc"] >= 0.55, full_metrics  # the model knows SciQ (73% on 200 questions)
    emulator, tokenizer, _ = load_for_eval(str(emu), device="cpu")
    emu_metrics, _ = _score(emulator, tokenizer, data_dir)
    print(f"SciQ acc on {QUESTIONS} validation questions: full {full_metrics['acc']:.2f}, untrained plug-in "
          f"{metrics['acc']:.2f}, emulator {emu_metrics['acc']:.2f}")  # shown with pytest -s
    # 10 points: the default keeps 70% of the middle (18 of 26 layers), 54.5 against 73.0 on 200 questions
    assert emu_metrics["acc"] <= full_metrics["acc"] - 0.1, (emu_metrics["acc"], full_metrics["acc"])


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_builds_streamed_and_not_finetunes_and_plugs(method, smol, sciq_train, tmp_path):
    from transformers import AutoModelForCausalLM

    from offsite.artifacts import read_manifest
    from offsite.workflows.emulate import emulate
    from offsite.workflows.finetune import finetune
    from offsite.workflows.plug import plug

    settings, streams = METHODS[method]
    emu = emulate(smol, tmp_path / "emu", method=method, adapter_layers="2,2", stream=False, **settings)
    if streams:  # the streamed build writes the very same package
        streamed = emulate(smol, tmp_path / "emu-streamed", method=method, adapter_layers="2,2", stream=True,
                           **settings)
        assert read_manifest(streamed)["artifact_id"] == read_manifest(emu)["artifact_id"]
    manifest = read_manifest(emu)
    assert manifest["parameters"]["emulator"] < manifest["parameters"]["full"]
    adapter = finetune(emu, sciq_train, tmp_path / "adapter", format="mc", task="sciq", max_steps=2, batch_size=2,
                       lr=1e-4, progress=False, device="cpu")
    plugged = plug(smol, adapter, tmp_path / "plugged", device="cpu")
    stock = AutoModelForCausalLM.from_pretrained(str(plugged)).eval()
    full = AutoModelForCausalLM.from_pretrained(smol).state_dict()
    changed = {k for k, v in stock.state_dict().items() if not torch.equal(v, full[k])}
    layers = {int(k.split(".")[2]) for k in changed}
    assert changed and layers <= {0, 1, 28, 29}, sorted(changed)[:5]  # only the adapter layers were trained
    with torch.no_grad():
        logits = stock(torch.tensor([[504, 3575, 282, 4649, 314]])).logits
    assert torch.isfinite(logits).all()


def test_gguf_input_gives_the_same_emulator_and_scores(smol, data_dir, full_scores, tmp_path):
    from offsite.artifacts import read_manifest
    from offsite.cli import main
    from offsite.workflows.emulate import emulate
    from offsite.model.identity import same_base
    from offsite.model.realmodels import MODELS

    gguf = _prepared("gguf")
    from_gguf = emulate(gguf, tmp_path / "emu-gguf", method="uniform", adapter_layers="2,2")
    from_folder = emulate(smol, tmp_path / "emu-folder", method="uniform", adapter_layers="2,2")
    assert state_equal(artifact_tensors(from_gguf), artifact_tensors(from_folder))
    base = read_manifest(from_gguf)["base"]
    assert same_base(base, read_manifest(from_folder)["base"])
    assert base["source"]["sha256"] == MODELS[MODEL].sha256 and base["source"]["file_type"] == "MOSTLY_Q4_1"
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", gguf, "--tasks", "sciq", "--data-dir", str(data_dir), "--limit", "20",
                 "--out", str(out), "--quiet"]) == 0
    acc = json.loads(out.read_text())["results"]["sciq"]["acc"]
    _, full_details = full_scores
    assert acc == pytest.approx(sum(d["acc"] for d in full_details[:20]) / 20)


def test_the_demo_runs_offsite_tuning_on_the_real_model_at_the_defaults(smol, data_dir, full_scores, tmp_path):
    from offsite.cli import main
    from offsite.emulator.methods.uniform import default_emulator_layers

    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--quiet", "--workdir", str(out), "--data-dir", str(data_dir)]) == 0
    result = json.loads((out / "results.json").read_text())
    acc = result["accuracy"]
    assert set(acc) == {"full_zs", "emulator_zs", "emulator_ft", "plug_in"} and not result["world"]
    assert result["emulator"]["plan"] == default_emulator_layers(26)  # the default emulator, no flags
    _, full_details = full_scores  # the demo's full ZS is the model's own score on the same questions
    assert acc["full_zs"] == pytest.approx(sum(d["acc"] for d in full_details[:result["test_questions"]])
                                           / result["test_questions"], abs=1e-4)
    assert acc["emulator_zs"] < acc["full_zs"]  # privacy before tuning
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG" and (out / "plugged" / "config.json").is_file()
