"""The trust boundary: manifests that cover themselves, signatures, and outputs that cannot destroy.

Each test is one case of the threat model (docs/threat-model.md) that older code got wrong.
"""

import errno
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from offsite.adapters.artifact import save_full_adapter
from offsite.artifacts import artifact_id, read_manifest, sha256_file, writing_artifact
from offsite.cli import main
from offsite.workflows.emulate import emulate
from offsite.core.errors import ArtifactError, OffsiteError
from offsite.model.identity import model_identity
from offsite.model.loading import load_model
from offsite.eval.loading import load_for_eval
from offsite.emulator.package import load_emulator
from offsite.workflows.plug import plug
from offsite.workflows.verify import verify_artifact


def resign(folder, edit=lambda m: None):
    """Edit a manifest, then recompute file hashes and artifact_id as a forger would."""
    path = folder / "manifest.json"
    m = json.loads(path.read_text())
    edit(m)
    for rel in list(m["files"]):
        if (folder / rel).is_file():
            m["files"][rel] = sha256_file(folder / rel)
    m["artifact_id"] = artifact_id(m)
    path.write_text(json.dumps(m))
    return m


@pytest.fixture
def built(saved_model, tmp_path):
    path, _ = saved_model("llama", 6)
    emu = emulate(str(path), tmp_path / "emu", emulator_layers=1)
    adapter = save_full_adapter(tmp_path / "adapter", load_emulator(emu), {}, {"seconds": 1.5})
    return path, emu, adapter


# --- a manifest that covers itself -----------------------------------------------------------------

def test_identity_covers_the_tensor_table_kind_and_plan(built):
    _, emu, _ = built
    m = json.loads((emu / "manifest.json").read_text())
    for edit in (lambda m: m["tensors"]["model.safetensors"].popitem(), lambda m: m["plan"].update(x=1),
                 lambda m: m["config"].update(emulator_layers=2), lambda m: m.update(method="distill"),
                 lambda m: m["disclosure"]["fractions"].update(verbatim=0.0)):
        edited = json.loads(json.dumps(m))
        edit(edited)
        (emu / "manifest.json").write_text(json.dumps(edited))
        with pytest.raises(ArtifactError, match="artifact_id does not match its content"):
            read_manifest(emu)
    (emu / "manifest.json").write_text(json.dumps(m))
    assert read_manifest(emu)["artifact_id"] == m["artifact_id"]


def test_a_bitwise_identical_rebuild_is_the_same_emulator_and_accepts_its_twins_adapter(built, tmp_path):
    path, emu, adapter = built
    twin = emulate(str(path), tmp_path / "twin", emulator_layers=1)
    assert read_manifest(twin)["artifact_id"] == read_manifest(emu)["artifact_id"]
    assert "seconds" in read_manifest(twin)["run"]  # timings kept, outside the identity
    assert "seconds" not in json.loads((twin / "settings.json").read_text())
    load_for_eval(str(twin), adapter=str(adapter))


@pytest.mark.parametrize("method,settings", [
    ("gradot", dict(seq_len=16, num_sequences=4, batch_size=2, param_budget=0.5)),
    ("distill", dict(steps=2, seq_len=16, num_sequences=8, batch_size=4, emulator_layers=1)),
    ("scaleot", dict(steps=2, seq_len=16, num_sequences=8, batch_size=4, harmonizer_rank=4, alpha=0.5, beta=0.5)),
])
def test_trained_and_calibrated_rebuilds_have_one_identity(saved_model, tmp_path, text_file, method, settings):
    """Their plans record build timings; those are run facts, outside the identity."""
    path, _ = saved_model("llama", 6)
    a, b = (emulate(str(path), tmp_path / name, method=method, calibration=text_file, **settings) for name in "ab")
    assert read_manifest(a)["artifact_id"] == read_manifest(b)["artifact_id"]
    assert read_manifest(a)["run"]["plan"]  # the timings are kept, as run facts


def test_relabelled_kind_and_missing_fields_are_refused(built, capsys):
    path, emu, adapter = built
    resign(adapter, lambda m: m.update(kind="plugged"))
    with pytest.raises(ArtifactError, match="'plugged' manifest needs the field 'adapter'"):
        verify_artifact(adapter)
    resign(adapter, lambda m: m.update(kind="weights"))
    assert main(["verify", str(adapter)]) == 2
    assert "kind 'weights' is not an offsite artifact kind" in capsys.readouterr().err
    resign(adapter, lambda m: (m.update(kind="adapter"), m.pop("split")))
    with pytest.raises(ArtifactError, match="needs the field 'split'"):
        verify_artifact(adapter)
    assert main(["plug", "--model", str(path), "--adapter", str(adapter), "--out", str(adapter.parent / "p")]) == 2
    assert "needs the field 'split'" in capsys.readouterr().err
    assert main(["inspect", str(adapter)]) == 2


