"""Bad input at the trust boundary: data files, method and fine-tuning settings, Ctrl-C, a full disk.

Each case ends in one :class:`OffsiteError` that names the file and line (for data) and what is
allowed; none may escape as another exception or be accepted silently.
"""

from __future__ import annotations

import errno
import gzip
import json
from pathlib import Path

import pytest

from offsite.data.examples import load_examples
from offsite.data.examples import prompt_pairs
from offsite.emulator import available_methods, get_builder
from offsite.core.errors import OffsiteError
from offsite.data.tasks import get_task
from offsite.training.config import FinetuneConfig

GOOD = {"id": "q0", "context": "", "question": "what colour is the sky?", "choices": ["red", "blue", "green"],
        "label": 1}


def mc_lines(path: Path, bad) -> Path:
    """A good record on line 1, then ``bad`` (a record, or a raw line) on line 2."""
    second = bad if isinstance(bad, str) else json.dumps(bad)
    path.write_text(json.dumps(GOOD) + "\n" + second + "\n")
    return path


@pytest.mark.parametrize("bad, message", [
    ({**GOOD, "label": 5}, r"mc.jsonl:2: 'label' must be 0 to 2 \(3 choices\), got 5"),
    ({**GOOD, "label": "1"}, r"mc.jsonl:2: 'label' must be an integer index .*0 to 2.*got a string \"1\""),
    ({**GOOD, "label": 1.0}, r"'label' must be an integer index .*got a float 1.0"),
    ({**GOOD, "label": 1.5}, r"'label' must be an integer index .*got a float 1.5"),
    ({**GOOD, "label": True}, r"'label' must be an integer index .*got a boolean true"),
    ({**GOOD, "label": -1}, r"mc.jsonl:2: .*unlabeled records \(-1\) cannot be used for fine-tuning"),
    ({**GOOD, "label": -2}, r"'label' must be 0 to 2 \(3 choices\), got -2"),
    ({**GOOD, "choices": []}, r"mc.jsonl:2: 'choices' must be a non-empty list of strings, got \[\]"),
    ({**GOOD, "choices": "abc"}, r"'choices' must be a non-empty list of strings, got \"abc\""),
    ({**GOOD, "choices": [1, 2, 3]}, r"'choices' must be a non-empty list of strings, got \[1, 2, 3\]"),
    ({**GOOD, "context": 5}, r"mc.jsonl:2: 'context' must be a string, got an integer 5"),
    ("[1, 2]", r"mc.jsonl:2: each line must be one JSON object \{...\}, got a list \[1, 2\]"),
    ("3", r"mc.jsonl:2: each line must be one JSON object \{...\}, got an integer 3"),
], ids=["label-range", "label-str", "label-float-integral", "label-float", "label-bool", "label-unlabeled",
        "label-negative", "choices-empty", "choices-str", "choices-ints", "context-int", "line-list", "line-int"])
def test_bad_mc_records_are_refused(tmp_path, tokenizer, bad, message):
    path = mc_lines(tmp_path / "mc.jsonl", bad)
    with pytest.raises(OffsiteError, match=message):
        load_examples(path, "mc", tokenizer, 64)


@pytest.mark.parametrize("record, message", [
    ({"prompt": 3, "completion": " blue"}, r"p.jsonl:2: 'prompt' must be a string, got an integer 3"),
    ({"prompt": "Q:", "completion": ["blue"]}, r"p.jsonl:2: 'completion' must be a string, got a list"),
    (GOOD, r"p.jsonl:2: lacks 'prompt'/'completion'.*use --format mc"),
    ("3", r"p.jsonl:2: each line must be one JSON object"),
])
def test_bad_prompt_records_are_refused(tmp_path, tokenizer, record, message):
    path = tmp_path / "p.jsonl"
    second = record if isinstance(record, str) else json.dumps(record)
    path.write_text(json.dumps({"prompt": "Q:", "completion": " a"}) + "\n" + second + "\n")
    with pytest.raises(OffsiteError, match=message):
        load_examples(path, "prompt", tokenizer, 64)


@pytest.mark.parametrize("name, fmt", [("train.txt", "text"), ("train.jsonl", "mc"), ("train.txt.gz", "text"),
                                       ("train.jsonl.gz", "prompt")])
