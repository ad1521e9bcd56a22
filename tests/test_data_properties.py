"""Property tests of the trust boundary: whatever a file or a setting holds, offsite either accepts
it (and then only a valid value) or refuses it with one :class:`OffsiteError`; never any other
exception.
"""

from __future__ import annotations

import gzip
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from offsite.data.examples import prompt_pairs
from offsite.data.records import FORMATS
from offsite.data.examples import load_examples
from offsite.emulator import available_methods, get_builder
from offsite.core.errors import OffsiteError
from offsite.data.tasks import get_task
from offsite.training.config import FinetuneConfig

# Modest, without deadlines (the machine is shared; each example writes and reads a file) and without
# an example database, so that runs leave nothing in the working tree.
FEW = settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                         max_size=3), max_leaves=6)
# Records near the schemas, so that most examples get past "lacks a field" and test the field checks.
FIELDS = {"context": st.text(max_size=12) | JSON, "question": st.text(max_size=12) | JSON,
          "choices": st.lists(st.text(max_size=6), max_size=4) | JSON,
          "label": st.integers(-3, 5) | st.floats(-2, 5) | st.sampled_from(["1", True, False, None]),
          "prompt": st.text(max_size=12) | JSON, "completion": st.text(max_size=12) | JSON,
          "answers": st.lists(st.text(max_size=6), max_size=3) | JSON, "text": st.text(max_size=20) | JSON}
RECORDS = st.fixed_dictionaries({}, optional=FIELDS)
LINES = st.lists(RECORDS | JSON, min_size=1, max_size=5)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("props")  # module-scoped: hypothesis reruns the test body, not fixtures


def _write(folder, name: str, body: bytes):
    path = folder / name
    path.write_bytes(gzip.compress(body) if name.endswith(".gz") else body)
    return path


def _jsonl(lines) -> bytes:
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def _valid_mc(record) -> bool:
    choices, label = record.get("choices"), record.get("label")
    return (isinstance(choices, list) and bool(choices) and all(isinstance(c, str) for c in choices)
            and type(label) is int and 0 <= label < len(choices))


def _load_or_refuse(path, fmt, tokenizer, task=None):
    """The examples, or None when the input was refused with an OffsiteError (anything else fails)."""
    try:
        return load_examples(path, fmt, tokenizer, 16, task=task)
    except OffsiteError:
        return None


@FEW
@given(body=st.binary(max_size=200), name=st.sampled_from(["d.txt", "d.jsonl", "d.txt.gz", "d.jsonl.gz"]),
       fmt=st.sampled_from(FORMATS))
def test_random_bytes_are_read_or_refused(folder, tokenizer, body, name, fmt):
    _load_or_refuse(_write(folder, name, body), fmt, tokenizer)


@FEW
@given(lines=LINES, name=st.sampled_from(["d.jsonl", "d.jsonl.gz", "d.txt"]), fmt=st.sampled_from(FORMATS))
def test_random_json_lines_are_read_or_refused(folder, tokenizer, lines, name, fmt):
    examples = _load_or_refuse(_write(folder, name, _jsonl(lines)), fmt, tokenizer)
    if examples is not None and fmt == "text":
        assert not any(isinstance(line, dict) for line in lines[:1])  # JSONL is never trained on as text


@FEW
@given(lines=LINES, task=st.sampled_from([None, "arc_easy", "sciq", "webquestions"]))
def test_accepted_mc_records_are_valid(folder, lines, task):
    path = _write(folder, "mc.jsonl", _jsonl(lines))
    try:
        pairs = prompt_pairs(path, "mc", task=task)
    except OffsiteError:
        return
    assert len(pairs) == len(lines) and all(isinstance(p, str) and isinstance(t, str) for p, t in pairs)
    if task in (None, "arc_easy", "sciq"):
        assert all(_valid_mc(r) for r in lines)


@FEW
@given(lines=LINES)
def test_accepted_prompt_records_are_strings(folder, lines):
    path = _write(folder, "p.jsonl", _jsonl(lines))
    try:
        prompt_pairs(path, "prompt")
    except OffsiteError:
        return
    assert all(isinstance(r.get("prompt"), str) and isinstance(r.get("completion"), str) for r in lines)


@FEW
@given(lines=LINES)
def test_adhoc_eval_tasks_read_or_refuse(folder, lines):
    path = _write(folder, "task.jsonl", _jsonl(lines))
    try:
        task = get_task(str(path))
        examples = list(task.examples(None, "test"))
    except OffsiteError:
        return
    if task.kind == "multiple_choice":  # labelled records scored, unlabeled (-1) ones dropped
        assert len(examples) == sum(_valid_mc(r) for r in lines)


@FEW
@given(method=st.sampled_from(available_methods()), data=st.data())
def test_method_settings_are_built_or_refused(method, data):
    cls = get_builder(method).config_cls
    name = data.draw(st.sampled_from(sorted(cls.__dataclass_fields__)))
    value = data.draw(JSON)
    try:
        config = get_builder(method).make_config(**{name: value})
    except OffsiteError:
        return
    stored = getattr(config, name)
    assert not isinstance(stored, float) or stored == stored  # never NaN
    if isinstance(value, (str, list, dict)):
        assert type(stored) is type(value)  # containers and strings are never converted to numbers


@FEW
@given(data=st.data())
def test_finetune_settings_are_built_or_refused(data):
    name = data.draw(st.sampled_from(sorted(FinetuneConfig.__dataclass_fields__)))
    try:
        FinetuneConfig(**{name: data.draw(JSON)})
    except OffsiteError:
        pass