@pytest.mark.parametrize("edit,message", [
    (lambda m: m["base"].update(num_layers="6"), "base.num_layers must be an integer"),
    (lambda m: m["split"].update(adapter=[0, 0, 9]), "split.adapter"),
    (lambda m: m["emulator"].update(artifact_id="x"), "emulator.artifact_id must be"),
    (lambda m: m["files"].update({"../outside.safetensors": "0" * 64}), "points outside the folder"),
    (lambda m: m["files"].update({"/etc/passwd": "0" * 64}), "points outside the folder"),
    (lambda m: m["tensors"].update({"../x.safetensors": {}}), "tensor table covers"),
    (lambda m: m["tensors"]["adapter.safetensors"].update(w=["float32", [-1]]), r"must be \[dtype"),
])
def test_malformed_fields_are_refused_before_use(built, edit, message):
    _, _, adapter = built
    resign(adapter, edit)
    with pytest.raises(ArtifactError, match=message):
        read_manifest(adapter)


def test_listed_pickle_files_and_symlinks_are_refused(built, tmp_path):
    _, emu, adapter = built
    (adapter / "extra.bin").write_bytes(b"\x80\x04K\x01.")
    resign(adapter, lambda m: m["files"].update({"extra.bin": "0" * 64}))
    with pytest.raises(ArtifactError, match="pickle-based weight format"):
        read_manifest(adapter)
    outside = tmp_path / "outside.json"
    shutil.copy(emu / "config.json", outside)
    (emu / "config.json").unlink()
    (emu / "config.json").symlink_to(outside)  # same bytes, so the hash alone would pass
    with pytest.raises(ArtifactError, match="'config.json' is a symbolic link"):
        verify_artifact(emu)


# --- a base fingerprint that covers every weight ---------------------------------------------------

def test_fingerprint_covers_every_value_and_ignores_the_loaded_dtype(saved_model):
    from offsite.model.fingerprint import weight_fingerprint

    path, model = saved_model("llama", 4, hidden_size=64, intermediate_size=256)
    before = model_identity(model, str(path))["weight_fingerprint"]
    weights = path / "model.safetensors"
    tensors = load_file(str(weights))
    # An entry the old strided 4096-value sample skipped (stride 4 over 16384 values).
    tensors["model.layers.1.mlp.up_proj.weight"][0, 1] = 0.0
    save_file(tensors, str(weights), metadata={"format": "pt"})
    assert model_identity(model, str(path))["weight_fingerprint"] != before  # taken from the files
    in_memory = weight_fingerprint(dict(model.state_dict()))
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 1] += 1.0
    assert weight_fingerprint(dict(model.state_dict())) != in_memory  # the fallback covers every value too
    as_bf16, _ = load_model(str(path), dtype="bfloat16")  # lossy for this fp32 checkpoint
    as_fp32, _ = load_model(str(path), dtype="float32")
    assert model_identity(as_bf16, str(path)) == model_identity(as_fp32, str(path))
    model.to(torch.bfloat16).save_pretrained(path)
    bf16_file = model_identity(as_bf16, str(path))
    assert bf16_file["weight_fingerprint"] != before
    assert weight_fingerprint(load_file(str(weights))) == bf16_file["weight_fingerprint"]


def test_fingerprint_cache_follows_the_weight_files(saved_model, monkeypatch):
    import offsite.model.fingerprint as fingerprint

    path, _ = saved_model("llama", 4)
    model, _ = load_model(str(path))
    first = model_identity(model, str(path))["weight_fingerprint"]
    monkeypatch.setattr(fingerprint, "files_fingerprint", lambda files: pytest.fail("cache not used"))
    assert model_identity(model, str(path))["weight_fingerprint"] == first
    monkeypatch.undo()
    weights = path / "model.safetensors"
    tensors = load_file(str(weights))
    tensors["model.layers.1.mlp.up_proj.weight"][0, 0] += 1.0
    save_file(tensors, str(weights), metadata={"format": "pt"})  # same size, new ctime
    assert model_identity(model, str(path))["weight_fingerprint"] != first


# --- signatures ------------------------------------------------------------------------------------

