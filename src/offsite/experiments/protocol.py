"""The pieces of the Offsite-Tuning measurement protocol that ``offsite report`` and ``offsite audit`` share.

Both workflows measure a task the same way, and must, or their numbers would not compare: the
fine-tuning data of a task comes from the same task spec as its evaluation (its ``train`` split;
a single own-data file is refused, it would be trained on and scored), every model is scored by
:func:`offsite.eval.run.evaluate` on one task, the number a table reports is the task's headline
metric (:func:`headline`), and a difference is signed so that positive means "the first one is
better" (:func:`gap`) whichever way the metric points. The Full FT row (every decoder block of the
full model tuned) is built the same way too (:func:`full_package`).

WikiText fine-tunes on the WikiText-2 v1 train text (the raw train split is not in the offline data),
cut into articles and detokenised with the rules evaluation applies to the raw text
(:func:`offsite.data.wikitext.wikitext_detokenize`), so training and scoring see one text style.
The v1 files replace rare words by ``<unk>``, which stays: the raw words are not recoverable.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ..artifacts.folder import refuse_overlap
from ..core.errors import OffsiteError
from ..data.tasks import get_task
from ..data.wikitext import split_wikitext_documents, wikitext_detokenize
from ..eval.loading import load_for_eval
from ..eval.run import evaluate
from ..workflows.emulate import emulate

WIKITEXT_TRAIN = "lm/wikitext-2-v1-tokens/wiki.train.tokens.gz"
DEFAULT_FINETUNE = {"max_steps": 200, "lr": 1e-4, "batch_size": 8, "progress": True, "val_limit": 64}
"""Every fine-tune's settings unless the protocol gives others (``offsite report``'s, audit's, frontier's)."""


@dataclasses.dataclass(frozen=True)
class Protocol:
    """How an experiment measures, the same for every row it reports (report, audit, frontier).

    One object instead of the same eight arguments in each workflow: rows measured under two
    protocols do not compare, so an experiment takes one.

    Attributes:
        data_dir: the offline data folder (None when every task is own data).
        split: the split scored; limit: first N questions scored per task (None: all).
        train_limit: first N training examples per task (None: all).
        batch_size: scoring batch size.
        device: where every model is built, trained and scored (``"auto"``: CUDA when present); it
            overrides a ``device`` in ``finetune``.
        finetune: ``FinetuneConfig`` settings of every fine-tune (the honest adapter, Full FT and the
            attacks), over :data:`DEFAULT_FINETUNE`.
    """

    data_dir: object = None
    split: str = "validation"
    limit: int | None = None
    train_limit: int | None = None
    batch_size: int = 16
    device: object = "auto"
    finetune: dict | None = None

    def measure(self) -> dict:
        """The scoring arguments of :func:`score` and :func:`score_with`."""
        return {"data_dir": self.data_dir, "split": self.split, "limit": self.limit, "batch_size": self.batch_size}

    def finetune_settings(self, where) -> dict:
        """Every fine-tune's settings on device ``where`` (the resolved :attr:`device`)."""
        return {**DEFAULT_FINETUNE, **(self.finetune or {}), "device": str(where)}

    def train_file(self, task: str, workdir: Path) -> tuple:
        """:func:`train_file` of ``task`` under this protocol's data and training limit."""
        return train_file(task, self.data_dir, workdir, self.train_limit)


def headline(metrics: dict) -> tuple:
    """``(value, higher_is_better)`` of the metric reported for a task (acc, exact match, else perplexity)."""
    for key in ("acc", "exact_match"):
        if key in metrics:
            return metrics[key], True
    return metrics["word_perplexity"], False


def gap(reference: float, other: float, higher_is_better: bool) -> float:
    """How much better ``reference`` is than ``other``: ``reference - other``, negated for perplexity."""
    return reference - other if higher_is_better else other - reference


