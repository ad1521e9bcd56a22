"""Cases found by trying the CLI as a careless or hostile user; each once gave a traceback, a silent
acceptance, or lost a file."""

import json
import os

import pytest

from offsite.artifacts import artifact_id, read_manifest, sha256_file
from offsite.cli import main
from offsite.workflows.emulate import emulate
from offsite.core.errors import ArtifactError
from offsite.workflows.verify import verify_artifact


def resign(folder, edit):
    m = json.loads((folder / "manifest.json").read_text())
    edit(m)
    m["files"] = {rel: sha256_file(folder / rel) for rel in m["files"]}
    m["artifact_id"] = artifact_id(m)
    (folder / "manifest.json").write_text(json.dumps(m))


@pytest.fixture
def emu(saved_model, tmp_path):
    path, _ = saved_model("llama", 6)
    return path, emulate(str(path), tmp_path / "emu", emulator_layers=1)


@pytest.mark.parametrize("edit,message", [
    (lambda m: m["plan"].update(layers="xy"), "plan.layers must be"),
    (lambda m: m["plan"]["layers"].__setitem__(0, {"role": "adapter"}), "plan.layers must be"),
    (lambda m: m["plan"]["layers"].__setitem__(2, {"source": 99, "role": "emulator"}), "plan.layers must be"),
    (lambda m: m["plan"]["layers"].__setitem__(2, {"source": "2", "role": "emulator"}), "plan.layers must be"),
    (lambda m: m["plan"]["layers"].__setitem__(2, {"source": 2, "role": "weird"}), "plan.layers must be"),
    (lambda m: m["plan"].update(layers=[{"source": 0, "role": "adapter"}] * 5), "each adapter layer"),
    (lambda m: m["split"].update(middle="x"), "split.middle"),
    (lambda m: m.update(parameters={"full": "lots"}), "parameters must be"),
    (lambda m: m.update(parameters=[1, 2]), "parameters must be"),
    (lambda m: m.update(disclosure={"x": 1}), "disclosure must be"),
    (lambda m: m["disclosure"].update(fractions={"verbatim": "a"}), "disclosure must be"),
])
def test_nonsense_emulator_fields_are_refused_by_every_reader(emu, edit, message, capsys):
    _, folder = emu
    resign(folder, edit)
    with pytest.raises(ArtifactError, match=message):
        verify_artifact(folder)
    assert main(["inspect", str(folder)]) == 2
    assert message.split()[0] in capsys.readouterr().err


def test_a_broken_config_json_is_one_error(emu, capsys):
    _, folder = emu
    (folder / "config.json").write_text("{not json")
    resign(folder, lambda m: None)
    assert main(["verify", str(folder)]) == 2
    assert "config.json is not a usable model config" in capsys.readouterr().err


def test_a_stripped_manifest_does_not_skip_a_required_signature(emu, tmp_path, capsys, mc_file):
    _, folder = emu
    main(["keygen", str(tmp_path / "k")])
    (folder / "manifest.json").unlink()  # the package now looks like a stock HF model
    assert main(["eval", "--model", str(folder), "--tasks", str(mc_file), "--out", str(tmp_path / "r.json"),
                 "--trusted-key", str(tmp_path / "k.pub")]) == 2
    assert "carries no signature" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_eval_never_writes_over_its_task_file(emu, tmp_path, mc_file, capsys):
    _, folder = emu
    before = mc_file.read_bytes()
    assert main(["eval", "--model", str(folder), "--tasks", str(mc_file), "--out", str(mc_file)]) == 2
    assert "is (inside) the input" in capsys.readouterr().err
    assert mc_file.read_bytes() == before


