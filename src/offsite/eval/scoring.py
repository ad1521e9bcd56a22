"""Multiple-choice scoring by log-likelihood, done the way lm-evaluation-harness (>= 0.4) does it.

Request encoding (mirrors lm-eval's ``HFLM`` so that ``acc``/``acc_norm`` agree with it):

* The continuation of a choice is ``" " + choice`` (lm-eval's ``target_delimiter``).
* Trailing whitespace of the context moves to the front of the continuation; ``context +
  continuation`` and ``context`` are encoded separately and the continuation tokens are the joint
  encoding minus its first ``len(context_tokens)`` tokens. The model input is always
  ``context_tokens + continuation_tokens``.
* The tokenizer's default special tokens are used (a BOS if it adds one) unless the string already
  starts with the BOS text. An empty context becomes the prefix token (BOS, else EOS).
* ``max_length``: config ``n_positions`` / ``max_position_embeddings`` / ``n_ctx``, else the
  tokenizer's ``model_max_length``, else 2048. Longer requests are left-truncated: the model sees
  ``(context + continuation)[-(max_length + 1):][:-1]``.

Two execution paths, equal up to float rounding (~1e-5):

* **flat** -- each (context, continuation) pair is one row; rows of all questions are sorted by
  length and batched with right padding, which a causal model never attends to (so no mask).
* **shared** -- per question, the context minus its last token runs once with the KV cache, the
  cache is repeated for the n choices, and ``[last context token] + continuation[:-1]`` runs as one
  batch of n rows (all choices of a question in one batch, whatever ``batch_size`` says). This
  saves n - 1 context passes on long contexts (RACE, BoolQ, SciQ with support).

``shared_context="auto"`` (default) takes the shared path when the context has at least
``shared_min_tokens`` (64) tokens and needs no truncation, else the flat path (short prompts batch
better across questions on CPU). A model whose forward gives no repeatable cache is scored flat.

Metrics (lm-eval's definitions): ``acc`` = argmax of the summed log-likelihood is the gold index;
``acc_norm`` = argmax of log-likelihood / ``len(choice)`` in characters (no leading space). Ties go
to the lowest index, like ``numpy.argmax``. ``*_stderr`` = sample std / sqrt(n), as lm-eval reports.
"""

from __future__ import annotations

import contextlib
import inspect
import math

import torch

from ..core.device import model_device
from ..core.errors import OffsiteError
from ..core.progress import bar as progress_bar
from ..data.batching import plan_batches, resolve_batch_tokens
from ..data.token_loss import target_logprobs
from ..families.kv_cache import cache_kwargs, returned_cache

DEFAULT_MAX_LENGTH = 2048  # lm-eval's fallback when neither config nor tokenizer says
_TOKENIZER_INFINITY = 1e29  # HF's "no limit" model_max_length is int(1e30)


