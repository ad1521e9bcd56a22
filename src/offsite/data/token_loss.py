"""Next-token losses and log-probabilities computed only at the positions that are scored.

A causal LM's forward projects every position through the LM head: ``(batch, seq, hidden) ->
(batch, seq, vocab)``. Fine-tuning on answers (``mc``, ``prompt``) scores only the tokens whose
label is not -100, and multiple-choice scoring only the continuation tokens, so almost all of those
logits are made, kept for backward and thrown away. At SmolLM2's 49,152-token vocabulary a batch of
8 SciQ questions spends more memory on them than on the weights. Here the backbone runs once
(:mod:`offsite.families.head`), the hidden states of the scored positions are gathered, and only
those go through the head, ``(n, hidden) -> (n, vocab)``, with the loss in fp32.

Where every position counts (``text`` blocks, perplexity windows) the head and the loss run over
chunks of at most :func:`chunk_positions` positions. Under autograd each chunk is checkpointed
(``torch.utils.checkpoint``): its logits are dropped after the forward pass and made again in
backward, one chunk at a time, which costs one more head projection and bounds memory to a chunk.

Same numbers as before: the loss is cross-entropy on fp32 logits averaged over the scored tokens,
HF's ``ForCausalLMLoss`` (mean, ignore -100; NaN over no token); values and gradients differ from
the full-logits path by float rounding only (a matmul of another shape sums in another order;
``tests/test_token_loss.py`` compares both on several families).

``logits="full"`` (``FinetuneConfig.logits``, the ``logits`` argument of the eval scorers) keeps
the full-logits path: the model's own forward with its own loss. It is also what runs when the
forward cannot be split (:func:`offsite.families.head.split_family` is None).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..core.errors import OffsiteError
from ..families.head import final_hidden, project, split_family
from .records import IGNORE

MODES = ("scored", "full")
"""``scored``: the head only where a token is scored (default); ``full``: every position, as HF does."""
LOGIT_ELEMENTS = 2 ** 25
"""Logits per head chunk (positions x vocabulary): 128 MiB in fp32, 2,730 positions at 12k tokens,
682 at SmolLM2's 49k, 262 at 128k; the log-softmax beside them doubles it."""


def check_mode(logits: str) -> str:
    """``logits`` if it is one of :data:`MODES`, else a clear :class:`OffsiteError`."""
    if logits not in MODES:
        raise OffsiteError(f"logits must be one of {', '.join(MODES)}, got {logits!r}")
    return logits


