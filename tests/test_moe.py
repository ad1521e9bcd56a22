"""Mixture-of-experts families: the unfused view, per-expert pruning, layer kinds that follow moved
layers, and GradOT's per-expert selection (including experts no calibration token reaches)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import make_model
from offsite.core.errors import OffsiteError
from offsite.emulator.package import load_emulator
from offsite.families import get_family, get_layers, get_submodule
from offsite.families.moe import (CHANNEL_MULTIPLE, channel_count, expert_matrices, experts_module, prune_experts,
                                  unfused_experts)
from offsite.workflows.emulate import emulate

MOE = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss"]


def _routed(model, family, layer, tokens=24, seed=3):
    """Inputs of one MoE layer's experts: hidden ``(T, H)`` and the router's choice and weights."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, model.config.hidden_size, generator=g)
    _, weights, index = get_submodule(layer, family.experts.router)(hidden)
    return hidden, index, weights


@pytest.mark.parametrize("model_type", MOE)
def test_unfused_view_computes_what_the_fused_experts_compute(model_type):
    """Per-expert projections on views of the fused tensors, the family's gating: the same outputs."""
    model = make_model(model_type, 2, 0)
    family = get_family(model)
    layer = get_layers(model, family)[0]
    fused = experts_module(layer, family)
    hidden, index, weights = _routed(model, family, layer)
    with torch.no_grad():
        want = fused(hidden, index, weights)
        with unfused_experts(layer, family) as linears:
            got = get_submodule(layer, family.experts.path)(hidden, index, weights)
            assert len(linears) == 3 * fused.gate_up_proj.shape[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert get_submodule(layer, family.experts.path) is fused  # put back


@pytest.mark.parametrize("model_type", MOE)
def test_pruning_an_expert_removes_exactly_its_channels(model_type):
    """Keeping channels S of every expert gives the function with the other channels' down columns
    zeroed, in the family's own layout (interleaved GPT-OSS included); keeping all is bitwise identity."""
    model = make_model(model_type, 2, 0)
    family = get_family(model)
    layer = get_layers(model, family)[0]
    fused = experts_module(layer, family)
    count, channels = fused.gate_up_proj.shape[0], channel_count(fused, family.experts)
    hidden, index, weights = _routed(model, family, layer)
    g = torch.Generator().manual_seed(0)
    keep = [sorted(torch.randperm(channels, generator=g)[:CHANNEL_MULTIPLE].tolist()) for _ in range(count)]
    before = {n: p.detach().clone() for n, p in fused.named_parameters()}
    with torch.no_grad():
        full = fused(hidden, index, weights)
        for e in range(count):  # the reference: zero the dropped channels' down columns
            drop = sorted(set(range(channels)) - set(keep[e]))
            expert_matrices(fused, family.experts, e)["down"][:, drop] = 0
        want = fused(hidden, index, weights)
        for n, p in fused.named_parameters():
            p.copy_(before[n])
        prune_experts(layer, family, [range(channels)] * count)
        assert all(torch.equal(p, before[n]) for n, p in fused.named_parameters())
        torch.testing.assert_close(fused(hidden, index, weights), full, rtol=0, atol=0)
        prune_experts(layer, family, keep)
        got = fused(hidden, index, weights)
    assert channel_count(fused, family.experts) == CHANNEL_MULTIPLE
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_expert_pruning_refuses_ragged_or_bad_channel_lists():
    model = make_model("mixtral", 2, 0)
    family = get_family(model)
    layer = get_layers(model, family)[0]
    for bad in ([[0, 1]] * 3, [[0, 1], [0, 1], [0, 1], [0]], [[0, 0]] * 4, [[0, 999]] * 4, [[]] * 4):
        with pytest.raises(OffsiteError, match="same number"):
            prune_experts(layer, family, bad)


@pytest.mark.parametrize("model_type", ["qwen2_moe", "qwen3_moe"])
def test_dense_and_expert_layers_keep_their_kind_when_layers_move(model_type, saved_model, tmp_path):
    """Qwen-MoE chooses dense or expert MLPs by layer index: a uniform emulator's stock reload builds
    each kept layer with the MLP it came from, and loads strictly."""
    path, model = saved_model(model_type, 8, mlp_only_layers=[1, 4])
    out = emulate(str(path), tmp_path / "emu", method="uniform", adapter_layers="1,1", emulator_layers=3)
    positions = load_emulator(out).layer_map
    assert 4 in positions or 1 in positions
    stock, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    family = get_family(model)
    for new, old in enumerate(positions):
        assert type(get_layers(stock, family)[new].mlp) is type(get_layers(model, family)[old].mlp)


def test_gradot_scores_each_expert_and_falls_back_for_an_expert_no_token_reaches(saved_model, tmp_path, text_file):
    """Expert 3 of every layer is never routed to (GPT-OSS's router bias far below the others): the plan
    says it was scored by channel norm, the others by GCS, and each expert keeps its own channels."""
    path, model = saved_model("gpt_oss", 5)
    family = get_family(model)
    with torch.no_grad():
        for layer in get_layers(model, family):
            get_submodule(layer, family.experts.router).bias[3] = -1e4
    model.save_pretrained(path)
    out = emulate(str(path), tmp_path / "emu", method="gradot", adapter_layers="1,1", calibration=text_file,
                  channel_ratio=0.25, rank_ratio=0.5, seq_len=16, num_sequences=4, batch_size=2)
    plan = load_emulator(out).manifest["plan"]
    entries = [e for e in plan["mlp"] if "experts" in e]
    assert [e["layer"] for e in entries] == [1, 2, 3]
    for e in entries:
        assert e["by_norm"] == [3]
        assert {len(k) for k in e["experts"]} == {16} and e["of"] == 64
        assert len({tuple(k) for k in e["experts"]}) > 1  # experts choose their own channels


def test_expert_terms_survive_the_terms_cache(tmp_path):
    """``offsite frontier`` reuses GradOT's terms through ``cache_dir``: the per-expert terms come back
    from it and select the same channels as the fresh ones."""
    from offsite.emulator import get_builder
    from offsite.emulator.inputs import BuildInputs
    from offsite.emulator.methods.gradot import select
    from offsite.model.split import make_split

    model = make_model("mixtral", 4, 0)
    family, split = get_family(model), make_split(4, "1,1")
    batches = [torch.randint(4, 120, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    builder = get_builder("gradot")
    config = builder.make_config(param_budget=0.3, cache_dir=str(tmp_path / "cache"))
    fresh, record = builder.terms(model, family, split, config, BuildInputs(calibration=batches))
    again, record_again = builder.terms(model, family, split, config, BuildInputs(calibration=batches))
    assert "cache_dir" in record_again and sorted(again["experts"]) == sorted(fresh["experts"]) == [
        f"{i}.{e}" for i in (1, 2) for e in range(4)]
    assert select(fresh, config) == select(again, config)
    assert [e for e in select(fresh, config)[1] if "experts" in e]
