"""Open-answer QA (WebQuestions) scored by exact match of a greedy generation.

Protocol: the prompt is ``"Question: {q}\\nAnswer:"``; the model decodes greedily until it emits a
newline or ``max_new_tokens`` (default 32) tokens, the text before the first newline is the
prediction, and it counts as correct when, after normalisation, it equals *any* gold answer.
Prompts longer than ``max_length - max_new_tokens`` tokens are left-truncated (as lm-eval's
``generate_until`` does).

Normalisation (:func:`normalize_answer`, the SQuAD / lm-eval ``exact_match`` convention): lower
case, ASCII punctuation removed, the articles a/an/the removed, whitespace runs collapsed.

``greedy_match`` (reported next to ``exact_match``) is lm-eval 0.4's own WebQs metric, which is
also what the OT papers' WebQs column measured: the question counts when, for some gold answer,
every token of ``" " + answer`` is the model's argmax given the prompt and the answer's preceding
tokens. lm-eval first drops answers that extend another answer; here every answer is checked.
"""

from __future__ import annotations

import inspect
import re
import string

import torch

from ..core.device import model_device
from ..core.progress import bar as progress_bar
from ..families.kv_cache import cache_name, returned_cache
from .scoring import eval_mode, loglikelihood, resolve_max_length, tok_encode

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, strip punctuation and articles, collapse whitespace."""
    text = text.lower().translate(_PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, answers) -> bool:
    """Whether ``prediction`` equals any of ``answers`` after :func:`normalize_answer`."""
    pred = normalize_answer(prediction)
    return any(pred == normalize_answer(a) for a in answers)


def _first_line(text: str) -> str:
    return text.split("\n", 1)[0].strip()


def greedy_generate(model, tokenizer, prompts, max_new_tokens: int = 32, batch_size: int = 8,
                    max_length: int | None = None, progress: bool = False) -> list[str]:
    """Greedy continuation of each prompt, cut at the first newline.

    Each batch is left-padded (with an attention mask) so that all prompts end at the same position;
    a step-by-step KV-cached loop runs until every row has produced a newline or EOS, or
    ``max_new_tokens`` tokens.

    Args:
        prompts: prompt strings.

    Returns:
        One stripped string per prompt (text before the first newline).
    """
    prompts = list(prompts)
    max_length = max_length or resolve_max_length(model, tokenizer)
    keep = max(1, max_length - max_new_tokens)
    eos = tokenizer.eos_token_id
    device = model_device(model)
    outputs: list[str] = [""] * len(prompts)
    bar = progress_bar(len(prompts), "generate", "prompt", enabled=progress)
    with eval_mode(model), bar:
        for start in range(0, len(prompts), max(1, batch_size)):
            chunk = prompts[start:start + max(1, batch_size)]
            encoded = [tok_encode(tokenizer, p)[-keep:] for p in chunk]
            texts = _greedy_batch(model, tokenizer, encoded, max_new_tokens, eos, device)
            outputs[start:start + len(chunk)] = [_first_line(t) for t in texts]
            bar.update(len(chunk))
    return outputs


def _greedy_batch(model, tokenizer, encoded: list[list[int]], max_new_tokens: int, eos, device) -> list[str]:
    """Greedy decoding of one left-padded batch; returns the raw decoded continuations."""
    width = max(len(e) for e in encoded)
    ids = torch.zeros((len(encoded), width), dtype=torch.long)  # [B, width], pad id 0 is masked out
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, seq in enumerate(encoded):
        ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq):] = 1
    ids, mask = ids.to(device), mask.to(device)
    # Left padding shifts real tokens, so positions must come from the mask, not the column index.
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    takes_positions = "position_ids" in inspect.signature(model.forward).parameters
    cache_arg = cache_name(model)  # once, not per generated token
    new_tokens = [[] for _ in encoded]
    done = [False] * len(encoded)
    cache, step_ids, step_pos = None, ids, positions
    for _ in range(max_new_tokens):
        extra = {"position_ids": step_pos} if takes_positions else {}  # Bloom (ALiBi) reads the mask
        out = model(input_ids=step_ids, attention_mask=mask, use_cache=True, **{cache_arg: cache}, **extra)
        cache = returned_cache(out)
        nxt = out.logits[:, -1].argmax(-1)  # [B]
        for row, tok in enumerate(nxt.tolist()):
            if done[row]:
                continue
            new_tokens[row].append(tok)
            # Decoding each step is cheap at these lengths and handles tokens that merely contain "\n".
            if tok == eos or "\n" in tokenizer.decode(new_tokens[row], skip_special_tokens=True):
                done[row] = True
        if all(done):
            break
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        # With a cache only the new token is fed; a model without one re-reads the whole sequence.
        step_ids, step_pos = (nxt[:, None], positions[:, -1:]) if cache is not None else (ids, positions)
    return [tokenizer.decode([t for t in toks if t != eos], skip_special_tokens=True) for toks in new_tokens]


def score_exact_match(model, tokenizer, examples, max_new_tokens: int = 32, batch_size: int = 8,
                      greedy_match: bool = True, progress: bool = True) -> dict:
    """Exact match of greedy generations against the gold answers.

    Args:
        examples: iterable of dicts with ``context`` (prompt), ``answers`` (list of strings), ``id``.
        greedy_match: also compute lm-eval's argmax-based ``greedy_match`` (one extra scoring pass).

    Returns:
        ``{"exact_match", "greedy_match" (optional), "n", "details": [{"id", "prediction",
        "answers", "exact_match", "greedy_match"}]}``.
    """
    examples = list(examples)
    preds = greedy_generate(model, tokenizer, [ex["context"] for ex in examples], max_new_tokens,
                            batch_size, progress=progress)
    details = [{"id": ex.get("id"), "prediction": p, "answers": list(ex["answers"]),
                "exact_match": float(exact_match(p, ex["answers"]))} for ex, p in zip(examples, preds)]
    result = {"exact_match": _mean([d["exact_match"] for d in details])}
    if greedy_match:
        requests = [(ex["context"], " " + a) for ex in examples for a in ex["answers"]]
        scored = iter(loglikelihood(model, tokenizer, requests, batch_size, progress=progress))
        for ex, d in zip(examples, details):
            d["greedy_match"] = float(any([next(scored)[1] for _ in ex["answers"]]))
        result["greedy_match"] = _mean([d["greedy_match"] for d in details])
    return {**result, "n": len(details), "details": details}


def _mean(values) -> float:
    return sum(values) / len(values) if values else float("nan")
