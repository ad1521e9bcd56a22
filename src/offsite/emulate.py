"""Workflow: base model -> emulator package (model owner side)."""

from __future__ import annotations

import time
from pathlib import Path

from .emulator import get_builder
from .families import count_parameters, describe, get_family
from .identity import model_identity
from .loading import load_model
from .package import save_emulator
from .split import make_split


def emulate(model: str, out, method: str = "uniform", adapter_layers="2,2", dtype: str = "auto",
            calibration=None, overwrite: bool = False, **method_settings) -> Path:
    """Build an emulator package from a base model.

    Args:
        model: base model folder or hub id.
        out: destination folder (must not exist or be empty unless ``overwrite``).
        method: registered emulator method (``offsite emulate --help`` lists them).
        adapter_layers: ``"a,b"`` (first a, last b layers) or ``"idx:i,j,..."``.
        dtype: dtype to load the base model in.
        calibration: public calibration text file, for methods that need one.
        overwrite: replace ``out`` if it exists.
        **method_settings: the method's own settings (e.g. ``emulator_layers=8``).

    Returns:
        The package folder.
    """
    started = time.time()
    builder = get_builder(method)
    config = builder.make_config(**method_settings)
    base, tokenizer = load_model(model, dtype=dtype)
    family = get_family(base)
    split = make_split(base.config.num_hidden_layers, adapter_layers)
    identity = model_identity(base, model)
    full_params = count_parameters(base)

    plan, emulator = builder.build(base, family, split, config, calibration=calibration, tokenizer=tokenizer)

    record = {
        "base": identity,
        "family": describe(family)["model_type"],
        "split": split.to_dict(),
        "method": method,
        "config": vars(config),
        "plan": plan,
        "parameters": {"full": full_params, "emulator": count_parameters(emulator)},
    }
    settings = {"command": "emulate", "model": model, "method": method, "adapter_layers": str(adapter_layers),
                "dtype": dtype, "calibration": str(calibration) if calibration else None, **vars(config),
                "seconds": round(time.time() - started, 2)}
    return save_emulator(out, emulator, tokenizer, record, settings, overwrite=overwrite)
