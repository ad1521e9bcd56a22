"""Fine-tuning data: plain text, prompt/completion JSONL, and the multiple-choice schema.

Formats (``--format``):

* ``text``: a UTF-8 text file (``.gz`` allowed) cut into causal-LM blocks of ``block_size`` tokens;
  loss on every token.
* ``prompt``: JSONL with ``{"prompt": ..., "completion": ...}`` per line; loss on the completion
  only (prompt tokens get label -100), EOS appended to the completion when the tokenizer has one.
* ``mc``: the multiple-choice schema of the shared data (``context``, ``question``, ``choices``,
  ``label``), turned into context -> gold answer as in Offsite-Tuning's recipe. With ``task`` set,
  the evaluation task spec builds the pairs (same prompts as ``offsite eval``); otherwise the
  generic prompt is ``"{context}\\nQuestion: {question}\\nAnswer:"`` + ``" {gold}"``.

Every file and record is checked on the way in (UTF-8, gzip, one JSON object per line, field types;
see :func:`check_mc_record`): a bad one is an :class:`OffsiteError` naming ``file:line``. The same
record checks serve the evaluation tasks (:mod:`offsite.data.tasks`).
"""

from __future__ import annotations

import gzip
import json
import zlib
from pathlib import Path

from ..core.errors import OffsiteError

FORMATS = ("text", "prompt", "mc")
IGNORE = -100
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")


def data_path(path) -> Path:
    """``path`` as a :class:`Path` when it names a file (not a folder), else a clear :class:`OffsiteError`."""
    path = Path(path)
    if path.is_dir():
        raise OffsiteError(f"data path {path} is a folder; give one data file (.txt, .jsonl, optionally .gz)")
    if not path.is_file():
        raise OffsiteError(f"data file {path} does not exist")
    return path


def numbered_lines(path):
    """Yield ``(line number, line)`` of a UTF-8 text file, gunzipped when its name ends in ``.gz``.

    Lines are read as bytes and decoded one at a time, so a bad byte is reported with its line.

    Raises:
        OffsiteError: the path is not a file, a ``.gz`` file is not valid gzip, or a line is not UTF-8.
    """
    path = data_path(path)
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as fh:
            for lineno, raw in enumerate(fh, 1):
                try:
                    yield lineno, raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise OffsiteError(f"{path}:{lineno}: not UTF-8 text (byte {exc.start + 1} of the line is "
                                       f"0x{raw[exc.start]:02x}); data files must be UTF-8 encoded") from None
    # BadGzipFile: no gzip header; EOFError: truncated; zlib.error: corrupt deflate stream.
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise OffsiteError(f"{path} is not a valid gzip file ({exc}); a data file named .gz must be "
                           "gzip-compressed, otherwise drop the .gz from its name") from None
    except OSError as exc:
        raise OffsiteError(f"cannot read data file {path}: {exc.strerror or exc}") from None


def _kind(value) -> str:
    """The JSON type of ``value`` in words, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):  # before int: bool is an int subclass
        return "a boolean"
    return {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a float"}.get(
        type(value), type(value).__name__)


def _shown(value) -> str:
    """``value`` as JSON, cut short so that one bad record can't flood the terminal."""
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def check_object(value, where: str) -> dict:
    """Refuse a JSONL line that is valid JSON but not an object (``[1, 2]``, ``3``, ``"x"``)."""
    if not isinstance(value, dict):
        raise OffsiteError(f"{where}: each line must be one JSON object {{...}}, got {_kind(value)} {_shown(value)}")
    return value


def _check_text_fields(record: dict, where: str, keys) -> None:
    for key in keys:
        value = record.get(key)
        if value is None:  # absent or null: no text (the schema's "" for "none")
            record[key] = ""
        elif not isinstance(value, str):
            raise OffsiteError(f"{where}: {key!r} must be a string, got {_kind(value)} {_shown(value)}")


