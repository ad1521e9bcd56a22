"""Every bad artifact is refused with one clear error, and failures leave nothing half-written."""

import json

import pytest
import torch
from safetensors.torch import save_file

from offsite.adapters.artifact import save_full_adapter
from offsite.artifacts import load_tensors, read_manifest, sha256_file, writing_artifact
from offsite.cli import main
from offsite.workflows.emulate import emulate
from offsite.core.errors import ArtifactError, OffsiteError
from offsite.eval.loading import load_for_eval
from offsite.emulator.package import load_emulator
from offsite.workflows.plug import plug
from offsite.workflows.verify import verify_artifact


@pytest.fixture
def emu_dir(saved_model, tmp_path):
    path, _ = saved_model("llama", 6)
    return path, emulate(str(path), tmp_path / "emu", emulator_layers=1)


def rewrite(folder, mutate, fix_manifest=True):
    """Mutate the tensors of ``folder/model.safetensors``; optionally re-sign the manifest so only
    deeper checks (shapes against the architecture, values) can catch it."""
    weights = folder / "model.safetensors"
    tensors = load_tensors(weights)
    mutate(tensors)
    save_file(tensors, str(weights), metadata={"format": "pt"})
    if fix_manifest:
        from offsite.artifacts import artifact_id

        m = json.loads((folder / "manifest.json").read_text())
        m["files"]["model.safetensors"] = sha256_file(weights)
        m["tensors"]["model.safetensors"] = {k: [str(v.dtype).replace("torch.", ""), list(v.shape)]
                                             for k, v in sorted(tensors.items())}
        m["artifact_id"] = artifact_id(m)
        (folder / "manifest.json").write_text(json.dumps(m))


def test_clean_package_verifies(emu_dir):
    assert verify_artifact(emu_dir[1])["kind"] == "emulator"
    assert main(["verify", str(emu_dir[1])]) == 0


def test_tampered_file_is_refused(emu_dir, capsys):
    weights = emu_dir[1] / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="sha256 .* does not match the manifest"):
        load_emulator(emu_dir[1])
    assert main(["verify", str(emu_dir[1])]) == 2
    assert "does not match the manifest" in capsys.readouterr().err


def test_wrong_shape_tensor_is_refused_even_with_a_consistent_manifest(emu_dir):
    def mutate(t):
        t["model.layers.0.mlp.up_proj.weight"] = torch.zeros(63, 32)

    rewrite(emu_dir[1], mutate)
    with pytest.raises(ArtifactError, match="'model.layers.0.mlp.up_proj.weight' has shape \\[63, 32\\], expected"):
        load_emulator(emu_dir[1])


def test_nan_is_refused(emu_dir):
    def mutate(t):
        t["model.layers.1.self_attn.q_proj.weight"][0, 0] = float("nan")

    rewrite(emu_dir[1], mutate)
    with pytest.raises(ArtifactError, match="NaN or infinite"):
        verify_artifact(emu_dir[1])
    with pytest.raises(ArtifactError, match="NaN or infinite"):
        load_emulator(emu_dir[1])


@pytest.mark.parametrize("change,message", [
    (lambda t: t.pop("model.norm.weight"), "missing 1 tensor"),
    (lambda t: t.update({"model.layers.9.extra": torch.zeros(2)}), "unexpected 1 tensor"),
])
def test_missing_or_extra_key_is_refused(emu_dir, change, message):
    rewrite(emu_dir[1], change)
    with pytest.raises(ArtifactError, match=message):
        load_emulator(emu_dir[1])


def test_manifest_edits_and_stray_files_are_refused(emu_dir):
    folder = emu_dir[1]
    (folder / "evil.pkl").write_bytes(b"\x80\x04")
    with pytest.raises(ArtifactError, match="not listed in the manifest.*evil.pkl"):
        load_emulator(folder)
    (folder / "evil.pkl").unlink()
    m = json.loads((folder / "manifest.json").read_text())
    m["files"]["config.json"] = "0" * 64
    (folder / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="manifest edited"):
        read_manifest(folder)
    (folder / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="no manifest.json"):
        load_emulator(folder)