def test_non_utf8_bytes_name_the_line(tmp_path, tokenizer, name, fmt):
    first = json.dumps(GOOD) if ".jsonl" in name else "the cat sat on the mat"
    body = (first + "\n").encode() + b'{"choices": ["\xff"], "label": 0}\n'  # 0xff: byte 15 of line 2
    path = tmp_path / name
    path.write_bytes(gzip.compress(body) if name.endswith(".gz") else body)
    with pytest.raises(OffsiteError, match=rf"{name}:2: not UTF-8 text \(byte 15 of the line is 0xff\)"):
        load_examples(path, fmt, tokenizer, 8)


@pytest.mark.parametrize("body", [b"plain text, not gzip\n", gzip.compress(b"the cat sat on the mat\n" * 50)[:-12]],
                         ids=["not-gzip", "truncated"])
def test_a_gz_file_that_is_not_gzip_is_refused(tmp_path, tokenizer, body):
    path = tmp_path / "train.txt.gz"
    path.write_bytes(body)
    with pytest.raises(OffsiteError, match=r"train.txt.gz is not a valid gzip file .*drop the .gz"):
        load_examples(path, "text", tokenizer, 8)


@pytest.mark.parametrize("name", ["train.jsonl", "train.txt"])
def test_jsonl_given_as_text_is_refused(mc_file, tmp_path, tokenizer, name):
    path = tmp_path / name
    path.write_text(mc_file.read_text())  # 40 records: plenty of tokens to be trained on as text
    with pytest.raises(OffsiteError, match=rf"{name} looks like JSONL .*use --format prompt .* or --format mc"):
        load_examples(path, "text", tokenizer, 16)


def test_text_starting_with_json_that_is_no_object_is_still_text(tmp_path, tokenizer):
    path = tmp_path / "numbers.txt"
    path.write_text("3\n" + "the cat sat on the mat and the dog ran in the park\n" * 20)
    assert load_examples(path, "text", tokenizer, 16)


def test_a_data_path_that_is_a_folder_is_refused(tmp_path, tokenizer):
    for fmt in ("text", "mc"):
        with pytest.raises(OffsiteError, match=r"data path .* is a folder; give one data file"):
            load_examples(tmp_path, fmt, tokenizer, 16)


@pytest.mark.parametrize("bad, message", [
    ({**GOOD, "label": -1}, r"mc.jsonl:2: .*unlabeled records \(-1\) cannot be used for fine-tuning"),
    ({**GOOD, "label": True}, r"mc.jsonl:2: 'label' must be an integer index"),
    ({**GOOD, "label": "1"}, r"mc.jsonl:2: 'label' must be an integer index"),
    ({**GOOD, "choices": "abc"}, r"mc.jsonl:2: 'choices' must be a non-empty list of strings"),
])
def test_the_task_path_validates_records(tmp_path, bad, message):
    path = mc_lines(tmp_path / "mc.jsonl", bad)
    with pytest.raises(OffsiteError, match=message):
        prompt_pairs(path, "mc", task="arc_easy")


def test_the_task_path_validates_qa_records(tmp_path):
    path = tmp_path / "mc.jsonl"
    path.write_text(json.dumps({"question": "who?", "answers": "abc"}) + "\n")
    with pytest.raises(OffsiteError, match=r"mc.jsonl:1: QA records need .*non-empty list of strings"):
        prompt_pairs(path, "mc", task="webquestions")


@pytest.mark.parametrize("line, message", [
    (json.dumps({**GOOD, "label": True}), r"task.jsonl:2: 'label' must be an integer index"),
    ("3", r"task.jsonl:2: each line must be one JSON object"),
])
def test_adhoc_eval_tasks_use_the_same_validation(tmp_path, line, message):
    path = mc_lines(tmp_path / "task.jsonl", line)
    with pytest.raises(OffsiteError, match=message):
        list(get_task(str(path)).examples(None, "test"))


def test_adhoc_eval_task_files_must_be_utf8(tmp_path):
    path = tmp_path / "task.jsonl"
    path.write_bytes((json.dumps(GOOD) + "\n").encode() + b'{"question": "\xc3("}\n')
    with pytest.raises(OffsiteError, match=r"task.jsonl:2: not UTF-8 text"):
        list(get_task(str(path)).examples(None, "test"))


def test_unlabeled_records_skip_evaluation_but_refuse_fine_tuning(tmp_path):
    for split in ("train", "test"):
        mc_lines(tmp_path / f"{split}.jsonl", {**GOOD, "id": "hidden", "label": -1})
    task = get_task(str(tmp_path / "{split}.jsonl"))
    assert [e["id"] for e in task.examples(None, "test")] == ["q0"]  # hidden-label test records dropped
    with pytest.raises(OffsiteError, match=r"train.jsonl:2: .*cannot be used for fine-tuning"):
        list(task.finetune_pairs(None, "train"))


