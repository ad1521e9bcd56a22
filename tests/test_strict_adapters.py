"""Adapters are hostile input: only exactly the split's adapter layers (or PEFT's LoRA on them) plug in.

Every forged artifact below is re-signed consistently (file hashes, tensor table, ``artifact_id``),
so the manifest checks pass and only the checks against the model itself can refuse it.
"""

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from conftest import make_model, make_tokenizer
from safetensors.torch import save_file

from offsite.adapters.artifact import (ADAPTER_WEIGHTS, LORA_CONFIG, LORA_WEIGHTS, check_lora_config, save_full_adapter,
                                       save_lora_adapter)
from offsite.artifacts import MANIFEST, artifact_id, load_tensors, read_manifest, sha256_file, tensor_index
from offsite.workflows.emulate import emulate
from offsite.core.errors import ArtifactError
from offsite.training.config import FinetuneConfig
from offsite.adapters.lora import wrap_lora
from offsite.eval.loading import load_for_eval
from offsite.emulator.package import load_emulator
from offsite.workflows.plug import plug

ADAPTER = [0, 1, 6, 7]  # "2,2" on 8 layers
# Emulator position of each adapter layer with emulator_layers=1: [0, 1, <one middle layer>, 6, 7].
POSITION = {0: 0, 1: 1, 6: 3, 7: 4}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """An 8-layer base, its "2,2" emulator, and a clean adapter and LoRA trained (faked) on it."""
    root = tmp_path_factory.mktemp("strict")
    base = root / "base"
    make_model("llama", 8).save_pretrained(base)
    make_tokenizer().save_pretrained(base)
    emu_dir = emulate(str(base), root / "emu", adapter_layers="2,2", emulator_layers=1)
    adapter = save_full_adapter(root / "adapter", load_emulator(emu_dir), {}, {})
    emu = load_emulator(emu_dir)
    peft_model = wrap_lora(emu.model, emu.family, emu.adapter_positions, FinetuneConfig(lora=True))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:  # PEFT starts lora_B at zero; a non-zero delta makes merging visible
                p.copy_(torch.randn_like(p) * 0.05)
    lora = save_lora_adapter(root / "lora", emu, peft_model, {}, {})
    return SimpleNamespace(base=str(base), emu=emu_dir, adapter=adapter, lora=lora)


def resign(folder):
    """Recompute the manifest's hashes and id as a forger would (``artifact_id`` over the manifest)."""
    m = json.loads((folder / MANIFEST).read_text())
    m["files"] = {rel: sha256_file(folder / rel) for rel in m["files"]}
    m["tensors"] = {rel: tensor_index(load_tensors(folder / rel)) for rel in m["tensors"]}
    m.pop("signature", None)
    m["artifact_id"] = artifact_id(m)
    (folder / MANIFEST).write_text(json.dumps(m, indent=2))


def forge(src, dst, tensors=None, config=None):
    """Copy artifact ``src`` to ``dst``, let ``tensors`` / ``config`` mutate it in place, re-sign it."""
    shutil.copytree(src, dst)
    weights = dst / (ADAPTER_WEIGHTS if (dst / ADAPTER_WEIGHTS).exists() else LORA_WEIGHTS)
    if tensors is not None:
        t = load_tensors(weights)
        tensors(t)
        save_file(t, str(weights), metadata={"format": "pt"})
    if config is not None:
        c = json.loads((dst / LORA_CONFIG).read_text())
        config(c)
        (dst / LORA_CONFIG).write_text(json.dumps(c))
    resign(dst)
    return dst


def move_layer(old, new):
    """A tensor mutation renaming every tensor of layer ``old`` to layer ``new``."""
    def mutate(t):
        for k in [k for k in t if f"layers.{old}." in k]:
            t[k.replace(f"layers.{old}.", f"layers.{new}.")] = t.pop(k)
    return mutate


def refused(world, artifact, out, match, lora_mode="merge"):
    """``plug`` refuses ``artifact`` with ``match`` and leaves nothing at or beside ``out``."""
    with pytest.raises(ArtifactError, match=match):
        plug(world.base, artifact, out, lora_mode=lora_mode)
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.*"))


