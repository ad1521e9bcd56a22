"""Evaluation / fine-tuning tasks as small data specs over the offline data folder.

Data layout (schema in ``shared/data/README.md``): ``<data-dir>/mc/<task>/<split>.jsonl.gz``
(RACE: ``mc/race/high/``), ``<data-dir>/qa/webquestions/<split>.jsonl.gz`` and
``<data-dir>/lm/wikitext-2-raw/wiki.{valid,test}.raw.gz``. Records with ``label == -1``
(hidden-label test splits) are dropped for evaluation and refused for fine-tuning; ``limit`` keeps
the first N remaining records. Records are checked by :mod:`offsite.data.records`'s validators.

Prompts follow the OT / lm-eval recipes; choices are scored as ``" " + choice``:

=============  ===========================================================  =====================
task           prompt                                                       choices
=============  ===========================================================  =====================
piqa, arc_*    ``Question: {question}\\nAnswer:``                            solutions / answers
openbookqa     the raw question stem                                        answers
hellaswag      the preprocessed ``"activity: ctx"`` context                 endings
sciq           ``{support.lstrip()}\\nQuestion: {question}\\nAnswer:``       3 distractors + gold
race           ``Article: {article}\\n\\nQuestion: {question}\\n\\nAnswer:``  options
boolq          ``{passage}\\nQuestion: {question}?\\nAnswer:``               ``no`` / ``yes``
webquestions   ``Question: {question}\\nAnswer:``                            (generation)
=============  ===========================================================  =====================

* RACE is scored one question at a time (OT's prompt). lm-eval instead packs all earlier questions
  of the same article, with their answers, into the context of the last one.
* BoolQ questions in the offline data already end with ``?``; one is added only when missing.
* Any ``.jsonl``/``.jsonl.gz`` path is an ad-hoc task: records with ``choices`` are multiple
  choice with the prompt ``[{context}\\n]Question: {question}\\nAnswer:`` (just the context when the
  question is empty); records with ``answers`` are exact-match QA. A path with ``{split}`` in it
  (``mine/{split}.jsonl``) names one file per split (train / validation / test, those present); a
  plain path is one file that answers every evaluation split and is refused for fine-tuning, so
  that ``offsite report`` can't train on the questions it scores.

Split fallback for evaluation (:meth:`Task.resolve_split`) is recorded by the caller. The special
split ``"default"`` is lm-eval's evaluation split of each task (test for ARC, OpenBookQA, SciQ,
RACE, WebQuestions, WikiText; validation for PIQA, HellaSwag, BoolQ). Fine-tuning
(:meth:`Task.finetune_pairs`) never falls back, so a task can't silently train on its eval split.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..core.errors import OffsiteError
from .records import check_mc_record, check_object, check_qa_record, iter_records, mc_prompt
from .wikitext import load_wikitext

SPLITS = ("train", "validation", "test")


def _qa(r: dict) -> str:
    return f"Question: {r['question']}\nAnswer:"


def _stem(r: dict) -> str:
    return r["question"]


def _context(r: dict) -> str:
    return r["context"]


def _sciq(r: dict) -> str:
    return f"{r['context'].lstrip()}\nQuestion: {r['question']}\nAnswer:"


def _race(r: dict) -> str:
    return f"Article: {r['context']}\n\nQuestion: {r['question']}\n\nAnswer:"


def _boolq(r: dict) -> str:
    question = r["question"] if r["question"].endswith("?") else r["question"] + "?"
    return f"{r['context']}\nQuestion: {question}\nAnswer:"


@dataclass(frozen=True)
class Task:
    """One task: where its data lives, how a record becomes a prompt, and how it is scored.

    Attributes:
        name: task name (results key).
        kind: ``"multiple_choice"``, ``"exact_match"`` or ``"perplexity"``.
        path: data file relative to the data dir, with ``{split}`` for the split name.
        splits: splits present in the offline data.
        prompt: record -> prompt string.
        fallback: requested split -> split used instead when evaluating.
        default_split: lm-eval's evaluation split, used for ``split="default"``.
        adhoc: a task read from the user's own file(s): ``path`` is absolute, with ``{split}``
            when there is one file per split; without it the one file answers every evaluation
            split (``splits == ("file",)``) and fine-tuning on it is refused.
    """

    name: str
    kind: str
    path: str
    splits: tuple
    prompt: Callable[[dict], str] = _qa
    fallback: dict = field(default_factory=dict)
    default_split: str = "validation"
    adhoc: bool = False

    def resolve_split(self, split: str, strict: bool = False) -> str:
        """The split actually read for a requested one (fallback unless ``strict``)."""
        if self.splits == ("file",):
            if strict:  # fine-tuning: the one file is also what gets scored
                raise OffsiteError(f"task file {self.path} is a single file, used for evaluation whatever the split; "
                                   "to fine-tune on a task, give one file per split with {split} in the path, "
                                   "e.g. mine/{split}.jsonl for mine/train.jsonl + mine/validation.jsonl")
            return "file"
        if split == "default":
            split = self.default_split
        if split in self.splits:
            return split
        if not strict and split in self.fallback:
            return self.fallback[split]
        raise OffsiteError(f"task {self.name!r} has no {split!r} split in the offline data; "
                           f"available: {', '.join(self.splits)}")

    def data_file(self, data_dir, split: str) -> Path:
        """Path of the split's data file; :class:`OffsiteError` naming the path when it is missing."""
        if self.adhoc:
            path = Path(self.path.replace("{split}", split))
            if not path.is_file():  # splits are read off the disk when the task is made; it changed since
                raise OffsiteError(f"data for task {self.name!r} ({split}) not found: tried {path}")
            return path
        if data_dir is None:
            raise OffsiteError("no data folder given: pass --data-dir DIR or set OFFSITE_DATA_DIR")
        path = Path(data_dir) / self.path.replace("{split}", split)
        if not path.is_file():
            raise OffsiteError(f"data for task {self.name!r} ({split}) not found: tried {path}; point --data-dir "
                               f"(or OFFSITE_DATA_DIR) at the folder that contains {self.path.split('/')[0]}/")
        return path

    def records(self, data_dir, split: str, limit: int | None = None, strict: bool = False):
        """Labelled raw records of the (resolved) split, first ``limit`` of them.

        For the perplexity task a record is one document: ``{"id", "text"}``.
        """
        split = self.resolve_split(split, strict)
        if self.kind == "perplexity":
            docs = load_wikitext(data_dir, split, limit)
            return iter([{"id": f"{self.name}-{split}-{i}", "text": doc} for i, doc in enumerate(docs)])
        return _read_records(self.data_file(data_dir, split), self.kind, limit, finetune=strict)

    def example(self, record: dict) -> dict:
        """A record as the scorer wants it: ``context``, ``choices``/``answers``, ``gold``, ``id``.

        Perplexity records pass through unchanged (``id``, ``text``).
        """
        if self.kind == "perplexity":
            return dict(record)
        if self.kind == "exact_match":
            return {"id": record.get("id"), "context": self.prompt(record), "answers": list(record["answers"]),
                    "gold": 0}
        return {"id": record.get("id"), "context": self.prompt(record), "choices": list(record["choices"]),
                "gold": int(record["label"])}

    def examples(self, data_dir, split: str = "validation", limit: int | None = None):
        """Yield scorer examples (see :meth:`example`) of ``split``, with the evaluation fallback."""
        for record in self.records(data_dir, split, limit):
            yield self.example(record)

    def finetune_pair(self, record: dict, where: str = "record") -> tuple[str, str]:
        """``(prompt, " " + gold answer)`` for one record; loss goes on the second string only.

        Args:
            record: a record of this task's schema (validated here: it may come from the user's file).
            where: ``"file:line"`` of the record, for error messages.

        Raises:
            OffsiteError: the record is malformed or unlabeled (label -1 has no answer to train on).
        """
        if self.kind == "exact_match":
            check_qa_record(record, where)
            return self.prompt(record), " " + record["answers"][0]  # OT trains on the first answer
        if self.kind == "perplexity":
            if not isinstance(check_object(record, where).get("text"), str):
                raise OffsiteError(f"{where}: task {self.name!r} trains on documents: each record needs a "
                                   "string 'text' (or fine-tune on the plain text with --format text)")
            return "", record["text"]
        check_mc_record(record, where, allow_unlabeled=False)
        return self.prompt(record), " " + record["choices"][record["label"]]

    def finetune_pairs(self, data_dir, split: str = "train", limit: int | None = None):
        """Yield ``(prompt, target)`` string pairs of ``split`` for fine-tuning (no split fallback).

        For wikitext each document is one pair ``("", document)``; chunking is the trainer's job.
        """
        for record in self.records(data_dir, split, limit, strict=True):
            yield self.finetune_pair(record)


