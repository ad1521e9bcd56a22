"""``device`` on every workflow: ``cpu`` builds what the default builds, a device this machine lacks
(or a name torch does not know) is refused first by every command, and multiple-choice batches by
token budget score the same as batches by row count. Tests marked ``gpu`` repeat the invariants on
CUDA and are skipped without it."""

import json
import re

import pytest
import torch

from conftest import SENTENCES, make_model
from offsite.artifacts import read_manifest
from offsite.cli import main
from offsite.experiments.demo.pipeline import DemoSettings, run_demo
from offsite.experiments.demo.pretrain import PretrainConfig
from offsite.core.device import available_devices, resolve_device
from offsite.workflows.emulate import emulate
from offsite.core.errors import OffsiteError
from offsite.data.batching import DEFAULT_CUDA_BATCH_TOKENS, plan_batches, resolve_batch_tokens
from offsite.eval.run import evaluate
from offsite.eval.scoring import score_multiple_choice
from offsite.workflows.finetune import finetune
from offsite.eval.loading import load_for_eval
from offsite.workflows.plug import plug
from offsite.experiments.protocol import Protocol
from offsite.experiments.report import run_report

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
# Without CUDA "auto" is the CPU, so device="cpu" must reproduce the default build exactly; with
# CUDA the default is the GPU, and "cpu:0" is the same CPU spelled another way.
DEFAULT = {} if not CUDA else {"device": "cpu:0"}
CAL = {"seq_len": 16, "num_sequences": 4, "batch_size": 2}
METHODS = {"uniform": {}, "gradot": CAL, "crash": CAL, "distill": {**CAL, "steps": 2},
           "scaleot": {**CAL, "steps": 2, "group_size": 2, "num_candidates": 2}}
BAD = ["tpu", "cuda:x"] + ([] if CUDA else ["cuda"])
TINY_DEMO = DemoSettings(people=12, variants=2, choices=4, adapter_layers="1,1", emulator_layers=1, ft_steps=2,
                         ft_batch=4, pretrain=PretrainConfig(layers=4, hidden=32, intermediate=64, heads=2,
                                                             vocab_size=300, seq_len=32, batch_size=8, steps=4,
                                                             warmup=1))


def _without_run_facts(value):
    """A plan minus the wall times and peak memory some methods record (facts of one run)."""
    if isinstance(value, dict):
        return {k: _without_run_facts(v) for k, v in value.items() if not k.endswith(("seconds", "_mb"))}
    if isinstance(value, list):
        return [_without_run_facts(v) for v in value]
    return value


def _content(folder) -> dict:
    """What an emulator package is, apart from the run that made it: file hashes, plan, disclosure."""
    m = read_manifest(folder)
    return {"files": m["files"], "plan": _without_run_facts(m["plan"]), "disclosure": m["disclosure"]}


def _build(path, out, method, calibration, **device):
    settings = METHODS[method]
    return emulate(str(path), out, method=method, adapter_layers="1,1", calibration=calibration if settings else None,
                   **device, **settings)


def _scores(report: dict) -> dict:
    return {task: {k: v for k, v in m.items() if k != "seconds"} for task, m in report["results"].items()}


def test_resolve_device_names_and_auto():
    assert resolve_device("cpu") == resolve_device(" CPU ") == resolve_device("cpu:0") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if CUDA else "cpu") and resolve_device(None) == resolve_device("auto")
    assert available_devices()[:2] == ["auto", "cpu"]


@pytest.mark.parametrize("name", ["tpu", "cuda:x", "meta", "", "gpu"])
def test_unknown_device_names_are_refused_with_what_is_available(name):
    listed = ", ".join(available_devices())
    with pytest.raises(OffsiteError, match=re.escape(f"device {name!r} is not a device name offsite knows")) as err:
        resolve_device(name)
    assert str(err.value).endswith(f"choose --device from: {listed}")


@pytest.mark.skipif(CUDA, reason="CUDA is present here")
def test_cuda_without_cuda_is_refused_in_one_line():
    for name in ("cuda", "cuda:0"):
        with pytest.raises(OffsiteError) as err:
            resolve_device(name)
        assert str(err.value) == (f"device '{name}' is not available here (torch.cuda.is_available() is False); "
                                  "choose --device from: auto, cpu")


@pytest.mark.parametrize("method", sorted(METHODS))
def test_emulate_on_cpu_builds_the_default_package(method, saved_model, text_file, tmp_path):
    path, _ = saved_model("llama", 4)
    cpu = _build(path, tmp_path / "cpu", method, str(text_file), device="cpu")
    default = _build(path, tmp_path / "default", method, str(text_file), **DEFAULT)
    assert _content(cpu) == _content(default)
    assert read_manifest(cpu)["run"]["device"] == "cpu"
    if _without_run_facts(read_manifest(cpu)["plan"]) == read_manifest(cpu)["plan"]:
        assert read_manifest(cpu)["artifact_id"] == read_manifest(default)["artifact_id"]


