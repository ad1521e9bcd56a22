"""The report workflow: five numbers and Δ per task on a tiny model with an ad-hoc task file."""

import json

import pytest

from offsite.core.errors import OffsiteError
from offsite.experiments.protocol import Protocol
from offsite.experiments.report import ROWS, format_report, run_report


def test_report_has_the_five_numbers_and_delta(saved_model, mc_task, tmp_path):
    path, _ = saved_model("llama", 6)
    task, folder = mc_task
    protocol = Protocol(limit=12, train_limit=24, finetune={"max_steps": 3, "batch_size": 4, "lr": 1e-3})
    report = run_report(str(path), [task], tmp_path / "work", protocol, adapter_layers="1,1",
                        method_settings={"uniform": {"emulator_layers": 2}}, full_ft=True, log=lambda *a: None)
    table = report["methods"]["uniform"]["table"]
    for row in ROWS:
        assert 0.0 <= table[row][task] <= 1.0, (row, table[row])
        assert table[row]["avg"] == table[row][task]
    # Each row is what scoring its own model gives: swapping two rows, or scoring the wrong model
    # for one, fails here (ranges alone would not notice).
    from offsite.eval.run import evaluate
    from offsite.eval.loading import load_for_eval

    work = tmp_path / "work"
    adapter = str(work / f"adapter-uniform-{folder.name}")
    models = {"full_zs": (str(path), None), "emu_zs": (str(work / "emulator-uniform"), None),
              "emu_ft": (str(work / "emulator-uniform"), adapter), "plug_in": (str(path), adapter),
              "full_ft": (str(path), str(work / f"adapter-full-{folder.name}"))}
    for row, (model, with_adapter) in models.items():
        m, tok, _ = load_for_eval(model, adapter=with_adapter)
        result = evaluate(m, tok, [task], None, limit=12, progress=False)["results"][task]
        assert table[row][task] == pytest.approx(result["acc"]), row
    delta = report["methods"]["uniform"]["delta"][task]
    assert delta == table["plug_in"][task] - table["emu_ft"][task]
    # Full FT really tuned every block: its adapter holds all six layers of the base model.
    manifest = json.loads((tmp_path / "work" / f"adapter-full-{folder.name}" / "manifest.json").read_text())
    assert manifest["split"]["adapter"] == list(range(6)) and manifest["split"]["middle"] == []
    assert json.loads((tmp_path / "work" / "report.json").read_text())["methods"]["uniform"]["delta"]
    text = format_report(report)
    assert "Full FT" in text and "Plug-in" in text


def test_report_refuses_a_task_it_would_train_and_score_on_before_any_model_work(mc_file, tmp_path):
    with pytest.raises(OffsiteError, match="single file.*{split}"):
        run_report("no-such-model", [str(mc_file)], tmp_path / "work", log=lambda *a: None)
    with pytest.raises(OffsiteError, match="WikiText fine-tuning text not found"):
        run_report("no-such-model", ["wikitext"], tmp_path / "work", Protocol(data_dir=tmp_path), log=lambda *a: None)


def test_wikitext_fine_tunes_on_text_in_the_style_it_is_scored_on(tmp_path):
    """The v1 train text is detokenised by the rules evaluation applies to the raw text: the tokenizer's
    marks are gone and punctuation comes at the rates of the detokenised text that is scored."""
    import gzip

    from fixtures.llama2c import shared_dir
    from offsite.data.wikitext import load_wikitext, wikitext_detokenize
    from offsite.experiments.protocol import train_file

    if shared_dir() is None or not (shared_dir() / "data/lm/wikitext-2-v1-tokens").is_dir():
        pytest.skip("shared WikiText data not present")
    data = shared_dir() / "data"
    path, fmt = train_file("wikitext", data, tmp_path, None)
    text = path.read_text()
    assert fmt == "text" and path.parent == tmp_path and len(text) > 10_000_000
    with gzip.open(data / "lm/wikitext-2-v1-tokens/wiki.train.tokens.gz", "rt", encoding="utf-8") as fh:
        tokens = fh.read()
    for mark in (" @-@ ", " , ", " . ", " 's "):  # the tokenizer's marks are (almost) all gone
        assert text.count(mark) < 0.01 * tokens.count(mark), mark
    # ... as in the text evaluation scores: the raw validation articles, detokenised
    scored = "\n\n".join(wikitext_detokenize(d) for d in load_wikitext(data, "validation"))

    def rate(t, mark):
        return t.count(mark) / len(t)

    for mark in (", ", ". ", "-", "'s "):  # the same punctuation style, at about the same rates
        assert 0.7 < rate(text, mark) / rate(scored, mark) < 1.4, (mark, rate(text, mark), rate(scored, mark))


def test_a_streamed_report_gives_the_in_memory_report(saved_model, mc_task, text_file, tmp_path):
    """--stream builds with emulate --stream and scores the full model with its layers on disk: every
    number of the report is the in-memory report's (the emulator and adapter are bitwise the same)."""
    path, _ = saved_model("llama", 6)
    task, _ = mc_task
    protocol = Protocol(limit=12, train_limit=24, finetune={"max_steps": 2, "batch_size": 4, "lr": 1e-3})
    common = dict(adapter_layers="1,1", methods=("uniform", "crash"),
                  method_settings={"uniform": {"emulator_layers": 2},
                                   "crash": {"emulator_layers": 2, "seq_len": 16, "num_sequences": 4}},
                  log=lambda *a: None, calibration=str(text_file))
    whole = run_report(str(path), [task], tmp_path / "whole", protocol, **common)
    streamed = run_report(str(path), [task], tmp_path / "streamed", protocol, stream=True, **common)
    assert streamed["stream"] is True
    for method in ("uniform", "crash"):
        assert streamed["methods"][method]["table"] == whole["methods"][method]["table"]
        ids = [json.loads((tmp_path / w / f"emulator-{method}" / "manifest.json").read_text())["artifact_id"]
               for w in ("whole", "streamed")]
        assert ids[0] == ids[1]


def test_a_streamed_report_refuses_what_needs_the_whole_model_before_any_work(mc_task, tmp_path):
    task, _ = mc_task
    with pytest.raises(OffsiteError, match="--full-ft trains every block"):
        run_report("no-such-model", [task], tmp_path / "w", full_ft=True, stream=True, log=lambda *a: None)
    with pytest.raises(OffsiteError, match="method 'scaleot' cannot build from a streamed model"):
        run_report("no-such-model", [task], tmp_path / "w", methods=("uniform", "scaleot"), stream=True,
                   log=lambda *a: None)
    assert not (tmp_path / "w").exists()