@contextlib.contextmanager
def eval_mode(model):
    """``model.eval()`` + ``torch.no_grad()`` for the block, restoring the training flag afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def resolve_max_length(model, tokenizer) -> int:
    """The context length lm-eval would use for ``model``: config, then tokenizer, then 2048."""
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, attr, None)
        if value is not None:
            return int(value)
    limit = getattr(tokenizer, "model_max_length", None)
    if limit is not None and limit < _TOKENIZER_INFINITY:
        return int(limit)
    return DEFAULT_MAX_LENGTH


def prefix_token_id(tokenizer) -> int:
    """Token that conditions an empty context: BOS, else EOS (lm-eval's ``prefix_token_id``)."""
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token is None:
        raise OffsiteError("the tokenizer has neither a BOS nor an EOS token; an empty context cannot be scored")
    return int(token)


def tok_encode(tokenizer, text: str, add_special_tokens: bool | None = None) -> list[int]:
    """Encode like lm-eval's ``tok_encode``: tokenizer defaults unless ``text`` already starts with BOS."""
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    # lm-eval skips special tokens when the string already carries the prefix token's text.
    if add_special_tokens is None and prefix is not None and text.startswith(tokenizer.decode([prefix])):
        add_special_tokens = False
    kwargs = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
    return list(tokenizer.encode(text, **kwargs))


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Split ``context + continuation`` into (context tokens, continuation tokens) as lm-eval does.

    Returns:
        ``(context_ids, continuation_ids)``; the model input is their concatenation.
    """
    if context == "":
        cont = tok_encode(tokenizer, continuation, add_special_tokens=False)
        prefix = prefix_token_id(tokenizer)
        if cont and cont[0] == prefix:  # the continuation already starts with the prefix token
            return cont[:1], cont[1:]
        return [prefix], cont
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        # Word-boundary whitespace belongs with the following word for BPE tokenizers.
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tok_encode(tokenizer, context + continuation)
    ctx = tok_encode(tokenizer, context)
    return ctx, whole[len(ctx):]


def _score_rows(model, ids: torch.Tensor, ends: list[int], conts: list[list[int]], logits: str = "scored",
                **forward) -> list[tuple[float, bool]]:
    """Per row: (sum of log-probs of ``conts[r]``, whether every token is the argmax).

    ``ids`` is ``[rows, seq]``; row r predicts ``conts[r]`` at positions ``ends[r] - len(conts[r])`` up
    to ``ends[r] - 1``. Only those positions go through the LM head (:mod:`offsite.data.token_loss`),
    unless ``logits="full"``; ``forward`` are more arguments of the forward pass (a KV cache).
    """
    rows = [r for r, cont in enumerate(conts) for _ in cont]
    cols = [c for end, cont in zip(ends, conts) for c in range(end - len(cont), end)]
    flat = [t for cont in conts for t in cont]
    as_tensor = lambda xs: torch.tensor(xs, dtype=torch.long, device=ids.device)  # noqa: E731
    logp, greedy = target_logprobs(model, ids, as_tensor(rows), as_tensor(cols), as_tensor(flat), logits, **forward)
    sizes = [len(cont) for cont in conts]
    sums = [lp.double().sum() for lp in logp.split(sizes)]
    # One transfer per batch: on a GPU a float()/bool() per row would wait on the device each time.
    return list(zip(torch.stack(sums).tolist(), torch.stack([g.all() for g in greedy.split(sizes)]).tolist()))


@torch.no_grad()
def score_token_pairs(model, pairs: list[tuple[list[int], list[int]]], batch_size: int = 8,
                      max_length: int = DEFAULT_MAX_LENGTH, pbar=None, max_batch_tokens: int = 0,
                      logits: str = "scored") -> list:
    """Flat path: ``[(loglikelihood, is_greedy)]`` of (context ids, continuation ids) pairs, in order.

    Args:
        pairs: token-id pairs as made by :func:`encode_pair`; continuations must be non-empty.
        max_length: model context; longer inputs are left-truncated to it.
        pbar: optional tqdm bar advanced by one per pair.
        max_batch_tokens: padded tokens per batch instead of ``batch_size`` rows, 0 = off (:mod:`.batching`).
        logits: ``"scored"`` (the LM head on the continuation positions only) or ``"full"`` (every
            position, the model's own forward); see :mod:`offsite.data.token_loss`.
    """
    for ctx, cont in pairs:
        if not cont:
            raise ValueError("empty continuation: the joint encoding absorbed the choice into the context")
        if len(cont) > max_length:
            raise OffsiteError(f"a continuation of {len(cont)} tokens exceeds the model's context of "
                               f"{max_length} tokens; shorten the choices or use a longer-context model")
    device = model_device(model)
    # Longest first: the first batch shows the worst-case memory straight away, and similar
    # lengths share a batch so little compute is spent on padding.
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    results: list = [None] * len(pairs)
    widths = [min(len(pairs[i][0]) + len(pairs[i][1]), max_length + 1) - 1 for i in order]
    for start, stop in plan_batches(widths, batch_size, max_batch_tokens):
        chunk = order[start:stop]
        inputs = [(pairs[i][0] + pairs[i][1])[-(max_length + 1):][:-1] for i in chunk]
        width = max(len(x) for x in inputs)
        ids = torch.zeros((len(chunk), width), dtype=torch.long)  # right padding with id 0
        for row, seq in enumerate(inputs):
            ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        scored = _score_rows(model, ids.to(device), [len(x) for x in inputs], [pairs[i][1] for i in chunk], logits,
                             use_cache=False)
        for i, res in zip(chunk, scored):
            results[i] = res
        if pbar is not None:
            pbar.update(len(chunk))
    return results


def _keep_last_logit(model) -> dict:
    # The prefix pass needs no logits; HF causal LMs that accept ``logits_to_keep`` skip the
    # [seq, vocab] projection when asked for only the last position.
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


@torch.no_grad()
def score_shared_context(model, ctx: list[int], conts: list[list[int]],
                         logits: str = "scored") -> list[tuple[float, bool]] | None:
    """Shared path: one KV-cached pass over the context, then all continuations in one batch.

    Args:
        ctx: context token ids (``len(ctx) + max(len(c)) <= max_length + 1``: no truncation here).
        conts: continuation token ids of each choice, all non-empty.
        logits: ``"scored"`` or ``"full"``, as in :func:`score_token_pairs`.

    Returns:
        ``[(loglikelihood, is_greedy)]`` per continuation, or ``None`` when the model gives no cache
        that can be repeated over the batch (the caller then uses the flat path).
    """
    device = model_device(model)
    cache = None
    if len(ctx) > 1:
        prefix = torch.tensor([ctx[:-1]], dtype=torch.long, device=device)  # [1, len(ctx) - 1]
        out = model(input_ids=prefix, use_cache=True, **_keep_last_logit(model))
        cache = returned_cache(out)
        if cache is None or not hasattr(cache, "batch_repeat_interleave"):
            return None
        if len(conts) > 1:
            cache.batch_repeat_interleave(len(conts))  # [1, ...] -> [n_choices, ...] in place
    rows = [[ctx[-1]] + cont[:-1] for cont in conts]
    width = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)  # right padding: never attended to
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    # Positions continue from the cache length, so no position ids or mask are needed.
    return _score_rows(model, ids.to(device), [len(r) for r in rows], conts, logits, **cache_kwargs(model, cache),
                       use_cache=cache is not None)


def loglikelihood(model, tokenizer, requests, batch_size: int = 8, max_length: int | None = None,
                  progress: bool = False) -> list[tuple[float, bool]]:
    """Log-likelihood of each continuation given its context (lm-eval's ``loglikelihood``).

    ``requests`` are ``[(context, continuation)]`` strings, the leading space included in the
    continuation (e.g. ``("Question: 2+2?\\nAnswer:", " 4")``). Returns ``[(sum of log-probs of the
    continuation tokens, whether all of them are the greedy argmax)]``.
    """
    max_length = max_length or resolve_max_length(model, tokenizer)
    pairs = [encode_pair(tokenizer, c, x) for c, x in requests]
    with eval_mode(model), progress_bar(len(pairs), "loglikelihood", "pair", enabled=progress) as bar:
        return score_token_pairs(model, pairs, batch_size, max_length, pbar=bar)


def _argmax(values) -> int:
    # max() returns the first maximal item: ties keep the lowest index, like numpy.argmax.
    return max(range(len(values)), key=values.__getitem__)


def _mean_stderr(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n if n else float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else float("nan")  # sample variance
    return mean, math.sqrt(var / n) if n > 1 else float("nan")


def score_multiple_choice(model, tokenizer, examples, batch_size: int = 8, shared_context="auto",
                          shared_min_tokens: int = 64, max_length: int | None = None,
                          progress: bool = True, desc: str = "multiple choice", max_batch_tokens=None,
                          logits: str = "scored") -> dict:
    """Score multiple-choice questions; ``acc`` and ``acc_norm`` as lm-eval computes them.

    Args:
        examples: iterable of dicts with ``context`` (prompt), ``choices`` (strings without the
            leading space), ``gold`` (int) and optionally ``id``.
        shared_context: ``True`` (KV-cache the context where possible), ``False`` (flat only) or
            ``"auto"`` (shared for contexts of at least ``shared_min_tokens`` tokens).
        max_batch_tokens: token budget of the flat path's batches: None = auto (a budget on CUDA,
            ``batch_size`` rows elsewhere), 0 = off, N = N tokens (see :mod:`.batching`).
        logits: ``"scored"`` (the LM head on the answer tokens only) or ``"full"``; equal up to rounding.

    Returns:
        ``{"acc", "acc_norm", "acc_stderr", "acc_norm_stderr", "n", "details": [per question:
        {"id", "gold", "pred", "pred_norm", "loglik": [...], "acc", "acc_norm"}]}``.
    """
    if shared_context not in (True, False, "auto"):
        raise OffsiteError(f"shared_context must be True, False or 'auto', got {shared_context!r}")
    examples = list(examples)
    if any(not ex["choices"] for ex in examples):
        raise OffsiteError("every multiple-choice question needs at least one choice")
    max_length = max_length or resolve_max_length(model, tokenizer)
    budget = resolve_batch_tokens(max_batch_tokens, model_device(model))
    encoded = [[encode_pair(tokenizer, ex["context"], " " + ch) for ch in ex["choices"]] for ex in examples]
    scores: list = [[] for _ in examples]
    flat, shared = [], []
    for q, pairs in enumerate(encoded):
        ctx_len = len(pairs[0][0])
        use_shared = (shared_context is True or (shared_context == "auto" and ctx_len >= shared_min_tokens)) \
            and ctx_len + max(len(c) for _, c in pairs) <= max_length + 1 \
            and len({tuple(ctx) for ctx, _ in pairs}) == 1  # no truncation, one common context
        (shared if use_shared else flat).append(q)
    total = sum(len(pairs) for pairs in encoded)
    with eval_mode(model), progress_bar(total, desc, "choice", enabled=progress) as bar:
        for q in shared:
            scores[q] = score_shared_context(model, encoded[q][0][0], [c for _, c in encoded[q]], logits)
            if scores[q] is None:
                scores[q] = []
                flat.append(q)  # no usable cache on this model: score it flat below
            bar.update(len(scores[q]))
        # Flat questions are pooled so that batches mix questions of similar length.
        pooled = [(q, pair) for q in flat for pair in encoded[q]]
        flat_scores = score_token_pairs(model, [p for _, p in pooled], batch_size, max_length, pbar=bar,
                                        max_batch_tokens=budget, logits=logits)
        for (q, _), res in zip(pooled, flat_scores):
            scores[q].append(res)
    details = []
    for ex, res in zip(examples, scores):
        lls = [ll for ll, _ in res]
        pred = _argmax(lls)
        # lm-eval normalises by the character length of the choice without the delimiter.
        pred_norm = _argmax([ll / max(1, len(ch)) for ll, ch in zip(lls, ex["choices"])])
        details.append({"id": ex.get("id"), "gold": ex["gold"], "pred": pred, "pred_norm": pred_norm,
                        "loglik": lls, "acc": float(pred == ex["gold"]),
                        "acc_norm": float(pred_norm == ex["gold"])})
    acc, acc_se = _mean_stderr([d["acc"] for d in details])
    acc_norm, acc_norm_se = _mean_stderr([d["acc_norm"] for d in details])
    return {"acc": acc, "acc_norm": acc_norm, "acc_stderr": acc_se, "acc_norm_stderr": acc_norm_se,
            "n": len(details), "details": details}