def test_cli_device_cpu_gives_the_api_defaults_artifacts(saved_model, text_file, mc_task, tmp_path, capsys):
    """Each of emulate, finetune, plug and eval through the CLI with --device cpu, against the API's default.

    Every CLI step reads the API's artifacts, so the paths recorded in the outputs are the same.
    """
    path, _ = saved_model("llama", 4)
    task, _ = mc_task
    emu = emulate(str(path), tmp_path / "emu", adapter_layers="1,1", emulator_layers=1, **DEFAULT)
    adapter = finetune(emu, text_file, tmp_path / "ad", max_steps=2, batch_size=2, block_size=16, progress=False,
                       **DEFAULT)
    plugged = plug(str(path), adapter, tmp_path / "plugged", **DEFAULT)
    model, tok, _ = load_for_eval(str(emu), adapter=str(adapter), **DEFAULT)
    scored = evaluate(model, tok, [task], None, limit=6, progress=False)

    cpu = ["--device", "cpu"]
    assert main(["emulate", "--model", str(path), "--out", str(tmp_path / "emu2"), "--adapter-layers", "1,1",
                 "--emulator-layers", "1", *cpu]) == 0
    assert main(["finetune", "--emulator", str(emu), "--data", str(text_file), "--out", str(tmp_path / "ad2"),
                 "--max-steps", "2", "--batch-size", "2", "--block-size", "16", "--no-progress", *cpu]) == 0
    assert main(["plug", "--model", str(path), "--adapter", str(adapter), "--out", str(tmp_path / "plugged2"),
                 *cpu]) == 0
    assert main(["eval", "--model", str(emu), "--adapter", str(adapter), "--tasks", task, "--limit", "6",
                 "--no-progress", "--out", str(tmp_path / "r.json"), *cpu]) == 0
    for api, cli in ((emu, "emu2"), (adapter, "ad2"), (plugged, "plugged2")):
        assert read_manifest(api)["artifact_id"] == read_manifest(tmp_path / cli)["artifact_id"], cli
    assert read_manifest(tmp_path / "plugged2")["run"]["device"] == "cpu"
    written = json.loads((tmp_path / "r.json").read_text())
    assert _scores(written) == _scores(scored)
    assert written["settings"]["device"] == "cpu" and written["settings"]["max_batch_tokens"] == 0
    capsys.readouterr()


def test_report_on_cpu_gives_the_default_report(saved_model, mc_task, tmp_path):
    path, _ = saved_model("llama", 4)
    task, _ = mc_task
    kwargs = dict(adapter_layers="1,1", method_settings={"uniform": {"emulator_layers": 1}}, log=lambda *a: None)
    measure = dict(limit=4, train_limit=8, finetune={"max_steps": 1, "batch_size": 4})
    cpu = run_report(str(path), [task], tmp_path / "cpu", Protocol(device="cpu", **measure), **kwargs)
    default = run_report(str(path), [task], tmp_path / "default", Protocol(**DEFAULT, **measure), **kwargs)
    assert cpu["methods"]["uniform"]["table"] == default["methods"]["uniform"]["table"]
    assert cpu["finetune"]["device"] == "cpu"


def test_demo_cli_on_cpu_gives_the_default_demo(tmp_path, monkeypatch, capsys):
    default = run_demo(tmp_path / "default", settings=TINY_DEMO, progress=False, **DEFAULT)
    monkeypatch.setattr("offsite.experiments.demo.pipeline.settings_for", lambda quick, seed=0: TINY_DEMO)
    assert main(["demo", "--world", "--workdir", str(tmp_path / "cpu"), "--quiet", "--device", "cpu"]) == 0
    cpu = json.loads((tmp_path / "cpu" / "results.json").read_text())
    assert cpu["accuracy"] == default["accuracy"] and cpu["device"] == "cpu"
    assert (tmp_path / "cpu" / "model" / "model.safetensors").read_bytes() == \
        (tmp_path / "default" / "model" / "model.safetensors").read_bytes()  # pretraining too
    capsys.readouterr()


def _commands(tmp_path) -> dict:
    # Inputs need not exist: the device is the first thing every command checks.
    m, out = str(tmp_path / "model"), str(tmp_path / "out")
    return {"emulate": ["emulate", "--model", m, "--out", out],
            "finetune": ["finetune", "--emulator", m, "--data", m, "--out", out],
            "plug": ["plug", "--model", m, "--adapter", m, "--out", out],
            "eval": ["eval", "--model", m, "--tasks", "arc_easy", "--data-dir", str(tmp_path), "--out",
                     str(tmp_path / "out" / "r.json")],
            "report": ["report", "--model", m, "--tasks", "arc_easy", "--data-dir", str(tmp_path), "--workdir", out],
            "demo": ["demo", "--workdir", out, "--quick"],
            "demo --prepare-only": ["demo", "--workdir", out, "--prepare-only"]}