def _mc(name: str, prompt=_qa, path: str | None = None, splits=SPLITS, fallback=None, default="test") -> Task:
    return Task(name, "multiple_choice", path or f"mc/{name}/{{split}}.jsonl.gz", tuple(splits), prompt,
                fallback or {}, default)


_ONLY_VALIDATION = {"train": "validation", "test": "validation"}

TASKS: dict[str, Task] = {t.name: t for t in [
    _mc("openbookqa", _stem),
    # PIQA's test labels are hidden (-1): evaluation on "test" reads validation, as lm-eval does.
    _mc("piqa", splits=("train", "validation"), fallback={"test": "validation"}, default="validation"),
    _mc("arc_easy"),
    _mc("arc_challenge"),
    _mc("hellaswag", _context, splits=("validation",), fallback=_ONLY_VALIDATION, default="validation"),
    _mc("sciq", _sciq),
    _mc("race", _race, path="mc/race/high/{split}.jsonl.gz"),
    _mc("boolq", _boolq, splits=("validation",), fallback=_ONLY_VALIDATION, default="validation"),
    Task("webquestions", "exact_match", "qa/webquestions/{split}.jsonl.gz", ("train", "test"),
         fallback={"validation": "test"}, default_split="test"),
    # Files are wiki.valid.raw.gz / wiki.test.raw.gz; perplexity.wikitext_file maps the split names.
    Task("wikitext", "perplexity", "lm/wikitext-2-raw/", ("validation", "test"), default_split="test"),
]}


