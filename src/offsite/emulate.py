"""Workflow: base model -> emulator package (model owner side)."""

from __future__ import annotations

import time
from pathlib import Path

from .artifacts import check_finite, guard_output, unique_state_dict
from .disclosure import disclose, fingerprint_middle, guard_middle
from .emulator import get_builder
from .families import count_parameters, describe, get_family
from .identity import model_identity
from .loading import load_model
from .package import save_emulator
from .split import make_split


def emulate(model: str, out, method: str = "uniform", adapter_layers="2,2", dtype: str = "auto",
            calibration=None, overwrite: bool = False, allow_verbatim_middle: bool = False, sign_key=None,
            **method_settings) -> Path:
    """Build an emulator package from a base model.

    Args:
        model: base model folder or hub id.
        out: destination folder (must not exist or be empty unless ``overwrite``).
        method: registered emulator method (``offsite emulate --help`` lists them).
        adapter_layers: ``"a,b"`` (first a, last b layers) or ``"idx:i,j,..."``.
        dtype: dtype to load the base model in.
        calibration: public calibration text file, for methods that need one.
        overwrite: replace ``out`` if it exists.
        allow_verbatim_middle: write the package even if middle layers leave verbatim (see
            :mod:`offsite.disclosure`); only for packages that are never shipped (full fine-tuning).
        sign_key: Ed25519 private key file (``offsite keygen``) to sign the package with.
        **method_settings: the method's own settings (e.g. ``emulator_layers=8``).

    Returns:
        The package folder.
    """
    started = time.time()
    builder = get_builder(method)
    config = builder.make_config(**method_settings)
    inputs = [model, calibration]
    guard_output(Path(out), "emulator", overwrite, inputs)  # refuse a bad --out before minutes of work
    base, tokenizer = load_model(model, dtype=dtype)
    family = get_family(base)
    split = make_split(base.config.num_hidden_layers, adapter_layers)
    check_finite(unique_state_dict(base), f"base model {model}")
    identity = model_identity(base, model, loaded_from_files=True)
    full_params = count_parameters(base)

    before = fingerprint_middle(base, family, split)  # now: builders edit the base model in place
    plan, emulator = builder.build(base, family, split, config, calibration=calibration, tokenizer=tokenizer)
    disclosure = disclose(before, emulator, family, split, plan)
    disclosure["overridden"] = guard_middle(disclosure, builder, config, allow=allow_verbatim_middle)
    check_finite(unique_state_dict(emulator), f"the {method} emulator built from {model}")

    record = {
        "base": identity,
        "family": describe(family)["model_type"],
        "split": split.to_dict(),
        "method": method,
        "config": vars(config),
        "plan": plan,
        "parameters": {"full": full_params, "emulator": count_parameters(emulator)},
        "disclosure": disclosure,
    }
    settings = {"command": "emulate", "model": model, "method": method, "adapter_layers": str(adapter_layers),
                "dtype": dtype, "calibration": str(calibration) if calibration else None,
                "allow_verbatim_middle": allow_verbatim_middle, **vars(config)}
    return save_emulator(out, emulator, tokenizer, record, settings, overwrite=overwrite, inputs=inputs,
                         sign_key=sign_key, run={"seconds": round(time.time() - started, 2)})