@pytest.mark.parametrize("bad", BAD)
@pytest.mark.parametrize("command", ["emulate", "finetune", "plug", "eval", "report", "demo", "demo --prepare-only"])
def test_every_command_refuses_a_bad_device_first_in_one_line(command, bad, tmp_path, capsys):
    argv = _commands(tmp_path)[command] + ["--device", bad]
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"offsite {argv[0]}: error: device {bad!r} ")
    assert "choose --device from: auto, cpu" in lines[0]
    assert captured.out == "" and not (tmp_path / "out").exists()


def test_budget_rule_and_auto():
    assert plan_batches([10, 10, 8, 5, 5, 3], 2, 20) == [(0, 2), (2, 4), (4, 6)]
    assert plan_batches([50, 3, 3], 8, 20) == [(0, 1), (1, 3)]  # a row wider than the budget goes alone
    assert plan_batches([9, 9, 9, 9, 9], 2) == [(0, 2), (2, 4), (4, 5)]  # no budget: batch_size rows
    assert resolve_batch_tokens(None, "cpu") == 0 and resolve_batch_tokens(None, "cuda") == DEFAULT_CUDA_BATCH_TOKENS
    assert resolve_batch_tokens(64, "cpu") == 64
    with pytest.raises(OffsiteError, match="max_batch_tokens must be an integer >= 0"):
        resolve_batch_tokens(-1, "cpu")


def test_token_budget_scores_what_row_batches_score(tokenizer):
    model = make_model("llama", 2)
    examples = [{"context": " ".join(SENTENCES[i % 4].split()[:2 + 2 * i]), "choices": ["red", "blue sky", "the cat sat"],
                 "gold": i % 3, "id": i} for i in range(6)]
    shapes = []
    model.model.register_forward_pre_hook(  # the backbone: the head runs only where a token is scored
        lambda mod, args, kw: shapes.append(tuple(kw["input_ids"].shape)), with_kwargs=True)

    def run(budget):
        shapes.clear()
        out = score_multiple_choice(model, tokenizer, examples, batch_size=4, shared_context=False, progress=False,
                                    max_batch_tokens=budget)
        return out, list(shapes)

    rows, row_shapes = run(0)
    assert run(None)[0] == rows  # auto on the CPU is the row batching itself
    assert max(r for r, _ in row_shapes) == 4
    for budget in (1, 40, 10_000):
        got, got_shapes = run(budget)
        assert all(r * w <= budget or r == 1 for r, w in got_shapes), got_shapes
        assert [d["pred"] for d in got["details"]] == [d["pred"] for d in rows["details"]]
        assert [d["pred_norm"] for d in got["details"]] == [d["pred_norm"] for d in rows["details"]]
        for a, b in zip(got["details"], rows["details"]):
            assert a["loglik"] == pytest.approx(b["loglik"], abs=1e-5)
    assert len(run(10_000)[1]) == 1  # one batch holds all 18 rows


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("method", sorted(METHODS))
def test_gpu_emulate_runs_every_method_on_cuda(method, saved_model, text_file, tmp_path):
    path, _ = saved_model("llama", 4)
    gpu = _build(path, tmp_path / "gpu", method, str(text_file), device="cuda")
    assert read_manifest(gpu)["run"]["device"].startswith("cuda")
    emu, _, _ = load_for_eval(str(gpu), device="cuda")
    assert next(emu.parameters()).device.type == "cuda"
    if method == "uniform":  # a pure layer copy: the same bytes whichever device held them
        cpu = _build(path, tmp_path / "cpu", method, str(text_file), device="cpu")
        assert read_manifest(cpu)["artifact_id"] == read_manifest(gpu)["artifact_id"]


@pytest.mark.gpu
@needs_cuda
def test_gpu_finetune_plug_eval_and_budget_on_cuda(saved_model, text_file, mc_task, tmp_path):
    path, _ = saved_model("llama", 4)
    task, _ = mc_task
    emu = emulate(str(path), tmp_path / "emu", adapter_layers="1,1", emulator_layers=1, device="cpu")
    adapter = finetune(emu, text_file, tmp_path / "ad", max_steps=2, batch_size=2, block_size=16, progress=False,
                       device="cuda")
    assert json.loads((adapter / "settings.json").read_text())["device"].startswith("cuda")
    plugged = [plug(str(path), adapter, tmp_path / f"plugged-{d}", device=d) for d in ("cpu", "cuda")]
    assert read_manifest(plugged[0])["artifact_id"] == read_manifest(plugged[1])["artifact_id"]  # a copy is exact
    scores = {}
    for device, budget in (("cpu", 0), ("cuda", 0), ("cuda", None), ("cuda", 40)):
        model, tok, _ = load_for_eval(str(emu), adapter=str(adapter), device=device)
        assert next(model.parameters()).device.type == device
        scores[device, budget] = evaluate(model, tok, [task], None, limit=12, progress=False, keep_details=True,
                                          max_batch_tokens=budget)["details"][task]
    for key, details in scores.items():
        for a, b in zip(details, scores["cpu", 0]):
            assert a["loglik"] == pytest.approx(b["loglik"], abs=1e-4), key