def list_tasks() -> list[str]:
    """Names of the built-in tasks."""
    return list(TASKS)


def is_file_task(name: str) -> bool:
    """Whether ``name`` is a path to an ad-hoc JSONL task."""
    return str(name).endswith((".jsonl", ".jsonl.gz"))


def get_task(name: str) -> Task:
    """The task called ``name``, or an ad-hoc task for a ``.jsonl``/``.jsonl.gz`` path."""
    if name in TASKS:
        return TASKS[name]
    if is_file_task(name):
        template = str(Path(name).expanduser().absolute())
        if "{split}" in template:
            splits = tuple(sp for sp in SPLITS if Path(template.replace("{split}", sp)).is_file())
            if not splits:
                raise OffsiteError(f"task files not found: tried {template.replace('{split}', '{' + ','.join(SPLITS) + '}')}")
            default = "test" if "test" in splits else splits[-1]
        else:
            splits, default = ("file",), "file"
            if not Path(template).is_file():
                raise OffsiteError(f"task file not found: {template}")
        path = Path(template.replace("{split}", splits[0]))
        first = next(_read_records(path, "any", 1), None)
        if first is None:
            raise OffsiteError(f"task file {path} holds no labelled records")
        kind = "exact_match" if "answers" in first and "choices" not in first else "multiple_choice"
        prompt = _qa if kind == "exact_match" else mc_prompt
        return Task(str(name), kind, template, splits, prompt, default_split=default, adhoc=True)
    raise OffsiteError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)} "
                       "(or a path to a .jsonl/.jsonl.gz file in the multiple-choice schema)")


def _read_records(path: Path, kind: str, limit: int | None, finetune: bool = False):
    """Yield validated records of a JSONL(.gz) file.

    Evaluation skips unlabeled records (label -1, hidden-label test splits); fine-tuning
    (``finetune``) refuses them, as they have no answer to train on.
    """
    if limit is not None and limit < 1:
        raise OffsiteError(f"--limit must be a positive number of questions, got {limit}")
    count = 0
    for where, record in iter_records(path):
        if limit is not None and count >= limit:
            return
        if kind in ("multiple_choice", "any") and "choices" in record:
            check_mc_record(record, where, allow_unlabeled=not finetune)
            if record["label"] == -1:
                continue
        elif kind in ("exact_match", "any") and "answers" in record:
            check_qa_record(record, where)
        else:
            raise OffsiteError(f"{where}: expected the multiple-choice schema (context, question, "
                               "choices, label) or the QA schema (question, answers)")
        count += 1
        yield record
