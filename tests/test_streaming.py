"""Streamed base models: a meta skeleton whose decoder layers are read from disk one at a time, the
layer-major calibration forward, and streamed emulator builds equal to in-memory ones bitwise."""

import json

import pytest
import torch

from offsite.calibration import backward_sweep, capture_boundaries, capture_boundaries_layerwise
from offsite.workflows.emulate import emulate
from offsite.core.errors import OffsiteError
from offsite.families import get_family, get_layers
from offsite.model.streaming import StreamedModel
from fixtures.tolerance import assert_close_to_scale

FAMILIES = ["llama", "gpt2", "opt", "falcon", "bloom", "gemma2", "phi3", "gpt_neox"]


def _batches():
    return [torch.randint(4, 120, (2, 12), generator=torch.Generator().manual_seed(s)) for s in range(3)]


@pytest.mark.parametrize("model_type", FAMILIES)
def test_layer_major_forward_and_sweep_equal_the_in_memory_ones(model_type, saved_model):
    path, model = saved_model(model_type, 4)
    model.eval()
    family = get_family(model)
    stream = StreamedModel(str(path))
    layers = get_layers(stream.model, family)
    assert all(p.is_meta for layer in layers for p in layer.parameters())
    want = capture_boundaries(model, family, _batches())
    got = capture_boundaries_layerwise(stream.model, family, _batches(), stream)
    assert stream.live == set()  # every layer released again
    assert got.tokens == want.tokens and got.loss == pytest.approx(want.loss, abs=1e-5)
    for i in range(4):
        for a, b in zip(got.hidden[i], want.hidden[i]):
            assert torch.allclose(a, b, atol=1e-5), i
    for a, b in zip(got.top_grads, want.top_grads):
        assert torch.allclose(a, b, atol=1e-5)
    stats = {}
    backward_sweep(stream.model, family, got, [1, 2], lambda i, s: stats.setdefault(i, s), stream=stream)
    ref = {}
    backward_sweep(model, family, want, [1, 2], lambda i, s: ref.setdefault(i, s))
    for i in (1, 2):
        for role in ref[i]:
            for key in ("A", "G", "grad"):
                # fp32 statistics accumulated over 24 tokens, layer by layer vs whole-model
                assert_close_to_scale(stats[i][role][key], ref[i][role][key], k=256, dtype=torch.float32,
                                      what=f"{i} {role} {key}")


