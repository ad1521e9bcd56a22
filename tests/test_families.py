"""The conformance suite: every supported family passes the same invariants."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import make_model, state_equal
from offsite.adapters.artifact import save_full_adapter
from offsite.artifacts import load_tensors, unique_state_dict
from offsite.workflows.emulate import emulate
from offsite.core.errors import OffsiteError
from offsite.families import (FAMILIES, get_family, get_layers, get_submodule, layer_linears,
                              supported_model_types)
from offsite.families.kv_cache import cache_kwargs, returned_cache
from offsite.workflows.finetune import finetune
from offsite.emulator.package import load_emulator
from offsite.workflows.plug import plug

FAMILY_NAMES = supported_model_types()
REQUIRED = {"llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "phi", "phi3", "opt", "gpt2", "gpt_neox",
            "falcon", "bloom", "gptj", "gemma3_text", "smollm3", "olmo2", "olmo3", "granite", "glm4"}


def test_required_families_are_supported():
    assert REQUIRED <= set(FAMILIES)


def test_unknown_architecture_is_refused_with_the_supported_list():
    with pytest.raises(OffsiteError, match="unsupported architecture model_type='t5'.*llama"):
        get_family("t5")


@pytest.mark.parametrize("method, settings", [("uniform", {"emulator_layers": 2}),
                                              ("crash", {"emulator_layers": 2, "seq_len": 16, "num_sequences": 4})])
@pytest.mark.parametrize("model_type", [t for t in FAMILY_NAMES if len(get_family(t).per_layer) > 1
                                        or t in ("gemma2", "gemma3_text", "olmo3")])
def test_per_layer_config_lists_follow_the_layers(model_type, method, settings, saved_model, tmp_path, text_file):
    """Each kept (or shared) layer keeps its own entry of every per-layer list: its attention window
    (``layer_types``) and whether it uses RoPE (``no_rope_layers``), in the stock reload too."""
    path, model = saved_model(model_type, 8)
    lists = {n: list(getattr(model.config, n)) for n in get_family(model).per_layer
             if isinstance(getattr(model.config, n, None), (list, tuple))}
    assert lists and any(len(set(v)) > 1 for v in lists.values())  # the tiny config varies them
    out = emulate(str(path), tmp_path / "emu", method=method, adapter_layers="2,2", calibration=text_file,
                  **settings)
    positions = load_emulator(out).layer_map
    stock = AutoModelForCausalLM.from_pretrained(out)
    for name, values in lists.items():
        assert list(getattr(stock.config, name)) == [values[i] for i in positions], name


def ids(n=2, length=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, 120, (n, length), generator=g)


@pytest.mark.parametrize("model_type", FAMILY_NAMES)
class TestConformance:
    def test_roles_resolve(self, model_type, saved_model):
        _, model = saved_model(model_type, 4)
        family = get_family(model)
        layers = get_layers(model, family)
        assert len(layers) == model.config.num_hidden_layers == 4
        linears = layer_linears(layers[0], family)
        assert any(r.startswith("attn.") for r in linears)
        # A dense MLP's linears, or (mixture of experts) a router and fused experts instead.
        assert any(r.startswith("mlp.") for r in linears) != (family.experts is not None)
        for role, module in linears.items():
            assert module.weight.ndim == 2, role
        if family.experts is not None:
            from offsite.families.moe import experts_module
            assert get_submodule(layers[0], family.experts.router).weight.shape[0] == \
                experts_module(layers[0], family).gate_up_proj.shape[0]
        for norm in family.norms:
            get_submodule(layers[0], norm)
        get_submodule(model, family.final_norm)

    def test_emulator_dropping_nothing_reproduces_full_logits(self, model_type, saved_model, tmp_path):
        path, model = saved_model(model_type, 6)
        out_all = emulate(str(path), tmp_path / "emu-all", adapter_layers="1,1", emulator_layers=4,
                          allow_verbatim_middle=True)
        emu = load_emulator(out_all)
        assert emu.layer_map == list(range(6))
        x = ids()
        with torch.no_grad():
            assert torch.allclose(emu.model(x).logits, model(x).logits, atol=1e-5)

    def test_drop_emulator_loads_with_stock_transformers_and_generates(self, model_type, saved_model, tmp_path):
        path, model = saved_model(model_type, 8)
        out = emulate(str(path), tmp_path / "emu", adapter_layers="2,2", emulator_layers=2)
        emu = load_emulator(out)
        assert emu.layer_map == [0, 1, 2, 5, 6, 7]
        stock = AutoModelForCausalLM.from_pretrained(out).eval()
        assert stock.config.num_hidden_layers == 6
        x = ids(1, 6)
        with torch.no_grad():
            assert torch.equal(stock(x).logits, emu.model(x).logits)
            cached = stock.generate(x, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
            uncached = stock.generate(x, max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
            assert torch.equal(cached, uncached)
            # one cached decoding step equals the uncached logits of the same position
            past = returned_cache(stock(x[:, :-1], use_cache=True))
            step = stock(x[:, -1:], use_cache=True, **cache_kwargs(stock, past)).logits[:, -1]
            assert torch.allclose(step, stock(x).logits[:, -1], atol=1e-5)
        # the package holds none of the dropped middle layers' weights
        full = unique_state_dict(model)
        shipped = [t for t in load_tensors(out / "model.safetensors").values()]
        prefix = get_family(model).layers
        for dropped in (3, 4):
            for name, t in full.items():
                if name.startswith(f"{prefix}.{dropped}.") and t.numel() > 1:
                    assert not any(s.shape == t.shape and torch.equal(s, t) for s in shipped), name

    def test_save_load_round_trip_is_bitwise(self, model_type, saved_model, tmp_path):
        path, model = saved_model(model_type, 6)
        out = emulate(str(path), tmp_path / "emu", emulator_layers=1)
        emu = load_emulator(out)
        again = load_emulator(out)
        assert state_equal(unique_state_dict(emu.model), unique_state_dict(again.model))
        saved = load_tensors(out / "model.safetensors")
        assert state_equal(saved, unique_state_dict(emu.model))
        # the kept layers are the original ones, bit for bit
        full = unique_state_dict(model)
        prefix = get_family(model).layers
        for pos, src in enumerate(emu.layer_map):
            for name, t in saved.items():
                if name.startswith(f"{prefix}.{pos}."):
                    assert torch.equal(t, full[name.replace(f"{prefix}.{pos}.", f"{prefix}.{src}.", 1)])

    def test_untouched_adapter_plugs_back_bit_for_bit(self, model_type, saved_model, tmp_path):
        path, model = saved_model(model_type, 6)
        emu = load_emulator(emulate(str(path), tmp_path / "emu", emulator_layers=1))
        adapter = save_full_adapter(tmp_path / "adapter", emu, {}, {})
        out = plug(str(path), adapter, tmp_path / "plugged")
        plugged = AutoModelForCausalLM.from_pretrained(out)
        assert state_equal(unique_state_dict(plugged), unique_state_dict(model))

    def test_finetune_then_plug_changes_only_the_adapter(self, model_type, saved_model, tmp_path, text_file):
        path, model = saved_model(model_type, 6)
        emu_dir = emulate(str(path), tmp_path / "emu", emulator_layers=1)
        adapter = finetune(emu_dir, text_file, tmp_path / "adapter", format="text", max_steps=3, lr=1e-2,
                           block_size=16, batch_size=2, progress=False)
        plugged = AutoModelForCausalLM.from_pretrained(plug(str(path), adapter, tmp_path / "plugged"))
        family = get_family(model)
        before, after = unique_state_dict(model), unique_state_dict(plugged)
        assert before.keys() == after.keys()
        for name in before:
            in_adapter = any(name.startswith(f"{family.layers}.{i}.") for i in (0, 1, 4, 5))
            if not in_adapter:
                assert torch.equal(before[name], after[name]), name
        changed = [n for n in before if not torch.equal(before[n], after[n])]
        assert changed and all(any(n.startswith(f"{family.layers}.{i}.") for i in (0, 1, 4, 5)) for n in changed)

    def test_merged_lora_equals_unmerged(self, model_type, saved_model, tmp_path, text_file):
        from peft import PeftModel

        path, _ = saved_model(model_type, 6)
        emu_dir = emulate(str(path), tmp_path / "emu", emulator_layers=1)
        lora = finetune(emu_dir, text_file, tmp_path / "lora", format="text", lora=True, max_steps=3, lr=5e-2,
                        block_size=16, batch_size=2, progress=False)
        merged = AutoModelForCausalLM.from_pretrained(plug(str(path), lora, tmp_path / "merged")).eval()
        peft_dir = plug(str(path), lora, tmp_path / "peft", lora_mode="peft")
        unmerged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path), peft_dir).eval()
        base = AutoModelForCausalLM.from_pretrained(path).eval()
        x = ids()
        with torch.no_grad():
            got, want, orig = merged(x).logits, unmerged(x).logits, base(x).logits
        assert torch.allclose(got, want, atol=1e-5)
        assert not torch.allclose(got, orig, atol=1e-4)  # the LoRA really changed something


def test_layer_output_convention_matches_the_real_layers(model_type):
    """``layer_returns_tuple`` says what a decoder layer returns; hooks and harmonizers rely on it."""
    from offsite.families import capture_hidden, layer_returns_tuple

    model = make_model(model_type, 2)
    family = get_family(model)
    seen = {}
    layer = get_layers(model, family)[0]
    handle = layer.register_forward_hook(lambda m, a, out: seen.setdefault("out", out))
    with torch.no_grad(), capture_hidden(model, family, outputs_of=[0], inputs_of=[1]) as store:
        model(ids())
    handle.remove()
    assert isinstance(seen["out"], tuple) == layer_returns_tuple(model, family)
    assert torch.equal(store[("out", 0)], store[("in", 1)])  # layer 1 reads what layer 0 wrote


test_layer_output_convention_matches_the_real_layers = pytest.mark.parametrize("model_type", FAMILY_NAMES)(
    test_layer_output_convention_matches_the_real_layers)

# Calibrated methods with budgets small enough for 14 families: build from a tiny text file, reload
# without calibration data, fine-tune the adapter two steps, plug it into the full model.
METHOD_SETTINGS = {
    "distill": dict(steps=2, seq_len=16, num_sequences=8, batch_size=4, emulator_layers=2),
    "crash": dict(seq_len=16, num_sequences=8, batch_size=4, emulator_layers=2, share=True),
    "scaleot": dict(steps=2, seq_len=16, num_sequences=8, batch_size=4, harmonizer_rank=4, alpha=0.5, beta=0.5),
}


@pytest.mark.parametrize("method", sorted(METHOD_SETTINGS))
@pytest.mark.parametrize("model_type", FAMILY_NAMES)
def test_method_builds_reloads_finetunes_and_plugs(model_type, method, saved_model, tmp_path, text_file):
    """Built through the CLI (``offsite emulate --method M --setting value ...``), as users run it."""
    from offsite.cli import main

    path, model = saved_model(model_type, 6)
    emu_dir = tmp_path / "emu"
    flags = [w for k, v in METHOD_SETTINGS[method].items() for w in (f"--{k.replace('_', '-')}", str(v).lower())]
    assert main(["emulate", "--model", str(path), "--method", method, "--adapter-layers", "1,1",
                 "--calibration", str(text_file), "--out", str(emu_dir), *flags]) == 0
    manifest = load_emulator(emu_dir).manifest
    assert manifest["method"] == method
    assert {k: manifest["config"][k] for k in METHOD_SETTINGS[method]} == METHOD_SETTINGS[method]  # flags arrived
    emu = load_emulator(emu_dir)
    assert emu.adapter_positions == [0, len(emu.layer_map) - 1]
    x = ids()
    with torch.no_grad():
        logits = emu.model(x).logits
    assert logits.shape == (*x.shape, model.config.vocab_size) and torch.isfinite(logits).all()
    adapter = finetune(emu_dir, text_file, tmp_path / "adapter", format="text", max_steps=2, lr=1e-2,
                       block_size=16, batch_size=2, progress=False)
    plugged = AutoModelForCausalLM.from_pretrained(plug(str(path), adapter, tmp_path / "plugged"))
    family = get_family(model)
    before, after = unique_state_dict(model), unique_state_dict(plugged)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all(n.startswith((f"{family.layers}.0.", f"{family.layers}.5.")) for n in changed)


@pytest.mark.parametrize("model_type", FAMILY_NAMES)
def test_gradot_emulator_builds_reloads_finetunes_and_plugs(model_type, saved_model, tmp_path, text_file):
    """GradOT on every family: compressed middle, strict reload from the plan alone, the adapter
    fine-tunes on the emulator and plugs back into the full model touching only adapter layers."""
    from offsite.emulator.lowrank import LowRankLinear
    from offsite.workflows.verify import verify_artifact

    path, model = saved_model(model_type, 5)
    out = emulate(str(path), tmp_path / "emu", method="gradot", adapter_layers="1,1", calibration=text_file,
                  param_budget=0.3, seq_len=16, num_sequences=4, batch_size=2)
    verify_artifact(out)
    emu, again = load_emulator(out), load_emulator(out)
    assert state_equal(unique_state_dict(emu.model), unique_state_dict(again.model))
    assert emu.layer_map == list(range(5))
    family = get_family(model)
    middle = get_layers(emu.model, family)[2]
    assert any(isinstance(m, LowRankLinear) for m in middle.modules())
    assert emu.manifest["parameters"]["emulator"] < 0.75 * emu.manifest["parameters"]["full"] or \
        model_type in ("gemma", "gemma2", "qwen2_moe")  # embeddings (a kept shared expert) dominate the tiny config
    if family.experts is not None:  # experts pruned channel-wise, the router untouched
        from offsite.families.moe import channel_count, experts_module
        fused, base = experts_module(middle, family), experts_module(get_layers(model, family)[2], family)
        if base is not None:
            assert channel_count(fused, family.experts) < channel_count(base, family.experts)
            router = family.experts.router + ".weight"
            assert torch.equal(middle.get_parameter(router), get_layers(model, family)[2].get_parameter(router))
    x = ids()
    with torch.no_grad():
        assert torch.isfinite(emu.model(x).logits).all()
    adapter = finetune(out, text_file, tmp_path / "adapter", format="text", max_steps=2, lr=1e-2, block_size=16,
                       batch_size=2, progress=False)
    plugged = AutoModelForCausalLM.from_pretrained(plug(str(path), adapter, tmp_path / "plugged"))
    before, after = unique_state_dict(model), unique_state_dict(plugged)
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert changed and all(n.startswith((f"{family.layers}.0.", f"{family.layers}.4.")) for n in changed)