# --- re-indexing from emulator positions to full-model layers, checked on its own ---------------

def test_full_adapter_is_written_in_full_model_numbering(world, tmp_path):
    emu = load_emulator(world.emu)
    assert emu.layer_map[:2] + emu.layer_map[3:] == ADAPTER and emu.adapter_positions == list(POSITION.values())
    with torch.no_grad():
        for pos in emu.adapter_positions:
            for p in emu.model.model.layers[pos].parameters():
                p.fill_(pos + 1)
    tensors = load_tensors(save_full_adapter(tmp_path / "a", emu, {}, {}) / ADAPTER_WEIGHTS)
    assert {int(k.split(".")[2]) for k in tensors} == set(ADAPTER)
    for name, t in tensors.items():
        assert torch.all(t == POSITION[int(name.split(".")[2])] + 1), name


def test_lora_is_written_in_full_model_numbering(world, tmp_path):
    emu = load_emulator(world.emu)
    peft_model = wrap_lora(emu.model, emu.family, emu.adapter_positions, FinetuneConfig(lora=True))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.fill_(int(name.split("layers.")[1].split(".")[0]) + 1)
    out = save_lora_adapter(tmp_path / "l", emu, peft_model, {}, {})
    tensors = load_tensors(out / LORA_WEIGHTS)
    layers = {int(k.split("layers.")[1].split(".")[0]) for k in tensors}
    assert layers == set(ADAPTER) and len(tensors) == 4 * 7 * 2  # 4 layers x 7 linears x (A, B)
    for name, t in tensors.items():
        assert torch.all(t == POSITION[int(name.split("layers.")[1].split(".")[0])] + 1), name
    assert json.loads((out / LORA_CONFIG).read_text())["layers_to_transform"] == ADAPTER


# --- full adapters ---------------------------------------------------------------------------

def test_adapter_renamed_to_a_middle_layer_is_refused_and_nothing_is_written(world, tmp_path):
    bad = forge(world.adapter, tmp_path / "bad", tensors=move_layer(7, 3))
    message = r"'model\.layers\.3\..*' belongs to layer 3, which is not an adapter layer of its split \[0, 1, 6, 7\]"
    refused(world, bad, tmp_path / "out", message)
    with pytest.raises(ArtifactError, match=message):
        load_for_eval(world.base, adapter=str(bad))
    with pytest.raises(ArtifactError, match=message):
        load_for_eval(str(world.emu), adapter=str(bad))


def test_adapter_missing_a_layer_is_refused(world, tmp_path):
    def drop(t):
        for k in [k for k in t if "layers.6." in k]:
            del t[k]

    bad = forge(world.adapter, tmp_path / "bad", tensors=drop)
    refused(world, bad, tmp_path / "out", r"missing 9 tensor\(s\) of adapter layer\(s\) \[6\]")


@pytest.mark.parametrize("name,match", [
    ("lm_head.weight", "'lm_head.weight' lies outside the decoder layers"),
    ("model.layers.3.mlp.up_proj.weight", "belongs to layer 3, which is not an adapter layer"),
    ("model.layers.0.mlp.extra", r"1 tensor\(s\) are not parameters of the model's adapter layers"),
])
def test_adapter_with_an_extra_tensor_is_refused(world, tmp_path, name, match):
    bad = forge(world.adapter, tmp_path / "bad", tensors=lambda t: t.update({name: torch.zeros(128, 32)}))
    refused(world, bad, tmp_path / "out", match)


@pytest.mark.parametrize("dtype,hint", [
    (torch.int32, "int32 is not a dtype a model is loaded in"),
    (torch.float16, r"load the base model in the matching dtype \(plug/eval --dtype float16\)"),
])
def test_adapter_in_another_dtype_is_refused_not_cast(world, tmp_path, dtype, hint):
    name = "model.layers.6.self_attn.q_proj.weight"
    bad = forge(world.adapter, tmp_path / "bad", tensors=lambda t: t.update({name: t[name].to(dtype)}))
    short = str(dtype).replace("torch.", "")
    refused(world, bad, tmp_path / "out", rf"tensor '{name}' is {short} but the model's parameter is float32; "
                                          rf"offsite never casts adapter weights silently — {hint}")