def chunk_positions(vocab: int, elements: int | None = None) -> int:
    """Positions per head chunk so that one chunk holds at most ``elements`` logits (at least 1)."""
    return max(1, (elements or LOGIT_ELEMENTS) // max(1, vocab))


@dataclasses.dataclass
class TokenLosses:
    """Cross-entropy of each scored token of a batch.

    Attributes:
        losses: ``(n,)`` fp32 loss of each scored token, row-major order (row, then position).
        rows: ``(n,)`` batch row of each.
        anchor: a tensor of the forward pass (the gathered hidden states or the logits), so that a
            shard with no scored token can still run backward through a zero (``anchor.sum() * 0``).
    """

    losses: torch.Tensor
    rows: torch.Tensor
    anchor: torch.Tensor

    def mean(self) -> torch.Tensor:
        """The token mean, HF's causal-LM loss (NaN when nothing is scored, as HF's 0 / 0)."""
        return self.losses.sum() / self.losses.numel()

    def per_example(self, batch: int) -> torch.Tensor:
        """Each row's mean token loss, ``(batch,)`` (0 for a row with no scored token)."""
        sums = torch.zeros(batch, dtype=self.losses.dtype, device=self.losses.device).index_add(0, self.rows,
                                                                                               self.losses)
        counts = torch.bincount(self.rows, minlength=batch).clamp(min=1)
        return sums / counts


def splittable(model):
    """``(causal LM, family)`` whose forward :mod:`offsite.families.head` can split, or ``(model, None)``.

    A PEFT LoRA wrapper (the audit's LoRA attack trains through one) is unwrapped: LoRA lives in the
    modules of the causal LM it was injected into, and the wrapper's forward only calls that model's.
    Prompt-learning PEFT methods change the inputs, so they keep the full path.
    """
    peft_config = getattr(model, "active_peft_config", None)
    if peft_config is not None and not peft_config.is_prompt_learning:
        model = model.get_base_model()
    return model, split_family(model)


def scored_positions(labels: torch.Tensor) -> tuple:
    """Where a token is scored: ``(rows, cols, targets)``, each ``(n,)``.

    Position ``cols[i]`` of row ``rows[i]`` predicts ``targets[i]`` = ``labels[row, col + 1]``
    (the causal shift); ``labels`` is ``(batch, seq)`` with -100 where nothing is scored.
    """
    shifted = labels[:, 1:]
    rows, cols = (shifted != IGNORE).nonzero(as_tuple=True)
    return rows, cols, shifted[rows, cols]


def token_losses(model, batch: dict, logits: str = "scored", chunk: int | None = None) -> TokenLosses:
    """Per-token cross-entropy of the scored tokens of ``batch`` (in fp32).

    Args:
        model: an HF causal LM.
        batch: ``input_ids``, ``attention_mask`` and ``labels``, each ``(batch, seq)``.
        logits: ``"scored"`` (head on the scored positions only) or ``"full"``.
        chunk: positions per head chunk (default :func:`chunk_positions` of the vocabulary).
    """
    rows, cols, targets = scored_positions(batch["labels"])
    lm, family = splittable(model) if check_mode(logits) == "scored" else (model, None)
    if family is None:
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        picked = full[rows, cols]  # (n, vocab)
        return TokenLosses(F.cross_entropy(picked.float(), targets, reduction="none"), rows, full)
    hidden = final_hidden(lm, family, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          use_cache=False)[rows, cols]  # (n, hidden)
    chunk = chunk or chunk_positions(lm.get_output_embeddings().weight.shape[0])

    def loss_of(h, t):
        return F.cross_entropy(project(lm, family, h).float(), t, reduction="none")

    if hidden.shape[0] <= chunk:
        return TokenLosses(loss_of(hidden, targets), rows, hidden)
    parts = []
    for start in range(0, hidden.shape[0], chunk):
        h, t = hidden[start:start + chunk], targets[start:start + chunk]
        # Checkpointed: this chunk's logits are freed now and made again in backward (no dropout, no RNG).
        parts.append(checkpoint(loss_of, h, t, use_reentrant=False, preserve_rng_state=False)
                     if torch.is_grad_enabled() else loss_of(h, t))
    return TokenLosses(torch.cat(parts), rows, hidden)


def mean_loss(model, batch: dict, logits: str = "scored", chunk: int | None = None) -> tuple:
    """The batch's token-mean loss and an anchor tensor (see :class:`TokenLosses`).

    With ``logits="full"`` (or a model whose forward cannot be split) this is exactly the path
    offsite always took: ``model(**batch)`` and HF's own loss, its logits the anchor.

    Returns:
        ``(loss, anchor)``: a scalar tensor, and a tensor of the forward pass.
    """
    if check_mode(logits) == "full" or splittable(model)[1] is None:
        out = model(**batch)
        return out.loss, out.logits
    scored = token_losses(model, batch, logits, chunk)
    return scored.mean(), scored.anchor


@torch.no_grad()
def target_logprobs(model, input_ids: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, targets: torch.Tensor,
                    logits: str = "scored", chunk: int | None = None, **forward) -> tuple:
    """Log-probability of ``targets`` at given positions, and whether each is the argmax.

    Args:
        input_ids: ``(batch, seq)``.
        rows, cols, targets: ``(n,)`` each: position ``cols[i]`` of row ``rows[i]`` predicts ``targets[i]``.
        logits: ``"scored"`` or ``"full"`` (:data:`MODES`).
        chunk: positions per head chunk (default :func:`chunk_positions`).
        **forward: more arguments of the forward pass (``past_key_values``, ``use_cache``).

    Returns:
        ``(logp, greedy)``: ``(n,)`` fp32 log-probabilities (log-softmax in fp32 whatever the model
        dtype: bf16 sums lose digits that decide near-ties) and ``(n,)`` bools.
    """
    lm, family = splittable(model) if check_mode(logits) == "scored" else (model, None)
    if family is None:
        states = model(input_ids=input_ids, **forward).logits[rows, cols]  # (n, vocab)
        head, vocab = (lambda x: x), states.shape[-1]
    else:
        states = final_hidden(lm, family, input_ids=input_ids, **forward)[rows, cols]  # (n, hidden)
        head, vocab = (lambda x: project(lm, family, x)), lm.get_output_embeddings().weight.shape[0]
    chunk = chunk or chunk_positions(vocab)
    logp, greedy = [], []
    for start in range(0, states.shape[0], chunk):
        lp = torch.log_softmax(head(states[start:start + chunk]).float(), dim=-1)  # (chunk, vocab)
        t = targets[start:start + chunk]
        logp.append(lp.gather(1, t[:, None]).squeeze(1))
        greedy.append(lp.argmax(-1) == t)
    if not logp:
        return states.new_zeros(0, dtype=torch.float32), torch.zeros(0, dtype=torch.bool, device=states.device)
    return torch.cat(logp), torch.cat(greedy)
