"""Rolling-window perplexity, and the WikiText-2 documents it is usually reported on.

Windows (lm-eval's ``loglikelihood_rolling`` generalised by a stride). The text is encoded
*without* special tokens and the prefix token (BOS, else EOS) is put in front so that the first
token is predicted too; every text token is scored exactly once:

* the first window predicts tokens ``1 .. min(L, n)`` from ``[prefix] + tokens[:L - 1]``;
* each later window predicts the next ``stride`` tokens (fewer at the end) from the ``L`` tokens
  that precede its last target, so it has ``L - stride + 1`` tokens of extra context.

``L`` = ``max_length`` (default: the model's context, as in :func:`~offsite.eval.scoring.resolve_max_length`);
``stride`` defaults to ``L``, i.e. non-overlapping windows with one token of carried context --
exactly lm-eval's windows (its ``context_len=1``). A smaller stride gives each scored token more
context, at more compute. Unlike lm-eval, the text itself is encoded without the tokenizer's BOS,
so a BOS-adding tokenizer does not get a spurious predicted BOS after the prefix BOS.

WikiText-2 (``<data-dir>/lm/wikitext-2-raw/wiki.{valid,test}.raw.gz``) is split into documents at
top-level headings (lines `` = Title = ``), as lm-eval's ``wikitext_document_level`` dataset is;
lines before the first heading join the first document. Each document is detokenised with the
same rules as lm-eval's ``wikitext_detokenizer`` and scored on its own (rolling windows restart per
document). Words (``re.split(r"\\s+", doc)``) and UTF-8 bytes are counted on the *original*
document, as lm-eval does, and aggregated over the corpus:

* ``word_perplexity = exp(-LL / words)``, ``byte_perplexity = exp(-LL / bytes)``,
* ``bits_per_byte = -LL / bytes / ln 2``, ``token_perplexity = exp(-LL / scored tokens)``.
"""

from __future__ import annotations

import math
import re

from ..core.errors import OffsiteError
from ..core.progress import bar as progress_bar
from .scoring import eval_mode, prefix_token_id, resolve_max_length, score_token_pairs



def rolling_windows(tokens: list[int], prefix: int, max_length: int,
                    stride: int | None = None) -> list[tuple[list[int], list[int]]]:
    """Cut ``tokens`` into scoring windows.

    Args:
        tokens: ids of the text (no special tokens).
        prefix: id that conditions the first token.
        max_length: model input length L.
        stride: new tokens scored per later window, ``1 <= stride <= L`` (default L).

    Returns:
        ``[(context_ids, target_ids)]``; ``context + target`` is at most ``L + 1`` long, so the
        model input ``(context + target)[:-1]`` fits, and the targets tile ``tokens`` exactly.
    """
    stride = max_length if stride is None else stride
    if not 1 <= stride <= max_length:
        raise OffsiteError(f"stride must be between 1 and the context length {max_length}, got {stride}")
    seq = [prefix] + list(tokens)  # seq[i] is text token i - 1
    windows = []
    start, end = 1, 1 + min(max_length, len(tokens))
    while start < end:
        begin = max(0, end - 1 - max_length)  # input = seq[begin:end - 1], at most L tokens
        windows.append((seq[begin:start], seq[start:end]))
        start, end = end, min(end + stride, len(seq))
    return windows


def rolling_loglikelihood(model, tokenizer, text: str, max_length: int | None = None,
                          stride: int | None = None, batch_size: int = 8) -> tuple[float, int]:
    """Summed log-likelihood of ``text`` over rolling windows.

    Returns:
        ``(loglikelihood, number of scored tokens)``.
    """
    max_length = max_length or resolve_max_length(model, tokenizer)
    tokens = list(tokenizer.encode(text, add_special_tokens=False))
    windows = rolling_windows(tokens, prefix_token_id(tokenizer), max_length, stride)
    with eval_mode(model):
        scores = score_token_pairs(model, windows, batch_size, max_length)
    return sum(ll for ll, _ in scores), len(tokens)


def count_words(text: str) -> int:
    """Words as lm-eval's wikitext task counts them (split on whitespace runs)."""
    return len(re.split(r"\s+", text))


def perplexity_metrics(loglik: float, tokens: int, words: int, n_bytes: int) -> dict:
    """The four perplexity numbers from a summed log-likelihood and the unit counts."""
    return {"word_perplexity": math.exp(-loglik / words) if words else float("nan"),
            "byte_perplexity": math.exp(-loglik / n_bytes) if n_bytes else float("nan"),
            "bits_per_byte": -loglik / n_bytes / math.log(2) if n_bytes else float("nan"),
            "token_perplexity": math.exp(-loglik / tokens) if tokens else float("nan")}


def score_documents(model, tokenizer, documents, max_length: int | None = None, stride: int | None = None,
                    batch_size: int = 8, detokenize=None, progress: bool = True, desc: str = "perplexity") -> dict:
    """Corpus perplexity over documents, each scored with its own rolling windows.

    Args:
        documents: iterable of strings (counts are taken on these, before ``detokenize``).
        detokenize: optional ``str -> str`` applied before tokenising (e.g. :func:`wikitext_detokenize`).

    Returns:
        :func:`perplexity_metrics` plus ``n`` (documents), ``tokens``, ``words``, ``bytes``,
        ``loglikelihood``, ``max_length``, ``stride``.
    """
    documents = list(documents)
    max_length = max_length or resolve_max_length(model, tokenizer)
    stride = stride or max_length
    prefix = prefix_token_id(tokenizer)
    windows, owner, tokens = [], [], 0
    for d, doc in enumerate(documents):
        ids = list(tokenizer.encode(detokenize(doc) if detokenize else doc, add_special_tokens=False))
        tokens += len(ids)
        for w in rolling_windows(ids, prefix, max_length, stride):
            windows.append(w)
            owner.append(d)
    # All windows of all documents go through one length-sorted batching pass.
    with eval_mode(model), progress_bar(len(windows), desc, "window", enabled=progress) as bar:
        scores = score_token_pairs(model, windows, batch_size, max_length, pbar=bar)
    loglik = sum(ll for ll, _ in scores)
    words = sum(count_words(d) for d in documents)
    n_bytes = sum(len(d.encode("utf-8")) for d in documents)
    return {**perplexity_metrics(loglik, tokens, words, n_bytes), "n": len(documents), "tokens": tokens,
            "words": words, "bytes": n_bytes, "loglikelihood": loglik, "max_length": max_length, "stride": stride}