# --- LoRA ------------------------------------------------------------------------------------

def _moved_config(c):
    c["layers_to_transform"] = [0, 1, 3, 6]


@pytest.mark.parametrize("lora_mode", ["merge", "peft"])
def test_lora_moved_to_a_middle_layer_is_refused(world, tmp_path, lora_mode):
    bad = forge(world.lora, tmp_path / "bad", tensors=move_layer(7, 3), config=_moved_config)
    message = r"layers_to_transform=\[0, 1, 3, 6\], but the split's adapter layers are \[0, 1, 6, 7\]"
    refused(world, bad, tmp_path / "out", message, lora_mode)
    if lora_mode == "merge":
        with pytest.raises(ArtifactError, match=message):
            load_for_eval(world.base, adapter=str(bad))


@pytest.mark.parametrize("lora_mode", ["merge", "peft"])
def test_lora_tensors_renamed_to_a_middle_layer_are_refused(world, tmp_path, lora_mode):
    bad = forge(world.lora, tmp_path / "bad", tensors=move_layer(7, 3))
    refused(world, bad, tmp_path / "out", r"the artifact holds LoRA tensor '.*layers\.3\..*' outside the adapter "
                                          r"layers \[0, 1, 6, 7\]", lora_mode)


@pytest.mark.parametrize("lora_mode", ["merge", "peft"])
def test_lora_with_modules_to_save_is_refused(world, tmp_path, lora_mode):
    bad = forge(world.lora, tmp_path / "bad", config=lambda c: c.update(modules_to_save=["lm_head"]))
    refused(world, bad, tmp_path / "out", r"sets modules_to_save=\['lm_head'\]", lora_mode)


def test_lora_config_check_without_a_model(world, tmp_path):
    """The model-free half (what verify runs) already refuses a config off the whitelist."""
    assert check_lora_config(world.lora, json.loads((world.lora / MANIFEST).read_text()))["r"] == 8
    bad = forge(world.lora, tmp_path / "bad", config=_moved_config)
    with pytest.raises(ArtifactError, match="layers_to_transform"):
        check_lora_config(bad, json.loads((bad / MANIFEST).read_text()))


@pytest.mark.parametrize("field,value,match", [
    ("trainable_token_indices", [1, 2], "sets trainable_token_indices"),
    ("bias", "all", "sets bias='all'"),
    ("layer_replication", [[0, 8]], "sets layer_replication"),
    ("init_lora_weights", "pissa", "init_lora_weights='pissa'; only true or false"),
    ("target_modules", ".*", "no regex and no dotted paths"),
    ("target_modules", ["q_proj", "model.layers.3.self_attn.q_proj"], "no regex and no dotted paths"),
    ("target_modules", ["q_proj", "lm_head"], r"target_modules \['lm_head'\] name no module of a decoder layer"),
    ("layers_pattern", "h", "layers_pattern='h'"),
    ("task_type", "SEQ_CLS", "task_type='SEQ_CLS'; expected 'CAUSAL_LM'"),
    ("auto_mapping", {"base_model_class": "X", "parent_library": "os"}, "sets auto_mapping"),
    ("from_the_future", 1, r"fields \['from_the_future'\] that the installed peft"),
    ("r", "8", "r='8'; expected a positive integer"),
])
def test_lora_config_outside_the_whitelist_is_refused(world, tmp_path, field, value, match):
    bad = forge(world.lora, tmp_path / "bad", config=lambda c: c.update({field: value}))
    refused(world, bad, tmp_path / "out", match)


