"""offsite audit: the data owner's attacks, their shared budget, the privacy margin, the CLI and its refusals."""

import json

import pytest
import torch

from offsite.experiments.audit import run_audit
from offsite.experiments.protocol import Protocol
from offsite.experiments.audit.attacks import ATTACKS, run_attack, stages
from offsite.cli import main
from offsite.workflows.emulate import emulate
from offsite.experiments.protocol import train_file
from offsite.families import get_layers
from offsite.workflows.finetune import finetune
from offsite.eval.loading import load_for_eval
from offsite.emulator.package import load_emulator

FT = {"max_steps": 4, "batch_size": 4, "lr": 1e-3}
PROTOCOL = Protocol(limit=12, train_limit=24, device="cpu", finetune=FT)
QUIET = dict(log=lambda *a: None)


@pytest.fixture
def world(saved_model, mc_task, tmp_path):
    """A 6-layer base, a compressing emulator of it (1+1 adapter layers, 2 of 4 middle layers), a task."""
    path, _ = saved_model("llama", 6)
    emu = emulate(str(path), tmp_path / "emu", adapter_layers="1,1", emulator_layers=2)
    return path, emu, mc_task[0]


def test_an_emulator_that_is_the_full_model_leaves_no_margin(saved_model, mc_task, tmp_path):
    path, _ = saved_model("llama", 6)
    whole = emulate(str(path), tmp_path / "emu", adapter_layers="1,1", emulator_layers=4, allow_verbatim_middle=True)
    task = mc_task[0]
    audit = run_audit(whole, str(path), [task], tmp_path / "audit", PROTOCOL, attacks=["adapter", "full"], **QUIET)
    res = audit["results"][task]
    honest, plug = res["attacks"]["adapter"]["metrics"], res["metrics"]["plug_in"]
    # The same weights scored two ways (emulator + adapter, full model + the same adapter): identical.
    assert (honest["acc"], honest["acc_norm"]) == (plug["acc"], plug["acc_norm"])
    assert res["attacks"]["adapter"]["gap_to_plug_in"] == 0.0
    assert res["margin"] <= 0.0


def test_audit_writes_every_attack_with_one_budget_and_the_worst_case_margin(world, text_file, tmp_path):
    path, emu, task = world
    audit = run_audit(emu, str(path), [task], tmp_path / "audit", PROTOCOL, public=text_file, **QUIET)
    for name in ("audit.json", "audit.md", "audit.png"):
        assert (tmp_path / "audit" / name).stat().st_size > 0, name
    written = json.loads((tmp_path / "audit" / "audit.json").read_text())
    res = written["results"][task]
    assert set(res["attacks"]) == set(ATTACKS)
    scores = {name: att["metrics"]["acc"] for name, att in res["attacks"].items()}
    assert all(0.0 <= s <= 1.0 for s in scores.values())
    plug = res["metrics"]["plug_in"]["acc"]
    assert res["margin"] == plug - max(scores.values())
    assert res["attacks"][res["best_attack"]]["metrics"]["acc"] == max(scores.values())
    # Same budget: every attack took exactly the honest run's optimizer steps, counted from its logs.
    steps = {name: sum(len(stage["log"]["train"]) for stage in att["stages"]) for name, att in res["attacks"].items()}
    assert steps == {name: FT["max_steps"] for name in ATTACKS}
    assert [s["stage"] for s in res["attacks"]["recovery"]["stages"]] == ["public", "task"]
    assert res["attacks"]["recovery"]["stages"][0]["data"] == str(text_file)
    assert res["attacks"]["full"]["trainable_parameters"] > res["attacks"]["adapter"]["trainable_parameters"]
    text = (tmp_path / "audit" / "audit.md").read_text()
    assert "Privacy margin" in text and "Plug-in" in text and "recovery" in text
    assert audit["results"][task]["margin"] == res["margin"]


