"""Every emulator method has one shape: ``plan`` decides without changing the model, ``apply`` follows
a plan (alone too, from a manifest), ``train`` comes after, and ``build`` (never overridden) runs them.
The calibration settings have one declaration, and the calibration text is tokenised once per build."""

import dataclasses
import hashlib
import json
import typing

import pytest
import torch

from offsite.artifacts import read_manifest
from offsite.workflows.emulate import emulate
from offsite.emulator import BuildInputs, CalibrationSettings, EmulatorBuilder, available_methods, get_builder
from offsite.core.errors import OffsiteError
from offsite.families import get_family, get_layers
from offsite.model.loading import load_model
from offsite.emulator.package import load_emulator
from offsite.model.split import Split, make_split

CALIB = dict(seq_len=16, num_sequences=4, batch_size=2)
METHODS = {
    "uniform": {"emulator_layers": 2},
    "crash": {"emulator_layers": 2, "share": True, **CALIB},
    "distill": {"emulator_layers": 2, "steps": 2, **CALIB},
    "scaleot": {"alpha": 0.5, "beta": 0.5, "steps": 2, "harmonizer_rank": 8, **CALIB},
    "gradot": {"param_budget": 0.3, **CALIB},
}


def fingerprint(model) -> tuple:
    """Every parameter and buffer (name, dtype, shape, bytes) and the module tree (names and types)."""
    tensors = []
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        data = t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        tensors.append((name, str(t.dtype), tuple(t.shape), hashlib.sha256(data).hexdigest()))
    return tuple(tensors), tuple((name, type(m).__name__) for name, m in model.named_modules())


def test_no_method_overrides_build():
    assert set(METHODS) == set(available_methods())
    for method in available_methods():
        assert type(get_builder(method)).build is EmulatorBuilder.build, method


@pytest.mark.parametrize("method", sorted(METHODS))
def test_plan_leaves_the_model_as_it_is(method, saved_model, text_file):
    """plan decides: every weight, buffer and module stays, and the plan is plain JSON (what a method
    learns that is not, ScaleOT's harmonizers or OT-KD's targets, goes to inputs.learned)."""
    path, _ = saved_model("llama", 6)
    model, tok = load_model(str(path))
    family, split = get_family(model), make_split(6, "1,1")
    builder = get_builder(method)
    config = builder.make_config(**METHODS[method])
    before = fingerprint(model)
    called = []
    inputs = BuildInputs(calibration=text_file, tokenizer=tok)
    plan = builder.plan(model, family, split, config, inputs, on_layer=lambda i, part, scratch: called.append(i))
    assert fingerprint(model) == before
    json.dumps(plan)  # no tensors, no modules
    assert sorted(called) == (list(split.middle) if method == "gradot" else [])  # each middle layer once
    assert inputs.applied == set()  # planning alone applies nothing


