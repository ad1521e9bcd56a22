"""Low-rank and channel-pruned linears: exact at full rank / no pruning, Conv1D and fused layouts."""

import pytest
import torch

from conftest import make_model
from offsite.artifacts import unique_state_dict
from offsite.emulator.lowrank import (LowRankLinear, make_low_rank, prune_mlp_channels, replace_linear,
                                      restructure_linears, truncated_svd, weight_svd)
from offsite.core.errors import OffsiteError
from offsite.families import get_family, get_layers, layer_linears
from offsite.families.linears import linear_weight, mlp_channel_blocks


def ids():
    return torch.randint(4, 120, (2, 10), generator=torch.Generator().manual_seed(0))


def test_truncated_svd_full_rank_reconstructs_and_truncation_is_optimal():
    w = torch.randn(12, 20, generator=torch.Generator().manual_seed(0))
    up, down = truncated_svd(w, rank=12)
    assert up.shape == (12, 12) and down.shape == (12, 20)
    assert torch.allclose(up @ down, w, atol=1e-5)
    up, down = truncated_svd(w, rank=4)
    s = torch.linalg.svdvals(w.double())
    assert abs(torch.linalg.norm(w.double() - (up @ down).double()) - s[4:].norm()) < 1e-4  # Eckart-Young
    up2, down2 = truncated_svd(w, components=[0, 1, 2, 3], svd=weight_svd(w))
    assert torch.allclose(up2 @ down2, up @ down, atol=1e-6)
    with pytest.raises(OffsiteError, match="exactly one of"):
        truncated_svd(w, rank=2, components=[0])
    with pytest.raises(OffsiteError, match="invalid for a matrix of rank at most 12"):
        truncated_svd(w, components=[0, 12])
    with pytest.raises(OffsiteError, match="rank 13 must be between 1 and min"):
        LowRankLinear(20, 12, 13)


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "falcon", "phi3"])
def test_full_rank_factors_in_every_linear_keep_the_logits(model_type):
    model = make_model(model_type, 3)
    family = get_family(model)
    x = ids()
    with torch.no_grad():
        want = model(x).logits
        layer = get_layers(model, family)[1]
        for role, module in layer_linears(layer, family).items():
            w = linear_weight(module, family)
            up, down = truncated_svd(w, rank=min(w.shape))
            replace_linear(layer, family, role, make_low_rank(module, family, up, down))
        assert all(isinstance(m, LowRankLinear) for m in layer_linears(layer, family).values())
        assert torch.allclose(model(x).logits, want, atol=1e-4)


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "phi3", "bloom"])
def test_pruning_channels_equals_zeroing_their_contribution(model_type):
    model = make_model(model_type, 3)
    family = get_family(model)
    layer = get_layers(model, family)[1]
    down = layer_linears(layer, family)["mlp.down"]
    channels = linear_weight(down, family).shape[1]
    keep = [c for c in range(channels) if c % 3]
    x = ids()
    with torch.no_grad():
        full = model(x).logits
        prune_mlp_channels(layer, family, range(channels))  # keeping all channels changes nothing
        assert torch.allclose(model(x).logits, full, atol=1e-5)
        # zeroing down's columns of the dropped channels is the reference for removing them
        linear_weight(layer_linears(layer, family)["mlp.down"], family)[:, [c for c in range(channels) if not c % 3]] = 0
        zeroed = model(x).logits
        prune_mlp_channels(layer, family, keep)
        assert torch.allclose(model(x).logits, zeroed, atol=1e-5)
    new = layer_linears(layer, family)
    assert linear_weight(new["mlp.down"], family).shape[1] == len(keep)
    for role, blocks in mlp_channel_blocks(family).items():
        assert linear_weight(new[role], family).shape[0] == blocks * len(keep)
    with pytest.raises(OffsiteError, match="distinct indices in 0.."):
        prune_mlp_channels(layer, family, [0, 0])


def test_restructure_rebuilds_the_shapes_of_a_compressed_model():
    model = make_model("gpt2", 3)
    family = get_family(model)
    layer = get_layers(model, family)[1]
    prune_mlp_channels(layer, family, [1, 5, 9])
    attn = layer_linears(layer, family)["attn.qkv"]
    replace_linear(layer, family, "attn.qkv", make_low_rank(attn, family, *truncated_svd(linear_weight(attn, family), 3)))
    plan = {"layers": [{"source": i} for i in range(3)], "mlp": [{"layer": 1, "channels": [1, 5, 9]}],
            "linears": [{"layer": 1, "role": "attn.qkv", "rank": 3}]}
    skeleton = make_model("gpt2", 3, seed=5)
    restructure_linears(skeleton, family, plan)
    want = {k: v.shape for k, v in unique_state_dict(model).items()}
    assert {k: v.shape for k, v in unique_state_dict(skeleton).items()} == want
    skeleton.load_state_dict(unique_state_dict(model), strict=False)
    x = ids()
    with torch.no_grad():
        assert torch.allclose(skeleton(x).logits, model(x).logits, atol=1e-6)
