"""ScaleOT (``--method scaleot``): harmonizers, Dynamic LayerReplace, selective rank compression."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import SENTENCES, make_model, state_equal
from offsite.artifacts import load_tensors, unique_state_dict
from offsite.calibration import calibration_batches
from offsite.workflows.emulate import emulate
from offsite.emulator import BuildInputs, get_builder, keep_layers
from offsite.emulator.methods.scaleot.harmonizer import HarmonizerLayer, make_harmonizer
from offsite.emulator.methods.scaleot.layer_replace import candidate_loss, dynamic_layer_replace, random_groups
from offsite.core.errors import OffsiteError
from offsite.families import (get_family, get_layers, layer_linears, layer_returns_tuple, replace_layer,
                              supported_model_types)
from offsite.families.linears import linear_weight
from offsite.emulator.package import load_emulator
from offsite.model.split import make_split

SMALL = dict(seq_len=16, num_sequences=16, batch_size=4, harmonizer_rank=8)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 6-layer tiny Llama fitted to the test text (random layers barely matter to the loss;
    trained ones do), with layer 3 then made an exact identity (attention out and MLP down zeroed)."""
    from conftest import make_tokenizer

    tok = make_tokenizer()
    path = tmp_path_factory.mktemp("cal") / "cal.txt"
    path.write_text("\n".join(SENTENCES * 30))
    batches = calibration_batches(path, tok, seq_len=16, num_sequences=32, batch_size=8)
    model = make_model("llama", 6)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for step in range(150):
        ids = batches[step % len(batches)]
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval().requires_grad_(False)
    family = get_family(model)
    linears = layer_linears(get_layers(model, family)[3], family)
    linears["attn.o"].weight.zero_()
    linears["mlp.down"].weight.zero_()
    return model, batches


@pytest.mark.parametrize("model_type", supported_model_types())
def test_fresh_harmonizer_is_a_layer_drop_with_the_layer_call_convention(model_type):
    # batch of 2: a model loop taking output[0] of a bare tensor would read row 0 only and differ
    model = make_model(model_type, 4)
    family = get_family(model)
    dropped = copy.deepcopy(model)
    keep_layers(dropped, family, [0, 1, 3])
    as_tuple = layer_returns_tuple(model, family)
    h = make_harmonizer(get_layers(model, family)[2], model.config.hidden_size, 4, as_tuple)
    assert isinstance(h(torch.ones(1, 2, model.config.hidden_size), "extra", mask=None), tuple) == as_tuple
    replace_layer(model, family, 2, h)
    x = torch.randint(4, 120, (2, 9))
    with torch.no_grad():
        assert torch.allclose(model(x).logits, dropped(x).logits, atol=1e-5)


@pytest.mark.parametrize("model_type", supported_model_types())
def test_layer_convention_is_read_off_a_meta_skeleton_as_off_the_model(model_type, monkeypatch):
    """A package skeleton has its weights on ``meta``; transformers >= 5.25 reads values while it
    builds masks, so a forward pass of the skeleton cannot run. The convention read for it must be
    the one the loaded model has."""
    from accelerate import init_empty_weights

    from offsite.families import layers as layer_probe

    model = make_model(model_type, 3)
    family = get_family(model)
    monkeypatch.setattr(layer_probe, "_RETURNS_TUPLE", {})
    real = layer_returns_tuple(model, family)
    monkeypatch.setattr(layer_probe, "_RETURNS_TUPLE", {})
    with init_empty_weights(include_buffers=False):
        skeleton = AutoModelForCausalLM.from_config(model.config)
    assert all(p.is_meta for p in skeleton.parameters())
    assert layer_returns_tuple(skeleton, family) == real


def test_package_loads_where_no_build_ran_before(saved_model, text_file, tmp_path, monkeypatch):
    """In a fresh process (here: the probe's memory emptied) a ScaleOT package loads, plugs and
    verifies: its harmonizers learn the layer convention without running the meta skeleton."""
    from offsite.cli import main
    from offsite.families import layers as layer_probe

    path, _ = saved_model("llama", 6)
    out = emulate(str(path), tmp_path / "emu", method="scaleot", adapter_layers="1,1", calibration=text_file,
                  alpha=0.5, beta=0.0, steps=2, **SMALL)
    monkeypatch.setattr(layer_probe, "_RETURNS_TUPLE", {})
    emu = load_emulator(out)
    assert any(isinstance(layer, HarmonizerLayer) for layer in get_layers(emu.model, emu.family))
    monkeypatch.setattr(layer_probe, "_RETURNS_TUPLE", {})
    assert main(["verify", str(out)]) == 0


