"""The privacy guard at the source: what of the middle leaves, and refusing packages that ship it whole."""

import json

import pytest

from offsite.cli import main
from offsite.emulator.disclosure import KINDS, format_fractions, guard_middle, verbatim_problems
from offsite.workflows.emulate import emulate
from offsite.emulator import get_builder
from offsite.core.errors import OffsiteError
from offsite.families import get_family, get_layers

CALIBRATION = dict(seq_len=16, num_sequences=4, batch_size=2)


def manifest(folder) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def layer_size(model) -> int:
    """Parameters of one decoder layer (all layers of the tiny configs have the same size)."""
    return sum(p.numel() for p in get_layers(model, get_family(model))[0].parameters())


def test_uniform_keeping_the_whole_middle_is_refused_and_nothing_is_written(saved_model, tmp_path):
    path, _ = saved_model("llama", 8)
    out = tmp_path / "emu"
    with pytest.raises(OffsiteError) as caught:
        emulate(str(path), out, adapter_layers="2,2", emulator_layers=4)
    message = str(caught.value)
    assert "whole middle of the base model verbatim (layers 2, 3, 4, 5" in message
    assert "Nothing was written" in message and "allow_verbatim_middle=True" in message
    assert "--allow-verbatim-middle" in message
    assert not out.exists()


def test_the_flag_writes_it_and_the_manifest_says_verbatim(saved_model, tmp_path):
    path, model = saved_model("llama", 8)
    out = emulate(str(path), tmp_path / "emu", adapter_layers="2,2", emulator_layers=4, allow_verbatim_middle=True)
    disclosure = manifest(out)["disclosure"]
    assert disclosure["fractions"] == {k: float(k == "verbatim") for k in KINDS}
    assert disclosure["middle_parameters"] == 4 * layer_size(model)
    assert [r["disposition"] for r in disclosure["layers"]] == ["verbatim"] * 4
    assert disclosure["overridden"] and "whole middle" in disclosure["overridden"][0]
    assert json.loads((out / "settings.json").read_text())["allow_verbatim_middle"] is True


def test_all_layers_as_adapter_is_refused_unless_allowed(saved_model, tmp_path):
    path, _ = saved_model("llama", 4)
    with pytest.raises(OffsiteError, match="no middle layers .*adapter_layers='all'.*allow_verbatim_middle"):
        emulate(str(path), tmp_path / "emu", adapter_layers="all")
    assert not (tmp_path / "emu").exists()
    out = emulate(str(path), tmp_path / "emu", adapter_layers="all", allow_verbatim_middle=True)
    disclosure = manifest(out)["disclosure"]
    assert disclosure["middle_parameters"] == 0 and disclosure["layers"] == []
    assert disclosure["fractions"]["verbatim"] == 1.0


def test_uniform_two_of_four_leaves_half_verbatim_half_not_at_all(saved_model, tmp_path):
    path, model = saved_model("llama", 8)
    disclosure = manifest(emulate(str(path), tmp_path / "emu", adapter_layers="2,2", emulator_layers=2))["disclosure"]
    assert disclosure["fractions"]["verbatim"] == 0.5 and disclosure["fractions"]["not_shipped"] == 0.5
    assert disclosure["parameters"]["verbatim"] == 2 * layer_size(model)
    rows = {r["layer"]: (r["disposition"], r["positions"]) for r in disclosure["layers"]}
    assert rows == {2: ("verbatim", [2]), 3: ("not_shipped", []), 4: ("not_shipped", []), 5: ("verbatim", [3])}
    assert disclosure["overridden"] == []


def test_gradot_leaves_low_rank_and_pruned_and_no_linear_verbatim(saved_model, tmp_path, text_file):
    path, model = saved_model("llama", 5)
    out = emulate(str(path), tmp_path / "emu", method="gradot", adapter_layers="1,1", calibration=text_file,
                  param_budget=0.3, **CALIBRATION)
    disclosure = manifest(out)["disclosure"]
    counts = disclosure["parameters"]
    assert counts["low_rank"] > 0 and counts["pruned"] > 0
    assert counts["not_shipped"] == 0 and counts["modified"] == 0
    # only the layer norms (2 x hidden per layer, no biases in Llama) leave unchanged; no linear does
    assert counts["verbatim"] == 3 * 2 * model.config.hidden_size
    assert all(r["disposition"] == "pruned+low_rank+verbatim" for r in disclosure["layers"])


