"""Splitting one dataset into the local datasets of N simulated data owners (for experiments).

Method. Every split works on the tokenised examples of the file in file order (what
:func:`offsite.training.loop.prepare` returns with no validation hold-out) and returns, per
client, a sorted list of example indices; the lists are disjoint, cover every example and none is
empty. Each client trains on its examples in file order, so one client holding everything trains
on exactly what ``offsite finetune`` would.

* ``iid``: a seeded permutation cut into N parts whose sizes differ by at most one.
* ``dirichlet`` by ``label`` or ``answer`` (multiple-choice data only): label skew as in Hsu et
  al. 2019 ("Measuring the effects of non-identical data distribution for federated visual
  classification"): for each class c, shares p_c ~ Dir(alpha * 1_N) over the clients, and class
  c's examples (shuffled) are cut in those shares. The class is the record's gold answer text
  (``answer``, the default for mc data: what a client's questions are about, e.g. one of ten towns)
  or its ``label`` (the gold choice's position, which says nothing when choices are shuffled).
* ``dirichlet`` by ``size`` (the default for text and prompt data, which carry no label): client
  shares p ~ Dir(alpha * 1_N) and client k receives a *contiguous* run of examples of that share.
  Contiguity is the point: text blocks of one document are neighbours in the file, so small alpha
  gives unequal sizes *and* clients that hold different documents (quantity and content skew),
  without inventing labels.

Where it departs: a Dirichlet draw can leave a client with nothing; every client is first given
one example (``size``) or, for label skew, an empty client takes one example from the largest
client until none is empty, deterministically. Small alpha means more skew; alpha -> infinity
approaches the IID sizes.
"""

from __future__ import annotations

import numpy as np

from ..core.errors import OffsiteError
from ..data.records import check_mc_record, numbered_records

SPLITS = ("iid", "dirichlet")
DIRICHLET_BY = ("label", "answer", "size")
"""What a Dirichlet split is drawn over: mc records' label, their gold answer text, or client sizes."""


def partition(count: int, clients: int, split: str, alpha: float, seed: int, labels: list | None = None) -> list:
    """Example indices of every client.

    Args:
        count: number of examples.
        clients: N, the number of clients (1 <= N <= count).
        split: ``"iid"`` or ``"dirichlet"``.
        alpha: the Dirichlet concentration (> 0); unused for ``iid``.
        seed: seeds every draw, so the same arguments give the same split.
        labels: one class per example for label skew; None for a Dirichlet over sizes.

    Returns:
        ``clients`` sorted, disjoint, non-empty lists of indices covering ``range(count)``.
    """
    if not 1 <= clients <= count:
        raise OffsiteError(f"{count} example(s) cannot be split over {clients} clients: every client needs at "
                           "least one; use fewer clients (--clients) or more data")
    rng = np.random.default_rng(seed)
    if split == "iid":
        parts = np.array_split(rng.permutation(count), clients)
    elif split == "dirichlet" and labels is None:
        parts = _by_size(count, clients, alpha, rng)
    elif split == "dirichlet":
        if len(labels) != count:
            raise OffsiteError(f"{len(labels)} labels for {count} examples: a label split needs one per example")
        parts = _by_label(labels, clients, alpha, rng)
    else:
        raise OffsiteError(f"split {split!r} unknown; allowed: {', '.join(SPLITS)}")
    return [sorted(int(i) for i in part) for part in parts]


def _by_size(count: int, clients: int, alpha: float, rng) -> list:
    """Contiguous runs whose sizes are 1 + the Dirichlet shares of the remaining examples."""
    shares = rng.dirichlet(np.full(clients, alpha))
    rest = count - clients
    sizes = np.floor(shares * rest).astype(int)
    # Largest remainders get the examples flooring left over, so the sizes add up to count exactly.
    left = rest - int(sizes.sum())
    sizes[np.argsort(-(shares * rest - sizes), kind="stable")[:left]] += 1
    bounds = np.concatenate([[0], np.cumsum(sizes + 1)])
    return [np.arange(bounds[k], bounds[k + 1]) for k in range(clients)]


def _by_label(labels: list, clients: int, alpha: float, rng) -> list:
    """Each class cut over the clients in its own Dirichlet shares; empty clients repaired."""
    parts = [[] for _ in range(clients)]
    values = np.array([str(v) for v in labels])  # strings: int labels and answer texts sort alike
    for cls in sorted(set(values.tolist())):
        members = rng.permutation(np.flatnonzero(values == cls))
        shares = rng.dirichlet(np.full(clients, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
        for k, chunk in enumerate(np.split(members, cuts)):
            parts[k].extend(chunk.tolist())
    for k in range(clients):
        if not parts[k]:
            donor = max(range(clients), key=lambda j: (len(parts[j]), -j))
            parts[donor].sort()
            parts[k].append(parts[donor].pop())
    return parts


def record_labels(path, by: str) -> list:
    """The class of every multiple-choice record of ``path`` for a label split (``by``: label or answer)."""
    out = []
    for where, record in numbered_records(path):
        check_mc_record(record, where, allow_unlabeled=False)
        out.append(record["label"] if by == "label" else record["choices"][record["label"]])
    return out


def skew(parts: list, labels: list | None = None) -> float:
    """How far the clients are from an even IID split (0 = none): a summary for logs and tests.

    With labels: the mean total-variation distance between each client's class distribution and
    the whole data's. Without: the coefficient of variation of the client sizes.
    """
    if labels is None:
        sizes = np.array([len(p) for p in parts], dtype=float)
        return float(sizes.std() / sizes.mean())
    values = np.array([str(v) for v in labels])
    classes = sorted(set(values.tolist()))
    overall = np.array([(values == c).mean() for c in classes])
    tv = [0.5 * np.abs(np.array([(values[p] == c).mean() for c in classes]) - overall).sum() for p in parts]
    return float(np.mean(tv))
