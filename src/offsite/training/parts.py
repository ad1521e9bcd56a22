"""A micro-batch computed in parts of similar length, so that padding costs neither time nor memory.

A micro-batch is right-padded to its longest example: 8 SciQ questions of 60 to 430 tokens become
``(8, 430)``, and every layer computes and keeps activations for all 3,440 positions although the
questions hold about 900 tokens. Here the rows are sorted by length and cut into parts whose padded
size stays within ``pass_tokens`` (rows x widest row, :func:`offsite.data.batching.plan_batches`'s
rule), each trimmed to its own widest row; the loop runs forward and backward part by part, so
activations of one part are alive at a time.

What trains is unchanged: the same examples make the same optimizer step, and each part's loss is
its share of the micro-batch's token mean (its scored tokens' sum over the micro-batch's count), so
the gradients add up to those of the whole micro-batch up to float rounding. Models with dropout
draw other masks (another order of the same random draws). A part without a scored token is left
out (it adds nothing); a micro-batch without any keeps one part, whose loss is HF's NaN.

``pass_tokens`` (``FinetuneConfig.pass_tokens``): None = auto, :data:`CPU_PASS_TOKENS` on the CPU
(where time is proportional to positions computed) and whole micro-batches on accelerators (where
one wide batch keeps the device busy); 0 = whole micro-batches; N = parts of at most N padded tokens
(a longer example is a part alone).
"""

from __future__ import annotations

import torch

from ..core.errors import OffsiteError
from ..data.batching import plan_batches
from ..data.records import IGNORE

CPU_PASS_TOKENS = 512
"""Auto budget on CPU: matmuls of ~500 rows keep a CPU's cores as busy as wider ones, and SmolLM2's
30 layers keep ~0.7 GB of fp32 activations for 512 positions (vs ~4.6 GB at a padded 8 x 430)."""


def resolve_pass_tokens(pass_tokens, device) -> int:
    """The budget in effect: 0 (whole micro-batches) or a positive token count.

    Raises:
        OffsiteError: a negative or non-integer value.
    """
    if pass_tokens is None:
        return CPU_PASS_TOKENS if torch.device(device).type == "cpu" else 0
    if isinstance(pass_tokens, bool) or not isinstance(pass_tokens, int) or pass_tokens < 0:
        raise OffsiteError(f"pass_tokens must be an integer >= 0 (0 = whole micro-batches), got {pass_tokens!r}")
    return pass_tokens


def split(batch: dict, pass_tokens: int) -> list:
    """Cut a right-padded batch into parts of similar length.

    Args:
        batch: ``input_ids``, ``attention_mask``, ``labels``, each ``(rows, seq)``.
        pass_tokens: padded tokens per part (0: the batch as it is).

    Returns:
        ``[(part, share)]``: each part a batch of the same keys, ``(part rows, part width)``, and
        ``share`` = its scored tokens / the batch's (the factor that turns its token mean into its
        part of the batch's token mean); ``[(batch, 1.0)]`` when nothing is cut.
    """
    counts = (batch["labels"][:, 1:] != IGNORE).sum(1).tolist()
    total = sum(counts)
    if not pass_tokens or not total:
        return [(batch, 1.0)]
    lengths = batch["attention_mask"].sum(1).tolist()
    order = sorted(range(len(lengths)), key=lambda r: -lengths[r])  # longest first, as scoring does
    plan = plan_batches([lengths[r] for r in order], len(order), pass_tokens)
    if len(plan) == 1 and lengths[order[0]] == batch["input_ids"].shape[1]:
        return [(batch, 1.0)]  # one part, already as narrow as it gets
    parts = []
    for start, stop in plan:
        rows = order[start:stop]
        scored = sum(counts[r] for r in rows)
        if scored:
            index = torch.tensor(rows, device=batch["input_ids"].device)
            width = lengths[rows[0]]
            parts.append(({k: v.index_select(0, index)[:, :width] for k, v in batch.items()}, scored / total))
    return parts