def test_crash_sharing_counts_a_repeated_layer_once(saved_model, tmp_path, text_file):
    path, model = saved_model("llama", 8)
    out = emulate(str(path), tmp_path / "emu", method="crash", adapter_layers="2,2", calibration=text_file,
                  emulator_layers=2, share=True, **CALIBRATION)
    m = manifest(out)
    disclosure, reps = m["disclosure"], m["plan"]["representatives"]
    assert len(m["plan"]["layers"]) == 8  # depth restored: some representative fills two positions
    assert disclosure["parameters"]["verbatim"] == 2 * layer_size(model)
    assert disclosure["fractions"]["verbatim"] == 0.5 and disclosure["fractions"]["not_shipped"] == 0.5
    repeated = [r for r in disclosure["layers"] if len(r["positions"]) > 1]
    assert repeated and all(r["layer"] in reps and r["disposition"] == "verbatim" for r in repeated)


def test_distilled_layers_leave_modified(saved_model, tmp_path, text_file):
    path, _ = saved_model("llama", 6)
    out = emulate(str(path), tmp_path / "emu", method="distill", calibration=text_file, emulator_layers=1,
                  steps=1, lr=1e-2, **CALIBRATION)
    disclosure = manifest(out)["disclosure"]
    assert disclosure["fractions"]["modified"] == 0.5 and disclosure["fractions"]["not_shipped"] == 0.5


def handmade(dispositions: list) -> dict:
    rows = [{"layer": i + 2, "disposition": d, "parameters": 10, "by_kind": {d: 10}, "positions": []}
            for i, d in enumerate(dispositions)]
    counts = {k: 10 * dispositions.count(k) for k in KINDS}
    return {"middle_parameters": 10 * len(rows), "parameters": counts, "layers": rows,
            "fractions": {k: v / (10 * len(rows)) for k, v in counts.items()}}


def test_a_compressing_method_with_a_kept_layer_unchanged_is_refused():
    gradot, uniform = get_builder("gradot"), get_builder("uniform")
    partly = handmade(["pruned+low_rank+verbatim", "verbatim"])
    with pytest.raises(OffsiteError, match=r"'gradot' promises to compress every middle layer it keeps, but "
                                           r"middle layer\(s\) 3 would leave verbatim"):
        guard_middle(partly, gradot, gradot.make_config())
    assert guard_middle(partly, uniform, uniform.make_config()) == []  # uniform promises nothing
    assert guard_middle(partly, gradot, gradot.make_config(), allow=True)  # allowed, and reported
    assert verbatim_problems(handmade(["verbatim", "not_shipped"]), "gradot", True)
    assert verbatim_problems(handmade(["modified", "not_shipped"]), "gradot", True) == []


def test_scaleot_promise_depends_on_beta(saved_model, tmp_path, text_file):
    """beta = 0.01 rounds every rank back to full: SRC does nothing, which ScaleOT promised it would."""
    path, _ = saved_model("llama", 8)
    settings = dict(method="scaleot", adapter_layers="2,2", calibration=text_file, alpha=0.5, steps=1,
                    harmonizer_rank=4, **CALIBRATION)
    with pytest.raises(OffsiteError, match="'scaleot' promises to compress every middle layer it keeps"):
        emulate(str(path), tmp_path / "a", beta=0.01, **settings)
    disclosure = manifest(emulate(str(path), tmp_path / "b", beta=0.0, **settings))["disclosure"]
    assert disclosure["fractions"]["verbatim"] == 0.5 and disclosure["fractions"]["not_shipped"] == 0.5


def test_cli_flag_and_inspect_line(saved_model, tmp_path, capsys):
    path, _ = saved_model("llama", 8)
    argv = ["emulate", "--model", str(path), "--adapter-layers", "2,2", "--emulator-layers", "4",
            "--out", str(tmp_path / "emu")]
    assert main(argv) == 2
    assert "--allow-verbatim-middle" in capsys.readouterr().err
    assert not (tmp_path / "emu").exists()
    assert main(argv + ["--allow-verbatim-middle"]) == 0
    assert main(["emulate", "--model", str(path), "--adapter-layers", "2,2", "--emulator-layers", "2",
                 "--out", str(tmp_path / "half")]) == 0
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "half")]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("middle leaves"))
    assert line == "middle leaves        verbatim 50.0%, low rank 0%, pruned 0%, modified 0%, not shipped 50.0%"
    assert format_fractions({"verbatim": 0.0001}).startswith("verbatim <0.1%, low rank 0%")