def test_harmonizer_only_slot_trains_and_lowers_its_replacement_loss(trained):
    model, batches = trained
    model = copy.deepcopy(model)
    family = get_family(model)
    middle = [2, 4]  # a group of two: every candidate replaces exactly one of them
    layers = get_layers(model, family)
    harmonizers = {i: make_harmonizer(layers[i], 32, 8, layer_returns_tuple(model, family)) for i in middle}
    with torch.no_grad():
        before = [candidate_loss(model, family, middle, harmonizers, [p], batches[0]).item() for p in (0, 1)]
    result = dynamic_layer_replace(model, family, middle, harmonizers, batches, steps=30, lr=3e-3, score_lr=0.05,
                                   group_size=2, num_candidates=2)
    with torch.no_grad():
        after = [candidate_loss(model, family, middle, harmonizers, [p], batches[0]).item() for p in (0, 1)]
    assert all(a < 0.9 * b for a, b in zip(after, before)), (before, after)
    assert all(get_layers(model, family)[i] is layers[i] for i in middle)  # originals restored
    assert result["loss_final"] < result["loss_first"]


def test_importance_marks_an_identity_layer_least_important(trained):
    model, batches = trained
    builder = get_builder("scaleot")
    family, split = get_family(model), make_split(6, "1,1")
    for seed in (0, 1):
        config = builder.make_config(alpha=0.25, beta=0.0, steps=30, seed=seed, **SMALL)
        plan, emu = builder.build(copy.deepcopy(model), family, split, config, BuildInputs(calibration=batches))
        scores = {int(k): v for k, v in plan["importance"].items()}
        assert min(scores, key=scores.get) == 3, scores
        assert plan["replaced"] == [3]
        assert isinstance(get_layers(emu, family)[3], HarmonizerLayer)


def test_random_groups_partition_without_singletons():
    g = torch.Generator().manual_seed(0)
    for num in range(2, 12):
        groups = random_groups(num, 4, g)
        assert sorted(sum(groups, [])) == list(range(num)) and min(map(len, groups)) >= 2


def test_alpha_zero_without_rank_reduction_gives_the_original_layers(saved_model, tmp_path):
    path, model = saved_model("qwen2", 6)
    out = emulate(str(path), tmp_path / "emu", method="scaleot", adapter_layers="1,1", alpha=0, beta=0,
                  allow_verbatim_middle=True)
    uniform = load_emulator(emulate(str(path), tmp_path / "uni", adapter_layers="1,1", emulator_layers=4,
                                    allow_verbatim_middle=True))
    emu = load_emulator(out)
    assert emu.layer_map == uniform.layer_map == list(range(6))
    assert emu.manifest["plan"]["replaced"] == [] and emu.manifest["plan"]["src"] == []
    assert state_equal(unique_state_dict(emu.model), unique_state_dict(model))
    x = torch.randint(4, 120, (2, 10))
    with torch.no_grad():
        assert torch.equal(emu.model(x).logits, uniform.model(x).logits)
    AutoModelForCausalLM.from_pretrained(out)  # nothing replaced: still a stock checkpoint


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_package_rebuilds_harmonizers_and_compressed_attention(model_type, saved_model, text_file, tmp_path, tokenizer):
    path, model = saved_model(model_type, 6)
    settings = dict(alpha=0.5, beta=0.6, steps=3, **SMALL)
    out = emulate(str(path), tmp_path / "emu", method="scaleot", adapter_layers="1,1", calibration=text_file,
                  **settings)
    emu = load_emulator(out)
    plan = emu.manifest["plan"]
    family = get_family(model)
    assert len(plan["replaced"]) == 2 and emu.layer_map == list(range(6))
    layers = get_layers(emu.model, family)
    for pos, entry in enumerate(plan["layers"]):
        assert isinstance(layers[pos], HarmonizerLayer) == (pos in plan["replaced"])
    saved = load_tensors(out / "model.safetensors")
    assert any(k.startswith(f"{family.layers}.{plan['replaced'][0]}.down.") for k in saved)
    kept = [i for i in (1, 2, 3, 4) if i not in plan["replaced"]]
    assert {e["layer"] for e in plan["src"]} == set(kept)
    for entry in plan["src"]:
        module = layer_linears(layers[entry["layer"]], family)[entry["role"]]
        weight = module.dense_weight() if entry["stored"] == "factors" else linear_weight(module, family)
        assert torch.linalg.matrix_rank(weight.double(), rtol=1e-6) <= entry["rank"] < min(weight.shape)
    for pos in (0, 5):  # adapters are the base model's layers, untouched
        assert state_equal(layers[pos].state_dict(), get_layers(model, family)[pos].state_dict())

    # the reloaded package computes what the builder produced in memory
    base = AutoModelForCausalLM.from_pretrained(path).eval()
    builder = get_builder("scaleot")
    _, built = builder.build(base, family, make_split(6, "1,1"), builder.make_config(**settings),
                             BuildInputs(calibration=text_file, tokenizer=tokenizer))
    x = torch.randint(4, 120, (2, 10))
    with torch.no_grad():
        assert torch.allclose(emu.model(x).logits, built(x).logits, atol=1e-5)