def test_cli_runs_a_strong_audit_and_refuses_bad_inputs_in_one_line(world, text_file, tmp_path, capsys):
    path, emu, task = world
    work = tmp_path / "cli"
    base = ["audit", "--emulator", str(emu), "--model", str(path), "--tasks", task, "--workdir", str(work),
            "--public", str(text_file), "--limit", "8", "--max-steps", "1", "--batch-size", "4", "--device", "cpu"]
    assert main(base + ["--budget", "strong", "--attacks", "adapter,recovery"]) == 0
    res = json.loads((work / "audit.json").read_text())["results"][task]
    # Strong budget: 4x the honest steps for every attack; recovery splits them 2 public + 2 task.
    assert {n: a["steps"] for n, a in res["attacks"].items()} == {"adapter": 4, "recovery": 4}
    assert [s["steps"] for s in res["attacks"]["recovery"]["stages"]] == [2, 2]
    assert "Privacy margin" in capsys.readouterr().out
    bad = {"missing emulator": ["--emulator", str(tmp_path / "nope")],
           "unknown budget": ["--budget", "huge"],
           "workdir inside the emulator": ["--workdir", str(emu / "audit")],
           "unavailable device": ["--device", "cuda:7", "--workdir", str(tmp_path / "never")]}
    for what, change in bad.items():
        capsys.readouterr()
        assert main(base + change) == 2, what  # argparse keeps the last value of a repeated option
        err = capsys.readouterr().err.strip()
        assert err.startswith("offsite audit: error:") and "\n" not in err, (what, err)
    assert not (emu / "audit").exists() and not (tmp_path / "never").exists()


def test_full_emulator_ft_moves_the_middle_and_adapter_only_ft_does_not(world, tmp_path):
    path, emu, task = world
    data, fmt = train_file(task, None, tmp_path, 24)
    before = load_emulator(emu)
    layers = get_layers(before.model, before.family)
    middle = [i for i in range(len(layers)) if i not in before.adapter_positions]
    honest = finetune(emu, data, tmp_path / "adapter", format=fmt, device="cpu", progress=False, **FT)
    tuned, _, _ = load_for_eval(str(emu), adapter=str(honest), device="cpu")
    full = run_attack("full", emu, data, fmt, {**FT, "device": "cpu", "progress": False}).model
    lora = run_attack("lora", emu, data, fmt, {**FT, "device": "cpu", "progress": False}).model

    def changed(model, positions):
        now = get_layers(model, before.family)
        return [not all(torch.equal(a, b.to(a.dtype)) for a, b in
                        zip(layers[i].state_dict().values(), now[i].state_dict().values())) for i in positions]

    assert changed(tuned, before.adapter_positions) == [True, True]
    assert changed(tuned, middle) == [False] * len(middle)
    assert changed(full, middle) == [True] * len(middle)
    assert changed(lora, middle) == [True] * len(middle)  # LoRA reaches every layer, merged for scoring
    assert not torch.equal(full.get_input_embeddings().weight, before.model.get_input_embeddings().weight)


def test_budgets_count_steps_the_same_for_every_attack():
    for budget, factor in (("same", 1), ("strong", 4)):
        for name in ATTACKS:
            assert sum(n for _, n in stages(name, budget, 10)) == 10 * factor


def test_report_audit_adds_the_best_attack_as_a_sixth_row(saved_model, mc_task, text_file, tmp_path):
    from offsite.experiments.report import format_report, run_report

    path, _ = saved_model("llama", 6)
    task = mc_task[0]
    report = run_report(str(path), [task], tmp_path / "rep", PROTOCOL, adapter_layers="1,1",
                        method_settings={"uniform": {"emulator_layers": 2}}, audit=True, public=text_file,
                        log=lambda *a: None)
    res = report["methods"]["uniform"]
    assert res["best_attack"][task] in ATTACKS
    # Emu FT is attack (a), so the best attack is never below it.
    assert res["table"]["attack"][task] >= res["table"]["emu_ft"][task]
    assert "| Best attack |" in format_report(report)
