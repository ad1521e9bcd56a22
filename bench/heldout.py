"""Held-apart text for the GradOT benchmarks: calibration and WikiText-2 windows, and an emulator's LM loss.

The calibration text (War and Peace) and the judging text (WikiText-2 validation and test) are
disjoint, so a selection is never judged on the tokens that scored it.
"""

from __future__ import annotations

from pathlib import Path


def windows(data_dir, tokenizer, calibration: int, held: int, seed: int = 2) -> tuple:
    """``(calibration batches, {"valid": batches, "test": batches})``, 128-token windows in batches of 8."""
    from offsite.calibration import calibration_batches

    data = Path(data_dir)
    calib = calibration_batches(data / "lm/war_and_peace/war_and_peace_pg2600.txt.gz", tokenizer, seq_len=128,
                                num_sequences=calibration, batch_size=8)
    judged = {name: calibration_batches(data / f"lm/wikitext-2-raw/wiki.{name}.raw.gz", tokenizer, seq_len=128,
                                        num_sequences=held, batch_size=8, seed=seed)
              for name in ("valid", "test")}
    return calib, judged


def lm_loss(model, batches) -> float:
    """Mean next-token cross-entropy of ``model`` over ``batches`` (``LongTensor (batch, seq)`` each)."""
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        total = sum(float(F.cross_entropy(model(input_ids=b).logits[:, :-1].flatten(0, 1), b[:, 1:].flatten(),
                                          reduction="sum")) for b in batches)
    return total / sum(b[:, 1:].numel() for b in batches)