def test_a_checkpoint_stored_per_expert_streams_the_fused_tensors_transformers_would_load(saved_model):
    """Mixtral checkpoints hold one tensor per expert (w1/w3/w2) that transformers fuses on load: the
    streamed reader fuses them the same way, layer by layer (bitwise equal to the loaded model)."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    path, _ = saved_model("mixtral", 3)
    with safe_open(str(path / "model.safetensors"), framework="pt") as fh:
        assert any(".experts.0.w1.weight" in k for k in fh.keys())  # the stored layout this is about
    loaded = AutoModelForCausalLM.from_pretrained(path)
    stream = StreamedModel(str(path))
    for i in range(3):
        layer = stream.materialize(i)
        want = get_layers(loaded, get_family(loaded))[i]
        for name, t in want.state_dict().items():
            assert torch.equal(layer.state_dict()[name], t), (i, name)
        stream.release(i)


def test_streamed_calibrated_builds_write_the_same_packages_for_every_family(saved_model, text_file, tmp_path):
    """gradot (GCS statistics through the layer-major forward and the streamed sweep), crash (CKA over
    streamed layer outputs) and distill (teacher targets from the streamed forward), on all 14 families."""
    from offsite.families.catalog import FAMILIES

    calib = dict(seq_len=16, num_sequences=4, batch_size=2, calibration=text_file, adapter_layers="1,1")
    builds = {"gradot": {"param_budget": 0.3}, "crash": {"emulator_layers": 2}, "distill": {"emulator_layers": 1,
                                                                                            "steps": 1}}
    for model_type in FAMILIES:
        path, _ = saved_model(model_type, 5)
        for method, settings in builds.items():
            where = tmp_path / model_type / method
            ids = [json.loads((emulate(str(path), where / mode, method=method, stream=mode == "streamed",
                                       **calib, **settings) / "manifest.json").read_text())["artifact_id"]
                   for mode in ("whole", "streamed")]
            assert ids[0] == ids[1], (model_type, method)


def test_a_streamed_uniform_build_writes_the_same_package_for_every_family(saved_model, tmp_path):
    from offsite.families.catalog import FAMILIES

    for model_type in FAMILIES:
        path, _ = saved_model(model_type, 5)
        whole = emulate(str(path), tmp_path / model_type / "whole", adapter_layers="1,1", emulator_layers=2,
                        stream=False)
        streamed = emulate(str(path), tmp_path / model_type / "streamed", adapter_layers="1,1", emulator_layers=2,
                           stream=True, max_shard_size="30KB")
        whole_sharded = emulate(str(path), tmp_path / model_type / "sharded", adapter_layers="1,1",
                                emulator_layers=2, max_shard_size="30KB", stream=False)
        a, b, c = (json.loads((p / "manifest.json").read_text()) for p in (whole, streamed, whole_sharded))
        assert a["artifact_id"] != c["artifact_id"] and len(c["tensors"]) > 1, model_type
        assert b["artifact_id"] == c["artifact_id"], model_type


@pytest.mark.parametrize("model_type,method,settings", [
    # every family with the default settings: the two *_for_every_family tests; here the other paths
    ("opt", "gradot", {"param_budget": 0.3, "scoring": "magnitude"}),
    ("gpt2", "crash", {"emulator_layers": 2, "share": True}),
    ("llama", "gradot", {"param_budget": 0.3, "gcs_form": "paper"}),
])
def test_a_streamed_build_writes_the_same_package(model_type, method, settings, saved_model, text_file, tmp_path):
    """emulate --stream reads one layer at a time and must write the very package the in-memory build
    writes: the same artifact id (every file and the manifest, bar run facts)."""
    path, _ = saved_model(model_type, 6)
    common = dict(method=method, adapter_layers="1,1", calibration=text_file, **settings)
    if method in ("gradot", "crash", "distill"):
        common.update(seq_len=16, num_sequences=4, batch_size=2)
    whole = emulate(str(path), tmp_path / "whole", stream=False, **common)
    streamed = emulate(str(path), tmp_path / "streamed", stream=True, **common)
    a, b = (json.loads((p / "manifest.json").read_text()) for p in (whole, streamed))
    assert b["run"]["stream"] is True and "stream" not in a["run"]
    assert a["artifact_id"] == b["artifact_id"]


def test_streaming_refusals(saved_model, text_file, tmp_path, capsys):
    from offsite.cli import main

    path, _ = saved_model("llama", 6)
    with pytest.raises(OffsiteError, match="--stream is not available for method 'scaleot' \\(its layer-importance "
                                           "stage runs the whole model.*crash, distill, gradot, uniform"):
        emulate(str(path), tmp_path / "e", method="scaleot", calibration=text_file, stream=True)
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(OffsiteError, match="--stream reads a checkpoint's .safetensors files"):
        emulate(str(folder), tmp_path / "e", stream=True)
    assert not (tmp_path / "e").exists()
    assert main(["--quiet", "emulate", "--model", str(path), "--adapter-layers", "1,1", "--emulator-layers", "2",
                 "--stream", "--out", str(tmp_path / "cli")]) == 0


def test_a_streamed_build_refuses_a_base_model_with_nan_in_a_middle_layer(saved_model, tmp_path):
    path, model = saved_model("llama", 6)
    with torch.no_grad():
        get_layers(model, get_family(model))[3].mlp.down_proj.weight[0, 0] = float("nan")
    model.save_pretrained(path)
    for stream in (False, True):
        with pytest.raises(OffsiteError, match="NaN"):
            emulate(str(path), tmp_path / "e", adapter_layers="1,1", emulator_layers=1, stream=stream)
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("method,settings", [("uniform", {"emulator_layers": 2}),
                                             ("gradot", {"param_budget": 0.3, "seq_len": 16, "num_sequences": 4,
                                                         "batch_size": 2}),
                                             ("crash", {"emulator_layers": 2, "share": True, "seq_len": 16,
                                                        "num_sequences": 4, "batch_size": 2})])
def test_a_streamed_build_holds_one_layer_and_spills_to_a_scratch_folder(method, settings, saved_model, text_file,
                                                                         tmp_path, monkeypatch):
    """With every activation spilled and small shards, a streamed build still writes the in-memory package,
    never holds more than one decoder layer with real values, and leaves no scratch folder behind."""
    from offsite.calibration import layerwise

    path, _ = saved_model("llama", 6)
    common = dict(method=method, adapter_layers="1,1", calibration=text_file, max_shard_size="40KB", **settings)
    whole = emulate(str(path), tmp_path / "out" / "whole", stream=False, **common)
    most, spilled, materialize, resident = [0], [], StreamedModel.materialize, []

    def counting(self, index):
        layer = materialize(self, index)
        most[0] = max(most[0], len(self.live))
        resident.append(any(not p.is_meta for n, p in self.model.named_parameters() if not n.startswith(self._prefix)))
        return layer

    spill = layerwise.SpilledBoundary.__init__

    def recording(self, tensors, where, device):
        spilled.append(where.name)
        spill(self, tensors, where, device)

    monkeypatch.setattr(StreamedModel, "materialize", counting)
    monkeypatch.setattr(layerwise.SpilledBoundary, "__init__", recording)
    streamed = emulate(str(path), tmp_path / "out" / "streamed", stream=True, spill_above=0, **common)
    a, b = (json.loads((p / "manifest.json").read_text()) for p in (whole, streamed))
    assert len(a["tensors"]) >= 3  # several shards: each is read back on its own
    assert a["artifact_id"] == b["artifact_id"]
    assert most[0] == 1
    assert bool(spilled) == (method == "gradot")  # CRaSh keeps only the current boundary anyway
    # GradOT's sweep runs without the embeddings and head (released after the calibration forward)
    assert (bool(resident) and resident[-1] is False) == (method == "gradot")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["streamed", "whole"]  # scratch removed


def test_a_streamed_build_checks_the_layers_it_copies_and_the_spill_setting(saved_model, tmp_path):
    path, model = saved_model("llama", 6)
    with pytest.raises(OffsiteError, match="spill_above .* applies to streamed builds only"):
        emulate(str(path), tmp_path / "e", adapter_layers="1,1", spill_above="1GB", stream=False)
    with pytest.raises(OffsiteError, match="spill_above must be a number of bytes"):
        emulate(str(path), tmp_path / "e", adapter_layers="1,1", stream=True, spill_above=-1.5)
    with torch.no_grad():  # an adapter layer: read for the first time while the package is written
        get_layers(model, get_family(model))[0].self_attn.q_proj.weight[0, 0] = float("inf")
    model.save_pretrained(path)
    with pytest.raises(OffsiteError, match="infinite"):
        emulate(str(path), tmp_path / "e", adapter_layers="1,1", emulator_layers=1, stream=True)
    assert not (tmp_path / "e").exists() and not list(tmp_path.glob(".offsite-stream-*"))


@pytest.mark.parametrize("model_type,lora", [("llama", False), ("gpt2", False), ("llama", True), ("opt", True)])
def test_a_streamed_plug_writes_the_same_plugged_model(model_type, lora, saved_model, text_file, tmp_path,
                                                      monkeypatch):
    """plug --stream reads only the adapter layers into memory and copies the rest file to file: the
    output must be the in-memory plug's, bitwise (sharded or not), for full adapters and LoRA merges."""
    from offsite.workflows.finetune import finetune
    from offsite.workflows.plug import plug

    path, _ = saved_model(model_type, 6)
    package = emulate(str(path), tmp_path / "emu", adapter_layers="1,1", emulator_layers=2)
    adapter = finetune(package, text_file, tmp_path / "adapter", max_steps=2, batch_size=2, block_size=16, lr=1e-2,
                       lora=lora, progress=False)
    most, materialize = [0], StreamedModel.materialize

    def counting(self, index):
        layer = materialize(self, index)
        most[0] = max(most[0], len(self.live))
        return layer

    monkeypatch.setattr(StreamedModel, "materialize", counting)
    for size in ("5GB", "30KB"):
        whole = plug(str(path), adapter, tmp_path / f"whole-{size}", max_shard_size=size)
        streamed = plug(str(path), adapter, tmp_path / f"streamed-{size}", max_shard_size=size, stream=True)
        a, b = (json.loads((p / "manifest.json").read_text()) for p in (whole, streamed))
        assert b["run"]["stream"] is True
        assert a["artifact_id"] == b["artifact_id"], size
    assert most[0] == 2  # the two adapter layers, nothing else
    if lora:
        exported = plug(str(path), adapter, tmp_path / "peft", lora_mode="peft", stream=True)
        assert (exported / "adapter_model.safetensors").is_file()