def test_signed_artifacts_verify_only_against_their_signers_key(built, tmp_path, capsys):
    path, _, _ = built
    assert main(["keygen", str(tmp_path / "keys" / "owner")]) == 0
    assert main(["keygen", str(tmp_path / "keys" / "other")]) == 0
    owner, other = tmp_path / "keys" / "owner", tmp_path / "keys" / "other"
    assert oct(os.stat(f"{owner}.key").st_mode & 0o777) == "0o600"
    assert main(["keygen", str(owner)]) == 2  # never overwrites a key
    out = tmp_path / "signed"
    assert main(["emulate", "--model", str(path), "--emulator-layers", "1", "--out", str(out),
                 "--sign-key", f"{owner}.key"]) == 0
    capsys.readouterr()
    assert main(["verify", str(out), "--trusted-key", f"{owner}.pub"]) == 0
    assert "(trusted:" in capsys.readouterr().out
    assert main(["verify", str(out), "--trusted-key", f"{other}.pub"]) == 2
    assert "not a trusted key" in capsys.readouterr().err
    assert main(["verify", str(out)]) == 0
    assert "no trusted key given" in capsys.readouterr().out
    load_emulator(out, trusted_keys=[f"{owner}.pub"])
    with pytest.raises(ArtifactError, match="not a trusted key"):
        load_emulator(out, trusted_keys=[f"{other}.pub"])


def test_unsigned_is_allowed_but_never_trusted(built, tmp_path, capsys):
    _, emu, _ = built
    main(["keygen", str(tmp_path / "k")])
    assert main(["verify", str(emu)]) == 0
    assert "unsigned" in capsys.readouterr().out
    assert main(["verify", str(emu), "--trusted-key", str(tmp_path / "k.pub")]) == 2
    assert "is unsigned, but a trusted key was required" in capsys.readouterr().err


def test_a_forged_or_transplanted_signature_is_refused(built, tmp_path):
    path, _, _ = built
    main(["keygen", str(tmp_path / "k")])
    a = emulate(str(path), tmp_path / "a", emulator_layers=1, sign_key=tmp_path / "k.key")
    b = emulate(str(path), tmp_path / "b", emulator_layers=0)
    sig = read_manifest(a)["signature"]
    resign(b, lambda m: m.update(signature=sig))  # a real signature, on other content
    with pytest.raises(ArtifactError, match="signature does not match"):
        read_manifest(b)
    resign(a, lambda m: m["plan"].update(note="edited"))  # content edited, id recomputed, old signature
    with pytest.raises(ArtifactError, match="signature does not match"):
        verify_artifact(a)


def test_a_bad_signing_key_fails_before_any_work(built, tmp_path, capsys):
    path, _, _ = built
    (tmp_path / "junk.key").write_text("not a key")
    assert main(["emulate", "--model", str(path), "--out", str(tmp_path / "o"), "--sign-key",
                 str(tmp_path / "junk.key")]) == 2
    assert "not an unencrypted PEM private key" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# --- commands that cannot destroy ------------------------------------------------------------------

def test_overwrite_never_deletes_the_current_folder_or_an_input(built, tmp_path, monkeypatch, capsys):
    path, emu, adapter = built
    files = sorted(p.name for p in path.iterdir())
    monkeypatch.chdir(path)
    assert main(["emulate", "--model", ".", "--out", ".", "--overwrite"]) == 2
    assert "is (inside) the input" in capsys.readouterr().err
    assert main(["emulate", "--model", str(path), "--out", ".", "--overwrite"]) == 2
    assert sorted(p.name for p in path.iterdir()) == files
    monkeypatch.chdir(tmp_path)
    for out in (path, path / "sub", tmp_path):
        with pytest.raises(OffsiteError, match="input"):
            emulate(str(path), out, emulator_layers=1, overwrite=True)
    with pytest.raises(OffsiteError, match="input"):
        plug(str(path), adapter, adapter, overwrite=True)
    assert sorted(p.name for p in path.iterdir()) == files
    verify_artifact(emu)
    verify_artifact(adapter)


def test_overwrite_replaces_only_an_artifact_of_the_same_kind(built, tmp_path):
    path, emu, adapter = built
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "thesis.txt").write_text("years of work")
    with pytest.raises(OffsiteError, match="not an offsite artifact"):
        emulate(str(path), notes, emulator_layers=1, overwrite=True)
    with pytest.raises(OffsiteError, match="is a 'adapter' artifact"):
        emulate(str(path), adapter, emulator_layers=1, overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OffsiteError, match="is a file"):
        emulate(str(path), tmp_path / "file", emulator_layers=1)
    (tmp_path / "link").symlink_to(notes)
    with pytest.raises(OffsiteError, match="symbolic link"):
        emulate(str(path), tmp_path / "link", emulator_layers=1, overwrite=True)
    assert (notes / "thesis.txt").read_text() == "years of work"
    emulate(str(path), emu, emulator_layers=0, overwrite=True)
    assert read_manifest(emu)["plan"]["emulator_layers"] == 0