@pytest.mark.parametrize("mutate,match", [
    (lambda t: t.pop(sorted(t)[0]), r"not the state dict PEFT creates .*missing 1"),
    (lambda t: t.update({k: v[:4] for k, v in t.items() if "layers.6.mlp.up_proj.lora_A" in k}), "has shape"),
    (lambda t: t.update({k: v.half() for k, v in t.items() if "layers.0." in k}),
     r"is float16; LoRA weights must be float32 or the base model's dtype \(float32\)"),
])
def test_lora_tensors_must_be_peft_s_state_dict(world, tmp_path, mutate, match):
    refused(world, forge(world.lora, tmp_path / "bad", tensors=mutate), tmp_path / "out", match)


# --- what must keep working ------------------------------------------------------------------

def test_clean_adapters_still_plug(world, tmp_path):
    from transformers import AutoModelForCausalLM

    same = forge(world.adapter, tmp_path / "same")  # the forger's re-signing alone changes nothing
    plugged = AutoModelForCausalLM.from_pretrained(plug(world.base, same, tmp_path / "a"))
    tensors = load_tensors(world.adapter / ADAPTER_WEIGHTS)
    assert torch.equal(plugged.model.layers[6].mlp.up_proj.weight, tensors["model.layers.6.mlp.up_proj.weight"])

    merged = AutoModelForCausalLM.from_pretrained(plug(world.base, world.lora, tmp_path / "m"))
    base = AutoModelForCausalLM.from_pretrained(world.base)
    assert not torch.equal(merged.model.layers[6].mlp.up_proj.weight, base.model.layers[6].mlp.up_proj.weight)
    assert torch.equal(merged.model.layers[3].mlp.up_proj.weight, base.model.layers[3].mlp.up_proj.weight)

    exported = plug(world.base, world.lora, tmp_path / "p", lora_mode="peft")
    assert (exported / LORA_CONFIG).read_bytes() == (world.lora / LORA_CONFIG).read_bytes()
    assert load_for_eval(str(world.emu), adapter=str(world.adapter))[2]["kind"] == "emulator+adapter"
    assert load_for_eval(str(world.emu), adapter=str(world.lora))[2]["kind"] == "emulator+lora"


def test_full_finetuning_baseline_adapter_still_loads(world, tmp_path):
    whole = load_emulator(emulate(world.base, tmp_path / "whole", method="uniform", adapter_layers="all",
                                  allow_verbatim_middle=True))  # as the report builds it: never shipped
    adapter = save_full_adapter(tmp_path / "all", whole, {}, {})
    assert len(load_tensors(adapter / ADAPTER_WEIGHTS)) == 8 * 9
    assert load_for_eval(world.base, adapter=str(adapter))[2]["kind"] == "plug-in"


def test_dtype_rules_on_a_bf16_base(tmp_path):
    """A bf16 base read as fp32 takes its emulator's bf16 adapter by an exact upcast; LoRA may be fp32."""
    base = tmp_path / "base"
    make_model("llama", 4).to(torch.bfloat16).save_pretrained(base)
    emu = load_emulator(emulate(str(base), tmp_path / "emu", adapter_layers="1,1", emulator_layers=1))
    adapter = save_full_adapter(tmp_path / "adapter", emu, {}, {})
    out = tmp_path / "out"
    plug(str(base), adapter, tmp_path / "out32", dtype="float32")  # bf16 -> fp32 is exact: accepted
    assert {v[0] for v in read_manifest(tmp_path / "out32")["tensors"]["model.safetensors"].values()} == {"float32"}
    plug(str(base), adapter, out)  # read in its own dtype, it plugs
    lora_emu = load_emulator(tmp_path / "emu")
    peft_model = wrap_lora(lora_emu.model, lora_emu.family, lora_emu.adapter_positions, FinetuneConfig(lora=True))
    lora = save_lora_adapter(tmp_path / "lora", lora_emu, peft_model, {}, {})
    assert {t.dtype for t in load_tensors(lora / LORA_WEIGHTS).values()} == {torch.float32}  # PEFT's upcast
    plug(str(base), lora, tmp_path / "merged")
    plug(str(base), lora, tmp_path / "merged32", dtype="float32")