def test_the_sweep_hands_over_the_only_references_to_a_layers_statistics(saved_model):
    """on_layer gets the only references to a layer's K-FAC factors: dropping them frees them at once
    (the last recompute's graph used to keep them alive through its hooks until the next layer)."""
    import gc
    import weakref

    _, model = saved_model("llama", 4)
    family = get_family(model)
    bounds = capture_boundaries(model, family, _batches())
    freed = []

    def on_layer(index, stats):
        refs = [weakref.ref(s[k]) for s in stats.values() for k in ("A", "G")]
        stats.clear()
        gc.collect()
        freed.append(all(r() is None for r in refs))

    backward_sweep(model, family, bounds, [1, 2], on_layer, torch.float32, with_grad=False)
    assert freed == [True, True]


def test_builds_stream_by_default_and_hold_one_layer_and_one_tensor(saved_model, text_file, tmp_path, monkeypatch,
                                                                    capsys):
    """With no memory flag, a method that can stream streams (default shard size): at most one decoder
    layer has real values, and the writer holds at most one tensor it read back. A method that cannot
    stream loads the model whole and says so in one line; --no-stream loads it whole too."""
    import weakref

    from offsite.cli import main

    path, _ = saved_model("llama", 6)
    most, alive, reader = [0], [], StreamedModel.emulator_reader
    materialize = StreamedModel.materialize

    def counting(self, index):
        layer = materialize(self, index)
        most[0] = max(most[0], len(self.live))
        return layer

    def tracking(self, sources):
        read = reader(self, sources)

        def one_at_a_time(names):
            assert len(names) == 1, f"{len(names)} tensors read back at once"
            assert all(ref() is None for ref in alive), "a tensor read back earlier is still alive"
            values = read(names)
            alive.extend(weakref.ref(v) for v in values.values())
            return values
        return one_at_a_time

    monkeypatch.setattr(StreamedModel, "materialize", counting)
    monkeypatch.setattr(StreamedModel, "emulator_reader", tracking)
    out = emulate(str(path), tmp_path / "default", adapter_layers="1,1", method="gradot",
                  calibration=text_file, param_budget=0.3, seq_len=16, num_sequences=4, batch_size=2)
    assert json.loads((out / "manifest.json").read_text())["run"]["stream"] is True
    assert most[0] == 1 and len(alive) > 0
    capsys.readouterr()
    assert main(["emulate", "--model", str(path), "--method", "scaleot", "--calibration", str(text_file),
                 "--adapter-layers", "1,1", "--set", "steps=1", "seq_len=16", "num_sequences=4", "batch_size=2",
                 "--out", str(tmp_path / "scaleot")]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "loading the whole model" in line]
    assert len(notes) == 1 and "method 'scaleot' cannot stream" in notes[0]
    assert main(["emulate", "--model", str(path), "--no-stream", "--adapter-layers", "1,1", "--emulator-layers", "2",
                 "--out", str(tmp_path / "whole")]) == 0
    assert "stream" not in json.loads((tmp_path / "whole" / "manifest.json").read_text())["run"]