def test_cache_serves_other_alpha_beta_without_retraining(saved_model, text_file, tmp_path):
    path, _ = saved_model("llama", 8)
    cache = tmp_path / "cache"
    common = dict(adapter_layers="2,2", calibration=text_file, cache_dir=str(cache), steps=4, **SMALL)
    first = load_emulator(emulate(str(path), tmp_path / "a", method="scaleot", alpha=0.5, beta=0.0, **common))
    assert (cache / "importance.json").is_file() and (cache / "harmonizers.safetensors").is_file()
    second = load_emulator(emulate(str(path), tmp_path / "b", method="scaleot", alpha=0.75, beta=0.3, **common))
    p1, p2 = first.manifest["plan"], second.manifest["plan"]
    assert not p1["training"]["reused"] and p2["training"]["reused"]
    assert p1["importance"] == p2["importance"] and set(p1["replaced"]) < set(p2["replaced"])
    family = get_family(first.model)
    for i in p1["replaced"]:  # same trained harmonizer in both packages
        assert state_equal(get_layers(first.model, family)[i].state_dict(),
                           get_layers(second.model, family)[i].state_dict())
    with pytest.raises(OffsiteError, match="importance cache .* was made for another"):
        emulate(str(path), tmp_path / "c", method="scaleot", **{**common, "steps": 5})


def test_scaleot_refusals(saved_model, tmp_path):
    builder = get_builder("scaleot")
    with pytest.raises(OffsiteError, match=r"alpha must be in \[0.0, 1.0\], got 1.5"):
        builder.make_config(alpha=1.5)
    with pytest.raises(OffsiteError, match=r"beta must be in \[0.0, 1.0\), got 1.0"):
        builder.make_config(beta=1.0)
    with pytest.raises(OffsiteError, match="beta must be in"):
        builder.make_config(beta=-0.1)
    with pytest.raises(OffsiteError, match="alpha must be a number"):
        builder.make_config(alpha="half")
    with pytest.raises(OffsiteError, match="group_size must be >= 2"):
        builder.make_config(group_size=1)
    with pytest.raises(OffsiteError, match="harmonizer rank must be >= 1"):
        HarmonizerLayer(8, 0)
    path, _ = saved_model("llama", 6)
    with pytest.raises(OffsiteError, match="calibration file .*absent.txt does not exist"):
        emulate(str(path), tmp_path / "x", method="scaleot", calibration=tmp_path / "absent.txt", **SMALL)
    assert not (tmp_path / "x").exists()


def test_cli_flags_reach_scaleot_and_the_package_verifies(saved_model, text_file, tmp_path):
    from offsite.cli import main
    from offsite.workflows.verify import verify_artifact

    path, _ = saved_model("gpt2", 6)
    out = tmp_path / "emu"
    assert main(["emulate", "--model", str(path), "--method", "scaleot", "--adapter-layers", "1,1",
                 "--calibration", str(text_file), "--alpha", "0.25", "--beta", "0.5", "--steps", "2",
                 "--seq-len", "16", "--num-sequences", "8", "--batch-size", "4", "--harmonizer-rank", "4",
                 "--out", str(out)]) == 0
    plan = load_emulator(out).manifest["plan"]
    assert plan["alpha"] == 0.25 and plan["beta"] == 0.5 and len(plan["replaced"]) == 1
    assert verify_artifact(out)["kind"] == "emulator"
    assert main(["emulate", "--model", str(path), "--method", "scaleot", "--alpha", "2", "--out",
                 str(tmp_path / "bad")]) == 2