def test_a_failed_swap_keeps_the_old_artifact(built, monkeypatch):
    import offsite.artifacts.folder as folder

    path, emu, _ = built
    old_id = read_manifest(emu)["artifact_id"]
    real, calls = os.replace, []

    def flaky(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # the new folder's move into place
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(folder.os, "replace", flaky)
    with pytest.raises(KeyboardInterrupt):
        emulate(str(path), emu, emulator_layers=0, overwrite=True)
    monkeypatch.undo()
    assert read_manifest(emu)["artifact_id"] == old_id
    assert not [p for p in emu.parent.iterdir() if p.name.startswith(".emu.")]


def test_leftovers_of_killed_runs_are_cleaned_or_restored(built, capsys):
    path, emu, _ = built
    old_id = read_manifest(emu)["artifact_id"]
    dead = 2 ** 22 + 12345  # above Linux's pid_max: no such process
    os.replace(emu, emu.parent / f".emu.old-{dead}-abcd1234")  # killed between the two renames
    (emu.parent / f".emu.tmp-{dead}-ffff0000").mkdir()  # killed while filling
    with pytest.raises(OffsiteError, match="already exists"):
        emulate(str(path), emu, emulator_layers=0)  # the restored artifact is not clobbered
    assert "restored" in capsys.readouterr().out
    assert read_manifest(emu)["artifact_id"] == old_id
    assert not [p for p in emu.parent.iterdir() if p.name.startswith(".emu.")]


def test_a_full_disk_is_one_clear_error_and_writes_nothing(tmp_path, monkeypatch):
    import offsite.artifacts.folder as folder

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", "x")

    monkeypatch.setattr(folder, "sha256_file", full)
    out = tmp_path / "a"
    with pytest.raises(OffsiteError, match="no space left on device.*nothing was written"):
        with writing_artifact(out, "adapter") as stage:
            (stage.path / "w.safetensors").write_bytes(b"1")
    assert not out.exists() and not list(tmp_path.iterdir())


def test_finetune_and_plug_never_write_over_their_inputs(built, tmp_path, text_file):
    from offsite.workflows.finetune import finetune

    path, emu, adapter = built
    for out in (emu, emu / "inner", text_file):
        with pytest.raises(OffsiteError, match="input|is a file"):
            finetune(emu, text_file, out, overwrite=True, max_steps=1, block_size=16, progress=False)
    with pytest.raises(OffsiteError, match="input"):
        plug(str(path), adapter, adapter / "plugged", overwrite=True)
    verify_artifact(emu)
    verify_artifact(adapter)


def test_plug_against_its_emulator_catches_a_forged_split(saved_model, tmp_path):
    """A data owner that also rewrites the split passes every check of the adapter alone; the
    emulator package the model owner kept does not lie."""
    from safetensors.torch import load_file, save_file

    path, _ = saved_model("llama", 6)
    emu = emulate(str(path), tmp_path / "emu", emulator_layers=1)
    adapter = save_full_adapter(tmp_path / "adapter", load_emulator(emu), {}, {})
    weights = adapter / "adapter.safetensors"
    tensors = {k.replace("layers.4.", "layers.3."): v for k, v in load_file(str(weights)).items()}
    save_file(tensors, str(weights), metadata={"format": "pt"})

    def forge(m):
        m["split"] = {"num_layers": 6, "adapter": [0, 1, 3, 5], "middle": [2, 4]}
        m["tensors"]["adapter.safetensors"] = {k: [str(v.dtype).replace("torch.", ""), list(v.shape)]
                                               for k, v in sorted(tensors.items())}

    resign(adapter, forge)
    with pytest.raises(ArtifactError, match=r"claims adapter layers \[0, 1, 3, 5\].*has adapter layers \[0, 1, 4, 5\]"):
        plug(str(path), adapter, tmp_path / "plugged", emulator=emu)
    assert not (tmp_path / "plugged").exists()
    assert main(["plug", "--model", str(path), "--adapter", str(adapter), "--emulator", str(emu),
                 "--out", str(tmp_path / "plugged")]) == 2


def test_a_base_model_with_a_nan_is_refused_before_anything_is_written(saved_model, tmp_path, capsys):
    path, model = saved_model("llama", 6)
    with torch.no_grad():
        model.model.layers[2].self_attn.q_proj.weight[0, 0] = float("nan")
    model.save_pretrained(path)
    assert main(["emulate", "--model", str(path), "--emulator-layers", "1", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "base model" in err and "model.layers.2.self_attn.q_proj.weight" in err and "NaN" in err
    assert not (tmp_path / "o").exists()
