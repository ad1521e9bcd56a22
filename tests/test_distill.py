"""OT-KD (``--method distill``): a uniform-drop student distilled against the original middle."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import state_equal
from offsite.artifacts import unique_state_dict
from offsite.cli import main
from offsite.workflows.emulate import emulate
from offsite.emulator import get_builder
from offsite.emulator.calibrated import normalised_mse
from offsite.emulator.methods.distill import distill_gap, kd_points, teacher_targets
from offsite.core.errors import OffsiteError
from offsite.families import capture_hidden, get_family, get_layers
from offsite.emulator.package import load_emulator
from offsite.core.precision import policy
from offsite.model.split import make_split

SMALL = dict(seq_len=16, num_sequences=16, batch_size=4)


def test_normalised_mse_is_scale_free_and_zero_for_a_copy():
    t = torch.randn(2, 5, 8)
    assert normalised_mse(t, t).item() == 0
    assert normalised_mse(torch.zeros_like(t), t).item() == pytest.approx(1.0)
    assert normalised_mse(3 * t + 1, t).item() == pytest.approx(normalised_mse(30 * t + 10, 10 * t).item(), rel=1e-5)


@pytest.mark.parametrize("scale", ["global", "token"])
def test_normalised_mse_both_scales_are_scale_free_and_zero_for_a_copy(scale):
    t = torch.randn(2, 5, 8)
    assert normalised_mse(t, t, scale).item() == 0
    assert normalised_mse(torch.zeros_like(t), t, scale).item() == pytest.approx(1.0)
    assert normalised_mse(3 * t, t, scale).item() == pytest.approx(normalised_mse(30 * t, 10 * t, scale).item(), rel=1e-5)


def test_token_scale_weighs_every_position_when_the_first_token_is_massive():
    # A real LM's first token carries a massive activation (SmolLM2: ~140x the other positions).
    t = torch.randn(1, 8, 16)
    t[:, 0] *= 140.0
    wrong_rest = t.clone()
    wrong_rest[:, 1:] = 0  # copies the massive token only
    wrong_first = t.clone()
    wrong_first[:, 0] = 0  # copies every ordinary token
    # global: missing seven ordinary positions costs almost nothing next to missing the one massive one
    assert normalised_mse(wrong_rest, t, "global") < 0.01 * normalised_mse(wrong_first, t, "global")
    # token: each position counts once, so missing seven costs seven times missing one
    assert normalised_mse(wrong_rest, t, "token").item() == pytest.approx(
        7 * normalised_mse(wrong_first, t, "token").item(), rel=1e-5)


def test_distill_refuses_an_unknown_kd_scale():
    from offsite.emulator.methods.distill import DistillConfig
    from offsite.core.errors import OffsiteError

    with pytest.raises(OffsiteError, match="kd_scale must be 'token' or 'global'"):
        DistillConfig(kd_scale="layer")


def test_kd_points_are_the_middle_to_adapter_handovers():
    assert kd_points([0, 1, 3, 6, 7], make_split(8, "2,2")) == [("in", 6)]
    assert kd_points([0, 2, 3], make_split(4, "1,0")) == [("out", 3)]
    assert kd_points([0, 2, 4, 6], make_split(7, "idx:0,4")) == [("in", 4), ("out", 6)]


def test_distillation_lowers_the_student_teacher_gap_and_trains_only_the_middle(saved_model, text_file, tmp_path):
    path, model = saved_model("llama", 6)
    out = emulate(str(path), tmp_path / "emu", method="distill", adapter_layers="2,2", calibration=text_file,
                  emulator_layers=1, steps=25, lr=3e-3, warmup_steps=0, **SMALL)
    emu = load_emulator(out)
    record = emu.manifest["plan"]["distill"]
    assert emu.layer_map == [0, 1, 2, 4, 5]  # uniform keeps middle position (M-1)//2 for n=1
    assert record["steps"] == 25 and record["gap_after"] < 0.5 * record["gap_before"]
    assert record["kd_final"] < record["kd_first"]

    # recompute the gap independently on the reloaded package, against the untouched base model
    family = get_family(model)
    g = torch.Generator().manual_seed(3)
    batches = [torch.randint(4, 120, (4, 16), generator=g) for _ in range(2)]
    uniform = load_emulator(emulate(str(path), tmp_path / "uni", emulator_layers=1))
    points, student_points = [("in", 4)], [("in", 3)]
    targets = teacher_targets(model.eval(), family, batches, points, policy("fp32", torch.float32, "cpu"))
    # the targets are the teacher's own input to layer 4, taken here by hand
    with torch.no_grad(), capture_hidden(model, family, inputs_of=[4]) as store:
        model(input_ids=batches[1], use_cache=False)
    assert torch.equal(targets[1][0], store[("in", 4)])
    gap_uniform = distill_gap(uniform.model, family, batches, targets, student_points)
    gap_distilled = distill_gap(emu.model, family, batches, targets, student_points)
    assert gap_distilled < 0.7 * gap_uniform

    # adapters, embeddings, norms and head are the base model's, bit for bit; the middle layer moved
    full, got = unique_state_dict(model), unique_state_dict(emu.model)
    for pos, src in enumerate(emu.layer_map):
        before = get_layers(model, family)[src].state_dict()
        after = get_layers(emu.model, family)[pos].state_dict()
        assert state_equal(before, after) == (src != 2), src
    outside = [k for k in got if not k.startswith(family.layers + ".")]
    assert outside and all(torch.equal(got[k], full[k]) for k in outside)

    # drop-only structure: stock transformers loads it and computes the same logits
    stock = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.equal(stock(batches[0]).logits, emu.model(batches[0]).logits)


def test_distill_refusals(saved_model, tmp_path, text_file):
    path, _ = saved_model("llama", 6)
    with pytest.raises(OffsiteError, match="calibration file .*missing.txt does not exist"):
        emulate(str(path), tmp_path / "a", method="distill", calibration=tmp_path / "missing.txt", **SMALL)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(OffsiteError, match="empty"):
        emulate(str(path), tmp_path / "b", method="distill", calibration=empty, **SMALL)
    builder = get_builder("distill")
    with pytest.raises(OffsiteError, match="steps must be an integer >= 1"):
        builder.make_config(steps=0)
    with pytest.raises(OffsiteError, match="both 0"):
        builder.make_config(kd_weight=0, lm_weight=0)
    with pytest.raises(OffsiteError, match="between 0 and 2"):
        emulate(str(path), tmp_path / "c", method="distill", calibration=text_file, emulator_layers=3, **SMALL)
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def test_cli_passes_method_flags_and_refuses_foreign_ones(saved_model, text_file, tmp_path, capsys):
    path, _ = saved_model("gpt2", 6)
    out = tmp_path / "emu"
    args = ["emulate", "--model", str(path), "--method", "distill", "--calibration", str(text_file),
            "--out", str(out), "--steps", "2", "--seq-len", "16", "--num-sequences", "8", "--batch-size", "4"]
    assert main(args) == 0
    manifest = load_emulator(out).manifest
    assert manifest["config"]["steps"] == 2 and manifest["plan"]["distill"]["steps"] == 2
    assert main(["emulate", "--model", str(path), "--out", str(tmp_path / "u"), "--kd-weight", "3"]) == 2
    assert "--kd-weight is a setting of distill, not of method 'uniform'" in capsys.readouterr().err
