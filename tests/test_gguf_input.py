"""``.gguf`` files as model inputs: dequantised loading, identity, emulate/plug/eval, refusals."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from conftest import artifact_tensors, make_model, state_equal

pytest.importorskip("gguf", reason="the gguf package is not installed (pip install 'offsite[gguf]')")

from fixtures.tiny_gguf import write_tiny_gguf  # noqa: E402

from offsite.artifacts import read_manifest, sha256_file, unique_state_dict  # noqa: E402
from offsite.core.errors import OffsiteError  # noqa: E402
from offsite.model.gguf_input import convert_gguf, gguf_source, is_gguf  # noqa: E402
from offsite.model.identity import model_identity, same_base  # noqa: E402
from offsite.model.fingerprint import weight_fingerprint  # noqa: E402
from offsite.model.loading import load_config, load_model  # noqa: E402


@pytest.fixture
def tiny_gguf(tmp_path, tokenizer):
    """Factory: ``(path of a GGUF file, the HF model written into it)``."""

    def build(quant=None, layers=6, name="tiny.gguf", **overrides):
        model = make_model("llama", layers, **overrides)
        path = tmp_path / name
        write_tiny_gguf(model, tokenizer, path, quant)
        return path, model

    return build


def test_gguf_loads_dequantised_as_a_plain_model(tiny_gguf):
    path, original = tiny_gguf()
    model, tok = load_model(str(path))
    assert state_equal(model.state_dict(), original.state_dict())  # F32 tensors: exact
    assert getattr(model.config, "quantization_config", None) is None
    assert getattr(model, "hf_quantizer", None) is None and not getattr(model, "is_quantized", False)
    assert model.dtype == torch.float32 and tok is not None
    assert tok("the cat sat").input_ids == tok("the cat sat").input_ids and len(tok("the cat sat").input_ids) > 0
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    assert torch.equal(model(ids).logits, original(ids).logits)
    assert load_config(str(path)).num_hidden_layers == 6 and is_gguf(str(path)) and not is_gguf("org/model")


def test_quantized_gguf_identity_is_over_the_fp32_values(tiny_gguf):
    path, original = tiny_gguf("Q8_0")
    model, _ = load_model(str(path))
    diff = max((model.state_dict()[k] - v).abs().max().item() for k, v in original.state_dict().items())
    assert 0 < diff < 1e-2  # dequantised Q8_0, close to what was written
    identity = model_identity(model, str(path))
    assert identity["weight_fingerprint"] == weight_fingerprint(unique_state_dict(model))
    source = identity["source"]
    assert source["sha256"] == sha256_file(path) and source["bytes"] == path.stat().st_size
    assert source["file_type"] == "MOSTLY_Q8_0" and source["tensor_types"]["Q8_0"] > 0
    assert gguf_source(path) == source
    bf16, _ = load_model(str(path), dtype="bfloat16")
    assert bf16.dtype == torch.bfloat16
    assert model_identity(bf16, str(path))["weight_fingerprint"] == identity["weight_fingerprint"]


def test_gguf_and_its_conversion_give_the_same_emulator(tiny_gguf, tmp_path):
    from offsite.workflows.emulate import emulate
    from offsite.workflows.finetune import finetune
    from offsite.workflows.plug import plug

    path, _ = tiny_gguf("Q8_0")
    folder = convert_gguf(path, tmp_path / "converted")
    from_gguf = emulate(str(path), tmp_path / "emu-gguf", adapter_layers="1,1", emulator_layers=2)
    from_folder = emulate(str(folder), tmp_path / "emu-folder", adapter_layers="1,1", emulator_layers=2)
    assert state_equal(artifact_tensors(from_gguf), artifact_tensors(from_folder))
    m_gguf, m_folder = read_manifest(from_gguf), read_manifest(from_folder)
    assert same_base(m_gguf["base"], m_folder["base"])
    assert m_gguf["base"]["source"]["sha256"] == sha256_file(path) and "source" not in m_folder["base"]
    assert "quantization_config" not in json.loads((from_gguf / "config.json").read_text())
    # an adapter trained against the folder's emulator plugs into the .gguf (the same base model)
    rows = [{"prompt": f"q{i}", "completion": " a"} for i in range(8)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    adapter = finetune(from_folder, data, tmp_path / "adapter", format="prompt", max_steps=1, batch_size=2,
                       progress=False, device="cpu")
    plugged = plug(str(path), adapter, tmp_path / "plugged", device="cpu")
    assert "quantization_config" not in json.loads((plugged / "config.json").read_text())
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(plugged))  # stock transformers reads it


def test_streamed_workflows_refuse_gguf_with_the_way_out(tiny_gguf, tmp_path):
    from offsite.workflows.emulate import emulate
    from offsite.eval.loading import load_for_eval

    path, _ = tiny_gguf()
    with pytest.raises(OffsiteError, match="GGUF file.*offsite models convert"):
        emulate(str(path), tmp_path / "emu", adapter_layers="1,1", emulator_layers=2, stream=True)
    with pytest.raises(OffsiteError, match="GGUF file"):
        load_for_eval(str(path), stream=True)
    assert not (tmp_path / "emu").exists()


def test_cli_emulate_and_convert_take_gguf(tiny_gguf, tmp_path, capsys):
    from offsite.cli import main

    path, original = tiny_gguf()
    assert main(["emulate", "--model", str(path), "--method", "uniform", "--adapter-layers", "1,1",
                 "--emulator-layers", "2", "--out", str(tmp_path / "emu"), "--quiet"]) == 0
    assert read_manifest(tmp_path / "emu")["base"]["source"]["file"] == "tiny.gguf"
    assert main(["models", "convert", str(path), "--out", str(tmp_path / "hf"), "--quiet"]) == 0
    folder_model, _ = load_model(str(tmp_path / "hf"))
    assert state_equal(folder_model.state_dict(), original.state_dict())
    assert main(["emulate", "--model", str(path), "--stream", "--adapter-layers", "1,1", "--emulator-layers", "2",
                 "--out", str(tmp_path / "emu2")]) == 2
    assert "GGUF file" in capsys.readouterr().err


def test_gguf_errors_are_one_line(tmp_path, monkeypatch):
    with pytest.raises(OffsiteError, match="no such .gguf file"):
        load_model(str(tmp_path / "missing.gguf"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(OffsiteError, match="cannot read this GGUF file|bad.gguf"):
        load_model(str(bad))
    monkeypatch.setitem(sys.modules, "gguf", None)  # the extra not installed
    with pytest.raises(OffsiteError, match=r"pip install 'offsite\[gguf\]'"):
        load_model(str(bad))