def test_glob_characters_in_out_touch_no_other_leftovers(emu, tmp_path, monkeypatch):
    path, _ = emu
    work = tmp_path / "g"
    work.mkdir()
    for name in (".a.tmp-999999-deadbeef", ".b.old-999998-cafecafe", ".cache.tmp-2024-x"):
        (work / name).mkdir()
        (work / name / "f").write_text("keep")
    monkeypatch.chdir(work)
    assert main(["emulate", "--model", str(path), "--emulator-layers", "1", "--out", "?"]) == 0
    assert sorted(p.name for p in work.iterdir()) == [".a.tmp-999999-deadbeef", ".b.old-999998-cafecafe",
                                                      ".cache.tmp-2024-x", "?"]
    assert read_manifest(work / "?")["kind"] == "emulator"


def test_an_out_below_a_file_fails_before_any_work(emu, tmp_path, capsys, text_file):
    path, folder = emu
    (tmp_path / "afile").write_text("x")
    assert main(["emulate", "--model", str(path), "--out", str(tmp_path / "afile" / "o")]) == 2
    assert "afile is a file, not a folder" in capsys.readouterr().err
    assert main(["finetune", "--emulator", str(folder), "--data", str(text_file), "--out",
                 str(tmp_path / "afile" / "o"), "--max-steps", "1", "--block-size", "16"]) == 2
    assert "afile is a file, not a folder" in capsys.readouterr().err