def slug(task: str) -> str:
    """A file-name-safe label of a task: its name, or for a task file its (split folder's) name."""
    path = Path(task)
    return path.parent.name if "{split}" in path.name else path.name


def train_file(task: str, data_dir, workdir: Path, train_limit: int | None) -> tuple:
    """Write the task's fine-tuning data into ``workdir``; returns ``(path, format)``.

    Args:
        task: a task name or an own-data template ``mine/{split}.jsonl``.
        data_dir: the offline data folder (None for own-data tasks).
        workdir: where ``<slug>.train.jsonl`` (prompt/completion pairs) is written.
        train_limit: first N training records, or None for all.

    Raises:
        OffsiteError: the data is missing, or the task is a single file that would also be scored.
    """
    if task == "wikitext":
        return wikitext_train_text(data_dir, workdir), "text"
    pairs = list(get_task(task).finetune_pairs(data_dir, "train", limit=train_limit))
    path = Path(workdir) / f"{slug(task)}.train.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in pairs))
    return path, "prompt"


def wikitext_train_text(data_dir, workdir) -> Path:
    """``workdir/wikitext.train.txt``: the v1 train articles, detokenised one by one, blank-line separated."""
    import gzip

    path = Path(data_dir or ".") / WIKITEXT_TRAIN
    if not path.is_file():
        raise OffsiteError(f"WikiText fine-tuning text not found: tried {path}")
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        docs = split_wikitext_documents(fh.read())
    out = Path(workdir) / "wikitext.train.txt"
    out.write_text("\n\n".join(wikitext_detokenize(d).strip() for d in docs) + "\n", encoding="utf-8")
    return out


def score(model, tok, task: str, data_dir, split: str, limit: int | None, batch_size: int) -> dict:
    """Metrics of an in-memory ``model`` on one task (see :func:`offsite.eval.run.evaluate`)."""
    # max_batch_tokens stays auto: a token budget where the model is on CUDA, batch_size rows elsewhere.
    # Progress on (offsite --quiet still hides it): scoring a real model takes minutes.
    return evaluate(model, tok, [task], data_dir, split=split, limit=limit, batch_size=batch_size,
                    progress=True)["results"][task]


def score_with(model: str, adapter, task: str, data_dir, split: str, limit: int | None, batch_size: int,
               device, stream: bool = False) -> dict:
    """Metrics of ``model`` (a full model or an emulator package) with ``adapter`` applied in memory.

    On an emulator package this is "emulator FT", on the full model "plug-in" (or "Full FT" with
    an adapter of every block). The model is loaded for this score only, so that one model at a
    time sits on the device; ``stream`` keeps a full model's layers on disk (:mod:`offsite.model.offload`).
    """
    loaded, tok, _ = load_for_eval(str(model), adapter=None if adapter is None else str(adapter), device=device,
                                   stream=stream)
    try:
        return score(loaded, tok, task, data_dir, split, limit, batch_size)
    finally:
        del loaded


def full_package(model: str, workdir, device) -> Path:
    """The full model as an ``adapter_layers="all"`` package in ``workdir/emulator-full``.

    Fine-tuning its "adapter" tunes every decoder block of the full model with the very settings
    of an adapter run (embeddings and head stay frozen, as they do for adapters): the Full FT row.
    """
    whole = Path(workdir) / "emulator-full"
    emulate(model, whole, method="uniform", adapter_layers="all", overwrite=True, allow_verbatim_middle=True,
            device=device)
    return whole


def check_workdir(workdir, inputs: list) -> Path:
    """``workdir`` as a Path, refused when it is a file, a link, or is, lies in or contains an input.

    Every output of the audit and of the frontier goes inside it, so this one check keeps every
    input intact.
    """
    workdir = Path(workdir)
    if workdir.is_symlink() or (workdir.exists() and not workdir.is_dir()):
        raise OffsiteError(f"--workdir {workdir} is a file or a link; give a folder")
    refuse_overlap(workdir, inputs, "--workdir")
    return workdir
