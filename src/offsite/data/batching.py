"""Batches of log-likelihood rows: a fixed number of rows, or as many as a token budget holds.

:func:`offsite.eval.scoring.score_token_pairs` sorts its rows longest first and right-pads every
batch to its longest row, so a batch of ``rows`` rows of width ``w`` costs ``rows * w`` token
positions of compute and activations (the logits are made only at the continuation tokens, in
chunks: :mod:`offsite.data.token_loss`; with ``logits="full"`` they are ``rows * w * vocab``). A fixed
``batch_size`` suits the CPU, which is busy whatever the batch; on a GPU one fixed count is too
small for short rows (idle cores) and too large for long ones (out of memory). A token budget fixes
the product instead.

Rule for a budget ``B`` (``max_batch_tokens``): a batch starts at the next row and takes the rows
after it while ``rows * (widest row so far) <= B``; a batch has at least one row, so a row wider
than ``B`` is scored alone, and ``batch_size`` no longer caps the rows. With rows sorted longest
first the widest row is the first one, so every batch is ``floor(B / w_first)`` rows, fewer at the end.

Right padding is never attended to by a causal model, so the batching changes speed and memory
only: each row's log-likelihood is the same up to the float rounding of differently shaped kernels.

``max_batch_tokens``: None = auto (:data:`DEFAULT_CUDA_BATCH_TOKENS` on CUDA, off elsewhere),
0 = off (``batch_size`` rows per batch), N > 0 = a budget of N tokens.
"""

from __future__ import annotations

import torch

from ..core.errors import OffsiteError

DEFAULT_CUDA_BATCH_TOKENS = 8192
"""Auto budget on CUDA: 8192 positions keep the logits of a 128k-token vocabulary at 2 GB (bf16) to
4 GB (fp32), which fits beside a 7B model in bf16 on a 24 GB card, and keep a large GPU far busier
than 8 short rows would."""


def resolve_batch_tokens(max_batch_tokens, device) -> int:
    """The budget in effect: 0 (off) or a positive token count.

    Args:
        max_batch_tokens: None (auto), 0 (off) or a positive integer.
        device: the model's device; auto gives a budget only on CUDA.

    Raises:
        OffsiteError: a negative or non-integer value.
    """
    if max_batch_tokens is None:
        return DEFAULT_CUDA_BATCH_TOKENS if torch.device(device).type == "cuda" else 0
    if isinstance(max_batch_tokens, bool) or not isinstance(max_batch_tokens, int) or max_batch_tokens < 0:
        raise OffsiteError(f"max_batch_tokens must be an integer >= 0 (0 = off, batches of batch_size rows), "
                           f"got {max_batch_tokens!r}")
    return max_batch_tokens


def plan_batches(widths: list, batch_size: int, max_batch_tokens: int = 0) -> list:
    """Cut rows ``0..n-1`` into consecutive batches.

    Args:
        widths: input length of each row, in scoring order (longest first in practice).
        batch_size: rows per batch when no budget applies (at least 1 is used).
        max_batch_tokens: token budget per batch (padded positions); 0 = none.

    Returns:
        ``[(start, stop), ...]`` half-open row ranges covering every row once, in order.
    """
    size, batches, start = max(1, batch_size), [], 0
    while start < len(widths):
        if not max_batch_tokens:
            stop = min(len(widths), start + size)
        else:
            stop, width = start + 1, widths[start]
            while stop < len(widths) and (stop - start + 1) * max(width, widths[stop]) <= max_batch_tokens:
                width = max(width, widths[stop])
                stop += 1
        batches.append((start, stop))
        start = stop
    return batches