def test_keygen_refuses_bad_names(tmp_path, capsys):
    assert main(["keygen", ""]) == 2
    assert "is empty" in capsys.readouterr().err
    (tmp_path / "afile").write_text("x")
    assert main(["keygen", str(tmp_path / "afile" / "k")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert not [p for p in os.listdir(tmp_path) if p != "afile"]


def test_finetune_never_deletes_what_sits_at_its_checkpoint_path(emu, tmp_path, text_file, monkeypatch, capsys):
    import shutil

    _, folder = emu
    monkeypatch.chdir(tmp_path)
    base = ["finetune", "--emulator", str(folder), "--data", str(text_file), "--max-steps", "2", "--block-size", "16",
            "--no-resume"]
    (tmp_path / "model.ckpt").write_text("precious")
    (tmp_path / "results.ckpt").mkdir()
    (tmp_path / "results.ckpt" / "notes.txt").write_text("keep")
    shutil.copytree(folder, tmp_path / "pkg.ckpt")
    for out in ("model", "results", "pkg"):
        assert main(base + ["--out", out]) == 2
        assert "not a fine-tuning checkpoint" in capsys.readouterr().err
    assert (tmp_path / "model.ckpt").read_text() == "precious"
    assert (tmp_path / "results.ckpt" / "notes.txt").read_text() == "keep"
    assert main(["finetune", "--emulator", str(tmp_path / "pkg.ckpt"), "--data", str(text_file), "--out", "pkg",
                 "--max-steps", "2", "--block-size", "16", "--no-resume"]) == 2
    assert "overlap the input" in capsys.readouterr().err
    verify_artifact(tmp_path / "pkg.ckpt")


@pytest.mark.parametrize("flag,value", [("--max-grad-norm", "-1"), ("--epochs", "-1"), ("--epochs", "nan"),
                                        ("--max-grad-norm", "nan"), ("--lora-alpha", "-1"),
                                        ("--warmup-steps", "-3"), ("--weight-decay", "-1")])
def test_finetune_settings_out_of_range_are_refused(emu, tmp_path, text_file, flag, value, capsys):
    _, folder = emu
    assert main(["finetune", "--emulator", str(folder), "--data", str(text_file), "--out", str(tmp_path / "o"),
                 "--block-size", "16", "--max-steps", "1", "--lora", flag, value]) == 2
    err = capsys.readouterr().err
    assert f"{flag[2:].replace('-', '_')} must be" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_an_adapter_from_a_bf16_emulator_plugs_into_the_fp32_checkpoint(saved_model, tmp_path, text_file):
    import torch
    from safetensors.torch import load_file

    from offsite.workflows.finetune import finetune
    from offsite.workflows.plug import plug

    path, _ = saved_model("llama", 6)
    other, _ = saved_model("llama", 6, seed=3)
    emu = emulate(str(path), tmp_path / "emu", emulator_layers=1, dtype="bfloat16")
    adapter = finetune(emu, text_file, tmp_path / "ad", max_steps=2, block_size=16, progress=False)
    plugged = plug(str(path), adapter, tmp_path / "plugged")  # the checkpoint's own dtype, float32
    weights = load_file(str(plugged / "model.safetensors"))
    for name, value in load_file(str(adapter / "adapter.safetensors")).items():
        assert value.dtype == torch.bfloat16 and weights[name].dtype == torch.float32
        assert torch.equal(weights[name], value.float())  # exact upcast
    with pytest.raises(ArtifactError, match="trained for base model"):
        plug(str(other), adapter, tmp_path / "p2")


@pytest.mark.parametrize("key", ["device", "overwrite", "model", "stream", "selection"])
def test_set_refuses_a_workflow_argument_in_one_line(key, saved_model, tmp_path, capsys):
    """``--set device=cpu`` once ended in a TypeError traceback (emulate() got the argument twice);
    the reserved names are the workflow's own arguments, read off its signature."""
    path, _ = saved_model("llama", 6)
    out = tmp_path / "emu"
    assert main(["emulate", "--model", str(path), "--out", str(out), "--set", f"{key}=cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "names an argument of the workflow, not a method setting" in err[0], err
    assert not out.exists()


@pytest.mark.parametrize("argv", [
    ["finetune", "--emulator", "E", "--data", "D", "--out", "O", "--max-steps", "0"],
    ["finetune", "--emulator", "E", "--data", "D", "--out", "O", "--max-steps", "-3"],
    ["federate", "--emulator", "E", "--data", "D", "--out", "O", "--local-steps", "0"],
    ["report", "--model", "M", "--tasks", "sciq", "--workdir", "W", "--max-steps", "0"],
    ["audit", "--emulator", "E", "--model", "M", "--tasks", "sciq", "--out", "O", "--max-steps", "0"],
])
def test_zero_steps_is_refused_before_any_work(argv, capsys):
    """``--max-steps 0`` once exited 0 and wrote the untouched layers as a trained adapter (``--epochs``
    <= 0 is refused by the settings check, test_finetune_settings_out_of_range_are_refused)."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and ("must be" in err or "expects" in err), err


def test_each_method_is_a_subcommand_with_only_its_own_settings(saved_model, tmp_path, capsys):
    """`offsite emulate gradot --help` lists GradOT's settings with their defaults and no other
    method's; `offsite emulate uniform ...` builds what the older `--method uniform` spelling builds."""
    with pytest.raises(SystemExit):
        main(["emulate", "gradot", "--help"])
    text = capsys.readouterr().out
    assert "--param-budget" in text and "(default: 4.0)" in text and "--emulator-layers" not in text
    assert "--harmonizer-rank" not in text and "--kd-weight" not in text
    path, _ = saved_model("llama", 6)
    common = ["--model", str(path), "--adapter-layers", "1,1", "--no-stream"]
    assert main(["emulate", "uniform", *common, "--emulator-layers", "2", "--out", str(tmp_path / "a")]) == 0
    assert main(["emulate", "--method", "uniform", *common, "--emulator-layers", "2", "--out", str(tmp_path / "b")]) == 0
    assert read_manifest(tmp_path / "a")["artifact_id"] == read_manifest(tmp_path / "b")["artifact_id"]
    capsys.readouterr()
    assert main(["emulate", "--method", "crash", "uniform", *common, "--out", str(tmp_path / "c")]) == 2
    assert main(["emulate", "--emulator-layers", "2", "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "give the method once" in err[0] and "--model is required" in err[1]
    with pytest.raises(SystemExit):  # another method's setting is not a flag of this one
        main(["emulate", "gradot", *common, "--emulator-layers", "2", "--out", str(tmp_path / "e")])
    assert not (tmp_path / "c").exists() and not (tmp_path / "e").exists()
