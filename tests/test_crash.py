"""CRaSh (``--method crash``): CKA between middle layers, adjacent clustering, removing, sharing."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import state_equal
from offsite.workflows.emulate import emulate
from offsite.emulator import get_builder
from offsite.emulator.methods.crash import cluster_adjacent, linear_cka, nearest_kept, pool_tokens
from offsite.core.errors import OffsiteError
from offsite.experiments.protocol import Protocol
from offsite.families import get_family, get_layers, layer_linears
from offsite.emulator.package import load_emulator

SMALL = dict(seq_len=16, num_sequences=16, batch_size=4)


@pytest.mark.parametrize("n", [10, 50])  # Gram form (N < d) and covariance form (N >= d)
def test_linear_cka_identity_orthogonal_and_scale_invariance(n):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 20, generator=g)
    q, _ = torch.linalg.qr(torch.randn(20, 20, generator=g))
    assert linear_cka(x, x) == pytest.approx(1.0)
    assert linear_cka(x, 3.5 * x @ q) == pytest.approx(1.0)
    assert linear_cka(x @ q, x + 2.0) == pytest.approx(1.0)  # column shifts are centred away
    y = torch.randn(n, 12, generator=g)
    assert linear_cka(x, y) == pytest.approx(linear_cka(y, x)) and linear_cka(x, y) < 0.9
    assert linear_cka(x, y) == pytest.approx(linear_cka(2 * x, -y @ torch.linalg.qr(torch.randn(12, 12, generator=g))[0]))


def test_linear_cka_gram_and_covariance_forms_agree():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(30, 30, generator=g), torch.randn(30, 30, generator=g)
    x[:, 0] += y[:, 0] * 3
    wide = linear_cka(torch.cat([x, torch.zeros(30, 1)], 1), y)  # N < d: Gram form
    assert wide == pytest.approx(linear_cka(x, y), rel=1e-9)


def test_clusters_are_contiguous_and_follow_the_similarity_blocks():
    m = 7
    sim = torch.full((m, m), 0.2)
    for block in ([0, 1, 2], [3, 4], [5, 6]):
        for i in block:
            for j in block:
                sim[i, j] = 0.95
    for k in range(1, m + 1):
        clusters = cluster_adjacent(sim, k)
        assert len(clusters) == k and sum(clusters, []) == list(range(m))
        assert all(c == list(range(c[0], c[-1] + 1)) for c in clusters)
    assert cluster_adjacent(sim, 3) == [[0, 1, 2], [3, 4], [5, 6]]
    with pytest.raises(OffsiteError, match="1 <= K <= 7"):
        cluster_adjacent(sim, 8)


def test_nearest_kept_and_pooling():
    assert nearest_kept(4, [3, 5]) == 5 and nearest_kept(2, [3, 7]) == 3 and nearest_kept(9, [3, 7]) == 7
    h = torch.arange(6.0).view(1, 3, 2)
    assert torch.equal(pool_tokens(h, "last"), h[:, -1])
    assert torch.allclose(pool_tokens(h, "mean_weighted"), (h[0] * torch.tensor([[1.], [2.], [3.]])).sum(0) / 6)


def _identity_middle(model, layers):
    """Zero the attention output and MLP down projections: the layers become exact identities."""
    family = get_family(model)
    with torch.no_grad():
        for i in layers:
            linears = layer_linears(get_layers(model, family)[i], family)
            for role in ("attn.o", "mlp.down"):
                linears[role].weight.zero_()
                if getattr(linears[role], "bias", None) is not None:
                    linears[role].bias.zero_()


def test_identical_layers_cluster_together_and_sharing_restores_depth(saved_model, text_file, tmp_path):
    path, model = saved_model("llama", 8)
    _identity_middle(model, [3, 4])  # outputs of layers 2, 3, 4 are then equal: CKA 1
    model.save_pretrained(path)
    out = emulate(str(path), tmp_path / "emu", method="crash", calibration=text_file, emulator_layers=2, **SMALL)
    emu = load_emulator(out)
    plan = emu.manifest["plan"]
    assert plan["clusters"] == [[2, 3, 4], [5]] and plan["representatives"] == [3, 5]
    assert plan["cka"][0][1] == pytest.approx(1.0) and plan["cka"][1][2] == pytest.approx(1.0)
    assert emu.layer_map == [0, 1, 3, 5, 6, 7]

    shared = load_emulator(emulate(str(path), tmp_path / "shared", method="crash", calibration=text_file,
                                   emulator_layers=2, share=True, tie_shared=False, **SMALL))
    assert len(shared.layer_map) == 8 and shared.model.config.num_hidden_layers == 8
    assert shared.layer_map == [0, 1, 3, 3, 5, 5, 6, 7]  # nearest representative, ties to the right
    family = get_family(model)
    for pos, src in enumerate(shared.layer_map):
        assert state_equal(get_layers(shared.model, family)[pos].state_dict(),
                           get_layers(model, family)[src].state_dict())
    assert shared.adapter_positions == [0, 1, 6, 7]
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "shared").eval()
    x = torch.randint(4, 120, (2, 10))
    with torch.no_grad():
        assert torch.equal(stock(x).logits, shared.model(x).logits)
        # the shared stack 0,1,3,3,5,5,6,7 lacks layer 2 (the only non-identity of its cluster)
        assert not torch.allclose(shared.model(x).logits, model(x).logits)
    # the default stores each repeated layer once and ties it on load: same model, smaller package
    tied = load_emulator(emulate(str(path), tmp_path / "tied", method="crash", calibration=text_file,
                                 emulator_layers=2, share=True, **SMALL))
    with torch.no_grad():
        assert torch.equal(tied.model(x).logits, shared.model(x).logits)
    assert tied.manifest["parameters"]["emulator"] < shared.manifest["parameters"]["emulator"]


def test_crash_refusals(saved_model, text_file, tmp_path):
    path, _ = saved_model("llama", 6)
    with pytest.raises(OffsiteError, match=r"1 <= K <= 2 clusters"):
        emulate(str(path), tmp_path / "a", method="crash", calibration=text_file, emulator_layers=3, **SMALL)
    with pytest.raises(OffsiteError, match="calibration file .*nope.txt does not exist"):
        emulate(str(path), tmp_path / "b", method="crash", calibration=tmp_path / "nope.txt", **SMALL)
    builder = get_builder("crash")
    with pytest.raises(OffsiteError, match="unknown pooling 'max'"):
        builder.make_config(pooling="max")
    with pytest.raises(OffsiteError, match="emulator_layers .K clusters. must be an integer >= 1"):
        builder.make_config(emulator_layers=0)
    with pytest.raises(OffsiteError, match="share must be true or false"):
        builder.make_config(share="yes")
    assert not (tmp_path / "a").exists()


def test_report_compares_methods_with_calibration_and_per_method_settings(saved_model, mc_task, text_file, tmp_path):
    from offsite.cli.report import method_settings
    from offsite.experiments.report import run_report

    settings = method_settings(["uniform", "crash", "scaleot"], 2, ["crash:share=true", "scaleot:alpha=0.5"])
    assert settings == {"uniform": {"emulator_layers": 2}, "crash": {"emulator_layers": 2, "share": True},
                        "scaleot": {"alpha": 0.5}}  # scaleot has no emulator_layers setting
    with pytest.raises(OffsiteError, match="METHOD:KEY=VALUE"):
        method_settings(["uniform"], None, ["gradot:param_budget=0.5"])

    path, _ = saved_model("llama", 6)
    protocol = Protocol(limit=6, train_limit=12, finetune={"max_steps": 2, "batch_size": 4})
    report = run_report(str(path), [mc_task[0]], tmp_path / "work", protocol, adapter_layers="1,1",
                        methods=["uniform", "crash"], calibration=text_file,
                        method_settings={"uniform": {"emulator_layers": 2}, "crash": {"emulator_layers": 2, **SMALL}},
                        log=lambda *a: None)
    builds = {m: report["methods"][m]["build"] for m in ("uniform", "crash")}
    assert builds["uniform"]["parameters"] == builds["crash"]["parameters"]  # matched size: 2 of 4 kept
    for method, b in builds.items():  # the recorded sizes are the packages' own parameter counts
        emulator = load_emulator(tmp_path / "work" / f"emulator-{method}").model
        assert b["parameters"]["emulator"] == sum(p.numel() for p in emulator.parameters())
        assert b["parameters"]["emulator"] < b["parameters"]["full"]