@pytest.mark.parametrize("method, settings, message", [
    ("uniform", {"emulator_layers": "abc"}, r"method 'uniform': setting emulator_layers must be an integer or null "
                                            r"\(the default\), got 'abc'"),
    ("uniform", {"emulator_layers": 2.5}, r"setting emulator_layers must be an integer or null .*got 2.5"),
    ("uniform", {"emulator_layers": True}, r"setting emulator_layers must be an integer or null .*got True"),
    ("crash", {"seed": "0"}, r"method 'crash': setting seed must be an integer, got '0'"),
    ("scaleot", {"cache_dir": 3}, r"method 'scaleot': setting cache_dir must be a string or null .*got 3"),
    ("scaleot", {"alpha": True}, r"method 'scaleot': setting alpha must be a finite number, got True"),
    ("distill", {"kd_weight": "abc"}, r"method 'distill': setting kd_weight must be a finite number, got 'abc'"),
    ("gradot", {"seed": 1.5}, r"method 'gradot': setting seed must be an integer, got 1.5"),
])
def test_method_settings_of_the_wrong_type_are_refused(method, settings, message):
    with pytest.raises(OffsiteError, match=message):
        get_builder(method).make_config(**settings)


def test_method_settings_defaults_and_integral_floats_pass():
    for method in available_methods():
        get_builder(method).make_config()  # every default passes its own annotation
    config = get_builder("uniform").make_config(emulator_layers=2.0)
    assert config.emulator_layers == 2 and type(config.emulator_layers) is int
    assert get_builder("scaleot").make_config(alpha=0, beta=0).alpha == 0  # ints are numbers


@pytest.mark.parametrize("settings, message", [
    ({"max_steps": 2.5}, r"fine-tuning setting max_steps must be an integer or null \(the default\), got 2.5"),
    ({"lr": "fast"}, r"fine-tuning setting lr must be a finite number, got 'fast'"),
    ({"lora": "yes"}, r"fine-tuning setting lora must be true or false, got 'yes'"),
    ({"epochs": True}, r"fine-tuning setting epochs must be a finite number, got True"),
    ({"task": 3}, r"fine-tuning setting task must be a string or null"),
    ({"lora_targets": "q_proj"}, r"fine-tuning setting lora_targets must be a list or null"),
    ({"lora_targets": [1]}, r"lora_targets must be a non-empty list of module names \(strings\), got \[1\]"),
])
def test_finetune_settings_of_the_wrong_type_are_refused(settings, message):
    with pytest.raises(OffsiteError, match=message):
        FinetuneConfig(**settings)


def test_finetune_settings_accept_paths_and_integral_floats(tmp_path):
    config = FinetuneConfig(val_data=tmp_path / "val.jsonl", max_steps=3.0)
    assert config.val_data == str(tmp_path / "val.jsonl") and type(config.max_steps) is int


def test_cli_reports_a_bad_method_setting_in_one_line(tmp_path, capsys):
    from offsite.cli import main

    assert main(["emulate", "--model", str(tmp_path / "none"), "--emulator-layers", "abc",
                 "--out", str(tmp_path / "emu")]) == 2
    assert capsys.readouterr().err == ("offsite emulate: error: method 'uniform': setting emulator_layers must be "
                                       "an integer or null (the default), got 'abc'\n")


def _cli_raising(monkeypatch, exc):
    import offsite.cli.families as families

    def run(args):
        raise exc

    monkeypatch.setattr(families, "run", run)  # add_parser looks run up when main builds the parser
    from offsite.cli import main

    return main(["families"])


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys):
    assert _cli_raising(monkeypatch, KeyboardInterrupt()) == 130
    assert capsys.readouterr().err == "offsite families: interrupted\n"


def test_a_full_disk_is_one_line_and_exit_2(monkeypatch, capsys):
    full = OSError(errno.ENOSPC, "No space left on device", "/out/model.safetensors")
    assert _cli_raising(monkeypatch, full) == 2
    err = capsys.readouterr().err
    assert err.startswith("offsite families: error: no space left on device writing /out/model.safetensors;")
    assert err.count("\n") == 1
    with pytest.raises(PermissionError):  # other OS errors are not disguised
        _cli_raising(monkeypatch, PermissionError(errno.EACCES, "Permission denied"))