def check_mc_record(record: dict, where: str, allow_unlabeled: bool = True) -> dict:
    """Validate one multiple-choice record in place; ``context``/``question`` default to ``""``.

    Args:
        record: the parsed JSON object.
        where: ``"file:line"``, the start of every error message.
        allow_unlabeled: accept ``label == -1`` (hidden-label test splits, skipped by evaluation);
            fine-tuning passes False, as an unlabeled record has no answer to train on.

    Returns:
        The record: ``choices`` a non-empty list of strings, ``label`` an int index into it (or -1).

    Raises:
        OffsiteError: naming the field, what it holds and what is allowed.
    """
    check_object(record, where)
    missing = [k for k in ("choices", "label") if k not in record]
    if missing:
        raise OffsiteError(f"{where}: lacks {missing}; a multiple-choice record needs 'choices' (a list of strings) "
                           "and 'label' (the index of the correct choice), with optional 'context' and 'question'")
    choices, label = record["choices"], record["label"]
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
        raise OffsiteError(f"{where}: 'choices' must be a non-empty list of strings, got {_shown(choices)}")
    allowed = f"0 to {len(choices) - 1}" + (", or -1 for unlabeled" if allow_unlabeled else "")
    # bool is an int subclass; true/false is never meant as an index. Floats and "1" are refused too.
    if isinstance(label, bool) or not isinstance(label, int):
        raise OffsiteError(f"{where}: 'label' must be an integer index of the correct choice ({allowed}), got "
                           f"{_kind(label)} {_shown(label)}")
    if label == -1 and not allow_unlabeled:
        raise OffsiteError(f"{where}: 'label' is -1, which marks an unlabeled record (hidden-label test split); "
                           "unlabeled records (-1) cannot be used for fine-tuning data: drop them or use a "
                           "labelled split")
    if not (-1 if allow_unlabeled else 0) <= label < len(choices):
        raise OffsiteError(f"{where}: 'label' must be {allowed} ({len(choices)} choices), got {label}")
    _check_text_fields(record, where, ("context", "question"))
    return record


def check_qa_record(record: dict, where: str) -> dict:
    """Validate one exact-match QA record: ``question`` a string, ``answers`` a non-empty list of strings."""
    check_object(record, where)
    answers = record.get("answers")
    if not isinstance(record.get("question"), str) or not isinstance(answers, list) or not answers or \
            not all(isinstance(a, str) for a in answers):
        raise OffsiteError(f"{where}: QA records need 'question' (a string) and 'answers' (a non-empty list of "
                           f"strings), got question {_shown(record.get('question'))}, answers {_shown(answers)}")
    return record


def check_prompt_record(record: dict, where: str) -> dict:
    """Validate one ``prompt`` format record: ``prompt`` and ``completion`` both strings."""
    check_object(record, where)
    if "prompt" not in record or "completion" not in record:
        hint = "; this looks like a multiple-choice record: use --format mc" if "choices" in record else ""
        raise OffsiteError(f"{where}: lacks 'prompt'/'completion' (format 'prompt' needs both, as strings){hint}")
    for key in ("prompt", "completion"):
        if not isinstance(record[key], str):
            raise OffsiteError(f"{where}: {key!r} must be a string, got {_kind(record[key])} {_shown(record[key])}")
    return record


def iter_records(path):
    """Yield ``("file:line", record)`` for each JSON object of a JSONL(.gz) file as it is read.

    Blank lines are skipped; a line that is not a JSON object is an error naming ``file:line``.
    Lazy, so a reader that wants the first N records reads only those.
    """
    for lineno, line in numbered_lines(path):
        if line.strip():
            where = f"{path}:{lineno}"
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise OffsiteError(f"{where} is not valid JSON ({exc.msg})") from None
            yield where, check_object(value, where)


def numbered_records(path) -> list:
    """``[("file:line", record), ...]`` for the JSON objects of a JSONL(.gz) file (blank lines skipped)."""
    rows = list(iter_records(path))
    if not rows:
        raise OffsiteError(f"{path} holds no records")
    return rows


def read_jsonl(path) -> list:
    """The JSON objects of a JSONL(.gz) file, in order."""
    return [record for _, record in numbered_records(path)]


def mc_prompt(record: dict) -> str:
    """Generic OT prompt for a multiple-choice record (context, then question, then 'Answer:')."""
    parts = [record.get("context") or ""]
    if record.get("question"):
        parts.append(f"Question: {record['question']}\nAnswer:")
    return "\n".join(p for p in parts if p)
