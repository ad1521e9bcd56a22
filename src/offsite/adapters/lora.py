"""LoRA (PEFT) on the adapter layers of an emulator."""

from __future__ import annotations

from ..core.errors import OffsiteError
from ..families import Family


def require_peft():
    try:
        import peft  # noqa: F401
    except ImportError:
        raise OffsiteError("LoRA needs PEFT: pip install 'offsite[lora]'") from None


def wrap_lora(model, family: Family, positions: list, cfg):
    """Wrap ``model`` with LoRA restricted to the decoder layers at ``positions``.

    ``fan_in_fan_out`` is set for GPT-2's Conv1D, whose weights are stored ``[in, out]``.
    """
    require_peft()
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                        target_modules=cfg.lora_targets or family.lora_targets,
                        layers_to_transform=list(positions), layers_pattern=family.layers_attr,
                        fan_in_fan_out=family.conv1d, task_type="CAUSAL_LM")
    return get_peft_model(model, config)