@pytest.mark.parametrize("method,settings", [
    ("uniform", {"emulator_layers": 2}),
    ("crash", {"emulator_layers": 2, "share": True, **CALIB}),  # tied shared positions
    ("crash", {"emulator_layers": 2, "share": True, "tie_shared": False, **CALIB}),
    ("scaleot", {"alpha": 0.0, "beta": 0.5, **CALIB}),  # SRC only: harmonizers are weights, no plan holds them
    ("gradot", {"param_budget": 0.3, **CALIB}),
    ("gradot", {"param_budget": 0.3, "scoring": "magnitude"}),
])
def test_apply_alone_rebuilds_the_package_from_its_plan(method, settings, saved_model, text_file, tmp_path):
    """A manifest's plan applied alone to the base model (no calibration, no inputs) computes what the
    built emulator computes."""
    path, _ = saved_model("llama", 6)
    package = emulate(str(path), tmp_path / "emu", method=method, adapter_layers="1,1", calibration=text_file,
                      **settings)
    m = read_manifest(package)
    base, _ = load_model(str(path))
    rebuilt = get_builder(method).apply(base, get_family(base), Split.from_dict(m["split"]), m["plan"]).eval()
    x = torch.randint(4, 120, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(rebuilt(x).logits, load_emulator(package).model(x).logits, atol=1e-6)


def test_scaleot_apply_installs_the_harmonizers_its_plan_learned(saved_model, text_file):
    path, _ = saved_model("llama", 6)
    model, tok = load_model(str(path))
    family, split = get_family(model), make_split(6, "1,1")
    builder = get_builder("scaleot")
    inputs = BuildInputs(calibration=text_file, tokenizer=tok)
    plan = builder.plan(model, family, split, builder.make_config(**METHODS["scaleot"]), inputs)
    learned = inputs.learned["harmonizers"]
    assert sorted(learned) == plan["replaced"] and plan["replaced"]
    emulator = builder.apply(model, family, split, plan, inputs)
    layers = get_layers(emulator, family)
    assert all(layers[i] is learned[i] for i in plan["replaced"])


def test_calibration_settings_are_declared_once():
    """Every calibrated method's config has the four settings, flat, with CalibrationSettings' types and
    its rules (one refusal message for all), at the method's own defaults."""
    shared = typing.get_type_hints(CalibrationSettings)
    assert list(shared) == ["seq_len", "num_sequences", "batch_size", "seed"]
    calibrated = [m for m in available_methods() if get_builder(m).needs_calibration]
    assert sorted(calibrated) == ["crash", "distill", "gradot", "scaleot"]
    defaults = {}
    for method in calibrated:
        builder = get_builder(method)
        hints = typing.get_type_hints(builder.config_cls)
        assert {name: hints[name] for name in shared} == shared, method
        config = builder.make_config()
        assert not hasattr(config, "calibration"), method  # no second copy (GradOT's old CalibrationConfig)
        defaults[method] = CalibrationSettings.of(config)
        for name in ("seq_len", "num_sequences", "batch_size"):
            for bad in (0, -3, "abc", 2.5, True):
                with pytest.raises(OffsiteError, match=f"calibration {name} must be a positive integer"):
                    builder.make_config(**{name: bad})
        assert CalibrationSettings.of(builder.make_config(seq_len=64, seed=3)) == dataclasses.replace(
            defaults[method], seq_len=64, seed=3)
    assert defaults["distill"].num_sequences == 256 and defaults["crash"].batch_size == 8  # each its own
    assert defaults["scaleot"].batch_size == 4 and defaults["gradot"].num_sequences == 64


def test_a_build_tokenises_the_calibration_text_once(saved_model, text_file, monkeypatch):
    """OT-KD reads the windows while planning (teacher targets) and again while training."""
    import offsite.emulator.inputs as inputs_module

    calls = []
    real = inputs_module.load_calibration
    monkeypatch.setattr(inputs_module, "load_calibration", lambda *a: calls.append(a[2]) or real(*a))
    path, _ = saved_model("llama", 6)
    model, tok = load_model(str(path))
    builder = get_builder("distill")
    config = builder.make_config(**METHODS["distill"])
    plan, _ = builder.build(model, get_family(model), make_split(6, "1,1"), config,
                            BuildInputs(calibration=text_file, tokenizer=tok))
    assert calls == ["distill"] and plan["distill"]["steps"] == 2 and list(plan)[-1] == "distill"


def test_the_registry_refuses_duplicates_and_strangers():
    from offsite.emulator.base import register

    with pytest.raises(ValueError, match="'uniform' is already registered"):
        @register
        class Impostor(EmulatorBuilder):
            name = "uniform"
            config_cls = dict
    with pytest.raises(TypeError, match="EmulatorBuilder subclass"):
        register(dict)
    with pytest.raises(TypeError, match="non-empty name"):
        @register
        class Nameless(EmulatorBuilder):
            config_cls = dict
    assert type(get_builder("uniform")).__name__ != "Impostor"