def test_adapter_from_another_emulator_is_refused(saved_model, tmp_path):
    path, _ = saved_model("llama", 8)
    emu_a = load_emulator(emulate(str(path), tmp_path / "a", emulator_layers=1))
    emu_b = emulate(str(path), tmp_path / "b", emulator_layers=3)
    adapter = save_full_adapter(tmp_path / "adapter", emu_a, {}, {})
    with pytest.raises(ArtifactError, match="was trained on emulator .* not on this emulator"):
        load_for_eval(str(emu_b), adapter=str(adapter))
    load_for_eval(str(emu_a.path), adapter=str(adapter))  # its own emulator accepts it


def test_adapter_for_another_base_model_is_refused_and_nothing_is_written(saved_model, tmp_path):
    path_a, _ = saved_model("llama", 6, seed=0)
    path_b, _ = saved_model("llama", 6, seed=1)
    emu = load_emulator(emulate(str(path_a), tmp_path / "emu", emulator_layers=1))
    adapter = save_full_adapter(tmp_path / "adapter", emu, {}, {})
    out = tmp_path / "plugged"
    with pytest.raises(ArtifactError, match="trained for base model"):
        plug(str(path_b), adapter, out)
    assert not out.exists()
    assert not list(tmp_path.glob(".plugged.tmp-*"))
    assert main(["plug", "--model", str(path_b), "--adapter", str(adapter), "--out", str(out)]) == 2
    assert not out.exists()


def test_failed_write_leaves_no_folder(tmp_path):
    out = tmp_path / "x"
    with pytest.raises(RuntimeError):
        with writing_artifact(out, "adapter") as stage:
            (stage.path / "half.bin").write_bytes(b"1")
            raise RuntimeError("disk full")
    assert not out.exists() and not list(tmp_path.iterdir())


def test_existing_output_is_not_clobbered(emu_dir, saved_model):
    path, emu = emu_dir
    with pytest.raises(OffsiteError, match="already exists.*--overwrite"):
        emulate(str(path), emu, emulator_layers=0)
    assert load_emulator(emu).manifest["plan"]["emulator_layers"] == 1
    emulate(str(path), emu, emulator_layers=0, overwrite=True)
    assert load_emulator(emu).manifest["plan"]["emulator_layers"] == 0


def test_unknown_inputs_give_one_clear_error(tmp_path, capsys, saved_model):
    path, _ = saved_model("llama", 6)
    assert main(["emulate", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "cannot load model" in capsys.readouterr().err
    assert main(["emulate", "--model", str(path), "--adapter-layers", "4,4", "--out", str(tmp_path / "o")]) == 2
    assert "a+b must be at most 5" in capsys.readouterr().err
    assert main(["emulate", "--model", str(path), "--emulator-layers", "9", "--out", str(tmp_path / "o")]) == 2
    assert "between 0 and 2" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    with pytest.raises(SystemExit):
        main(["emulate", "--model", str(path), "--method", "magic", "--out", str(tmp_path / "o")])


def test_unsupported_architecture_folder_is_refused_before_loading_weights(tmp_path, capsys):
    from transformers import BertConfig

    BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
               intermediate_size=32).save_pretrained(tmp_path / "bert")
    assert main(["emulate", "--model", str(tmp_path / "bert"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "unsupported architecture model_type='bert'" in err and "gpt_neox" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("swap", ["artifact", "checkpoint"])
def test_files_reach_the_disk_before_the_rename(swap, tmp_path, monkeypatch):
    """A rename is atomic in the namespace only: without fsync first, a power loss can leave the
    renamed artifact (or the "good" checkpoint) with empty files. Every staged file and folder is
    flushed before the rename into place, and the parent after it."""
    import os

    from offsite.artifacts import folder as folder_mod
    from offsite.training import checkpoint as checkpoint_mod

    new = tmp_path / "staged"
    (new / "sub").mkdir(parents=True)
    for rel in ("a.safetensors", "manifest.json", "sub/b.json"):
        (new / rel).write_text(rel)
    out = tmp_path / "out"
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    if swap == "artifact":
        folder_mod._swap(new, out, "t")
    else:
        checkpoint_mod._swap(new, out)
    into = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2] == str(out))
    flushed = {e[1] for e in events[:into] if e[0] == "fsync"}
    for rel in ("a.safetensors", "manifest.json", "sub/b.json", "sub", "."):
        assert os.path.realpath(new / rel) in flushed, rel
    assert ("fsync", os.path.realpath(tmp_path)) in events[into:]
    assert sorted(p.name for p in out.rglob("*")) == ["a.safetensors", "b.json", "manifest.json", "sub"]
