"""offsite frontier: the sweep, the choice under a target, a target nobody meets, reuse of calibration work,
the CLI and its refusals."""

import json

import pytest

from offsite.cli import main
from offsite.core.errors import OffsiteError
from offsite.experiments.frontier import run_frontier, sweep_points
from offsite.experiments.protocol import Protocol
from offsite.emulator.package import load_emulator

FT = {"max_steps": 3, "batch_size": 4, "lr": 1e-3}
PROTOCOL = Protocol(limit=12, train_limit=24, device="cpu", finetune=FT)
QUIET = dict(log=lambda *a: None, adapter_layers="1,1")


@pytest.fixture
def base(saved_model, mc_task):
    path, _ = saved_model("llama", 6)
    return str(path), mc_task[0]


def test_frontier_keeps_the_best_plug_in_that_meets_the_target(base, tmp_path):
    model, task = base
    record = run_frontier(model, "uniform", task, tmp_path / "work", tmp_path / "chosen", PROTOCOL,
                          values=[1, 2, 3], min_delta=-100, **QUIET)
    points = record["points"]
    assert [p["settings"] for p in points] == [{"emulator_layers": k} for k in (1, 2, 3)]
    assert all(p["meets"] for p in points)  # Δ >= -100 points: everyone
    best = max(p["plug_in"] for p in points)
    chosen = points[record["chosen"]]
    assert chosen["plug_in"] == best
    # ties in plug-in go to the smaller emulator
    tied = [p["parameters"]["emulator"] for p in points if p["plug_in"] == best]
    assert chosen["parameters"]["emulator"] == min(tied)
    for row in points:
        assert row["delta"] == pytest.approx(row["plug_in"] - row["emu_ft"])
    for name in ("frontier.json", "frontier.md", "frontier.png"):
        assert (tmp_path / "work" / name).stat().st_size > 0
    emu = load_emulator(tmp_path / "chosen")
    assert emu.manifest["config"]["emulator_layers"] == chosen["settings"]["emulator_layers"]
    selection = emu.manifest["selection"]
    assert selection["chosen"] == record["chosen"] and len(selection["points"]) == 3
    assert selection["frontier"]["target"] == {"max_emulator_score": None, "min_delta": -100}
    # a tighter target leaves only the points below it
    record = run_frontier(model, "uniform", task, tmp_path / "work2", tmp_path / "chosen2", PROTOCOL,
                          values=[1, 2, 3], max_emulator_score=100 * min(p["emu_ft"] for p in points), **QUIET)
    assert all(p["meets"] == (p["emu_ft"] <= min(q["emu_ft"] for q in points)) for p in record["points"])


def test_a_target_nobody_meets_says_so_and_writes_no_emulator(base, tmp_path, capsys):
    model, task = base
    with pytest.raises(OffsiteError, match="no point of the sweep meets the target --min-delta 101"):
        run_frontier(model, "uniform", task, tmp_path / "work", tmp_path / "chosen", PROTOCOL, values=[1, 3],
                     min_delta=101, **QUIET)
    assert not (tmp_path / "chosen").exists()
    record = json.loads((tmp_path / "work" / "frontier.json").read_text())
    assert record["chosen"] is None and not any(p["meets"] for p in record["points"])
    assert "No point meets the target" in (tmp_path / "work" / "frontier.md").read_text()
    code = main(["--quiet", "frontier", "--model", model, "--method", "uniform", "--tasks", task,
                 "--adapter-layers", "1,1", "--values", "2", "--max-emulator-score", "-1", "--max-steps", "2",
                 "--batch-size", "4", "--limit", "8", "--train-limit", "16", "--workdir", str(tmp_path / "w3"),
                 "--out", str(tmp_path / "c3"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "no point of the sweep meets the target --max-emulator-score -1" in err
    assert "Traceback" not in err and not (tmp_path / "c3").exists()


def test_gradot_points_share_one_calibration_sweep(base, text_file, tmp_path, monkeypatch):
    import offsite.emulator.methods.gradot as gradot

    model, task = base
    calls = []
    for name in ("capture_boundaries", "capture_boundaries_layerwise"):  # in memory or streamed (the default)
        real = getattr(gradot, name)
        monkeypatch.setattr(gradot, name, lambda *a, real=real, **k: calls.append(1) or real(*a, **k))
    record = run_frontier(model, "gradot", task, tmp_path / "work", tmp_path / "chosen", PROTOCOL,
                          values=[0.3, 0.6], lambdas=[0.0, 4.0],
                          fixed={"seq_len": 16, "num_sequences": 4, "batch_size": 2},
                          calibration=text_file, min_delta=-100, **QUIET)
    assert len(record["points"]) == 4 and len(calls) == 1  # four builds (+ the rebuild), one sweep
    plans = [json.loads((tmp_path / "work" / f"point-{i}" / "manifest.json").read_text())["plan"] for i in range(4)]
    assert plans[0]["mlp"] != plans[1]["mlp"]  # λ changed the selection at the same size
    assert all(p["calibration"]["cache_dir"] == str(tmp_path / "work" / "cache") for p in plans)


def test_an_audited_frontier_judges_by_the_strongest_attack(base, text_file, tmp_path):
    model, task = base
    record = run_frontier(model, "uniform", task, tmp_path / "work", tmp_path / "chosen", PROTOCOL, values=[2],
                          min_delta=-100, audit=True, public=text_file, **QUIET)
    row = record["points"][0]
    assert row["attack"] in ("adapter", "full", "lora", "recovery")
    assert row["emulator_side"] >= row["emu_ft"]  # the worst case is never better for the owner than emu FT
    assert row["delta"] == pytest.approx(row["plug_in"] - row["emulator_side"])


def test_refusals_come_before_any_output(base, tmp_path):
    model, task = base
    work, out = tmp_path / "work", tmp_path / "chosen"

    def run(**kw):
        args = dict(values=[1, 2], min_delta=0)
        args.update(kw)
        return run_frontier(model, kw.pop("method", "uniform"), kw.pop("task", task), work, out, PROTOCOL,
                            **{k: v for k, v in args.items() if k not in ("method", "task")}, **QUIET)

    with pytest.raises(OffsiteError, match="give exactly one target"):
        run(max_emulator_score=50)
    with pytest.raises(OffsiteError, match="give exactly one target"):
        run(min_delta=None)
    with pytest.raises(OffsiteError, match="for perplexity give --min-delta"):
        run(task="wikitext", min_delta=None, max_emulator_score=30)
    with pytest.raises(OffsiteError, match="chooses for one task; got 2"):
        run(task="arc_easy,piqa")
    with pytest.raises(OffsiteError, match="emulator_layers is what the frontier sweeps"):
        run(fixed={"emulator_layers": 2})
    with pytest.raises(OffsiteError, match="λ values are a GradOT setting"):
        run(lambdas=[1.0])
    with pytest.raises(OffsiteError, match="method 'uniform'.*emulator_layers"):
        run(values=[2, 9])  # 9 of 4 middle layers: refused before the first point
    with pytest.raises(OffsiteError, match="gradot param_budget must be a number in"):
        run(method="gradot", values=[0.5, 1.5])
    assert not work.exists() and not out.exists()
    assert sweep_points("uniform", 8) == [{"emulator_layers": k} for k in (2, 4, 6)]
    assert sweep_points("scaleot", 4) == [{"alpha": a} for a in (0.75, 0.5, 0.25)]
