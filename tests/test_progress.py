"""Progress bars, phase lines, --quiet and the end-of-command cost line (offsite.core.progress, offsite.cli)."""

from __future__ import annotations

import re

import pytest

from offsite.core import progress
from offsite.cli import main

COST = re.compile(r"^offsite (\w+): done in \d+\.\d s, peak RSS \d+\.\d\d GB(, CUDA peak \d+\.\d\d GB)?$")


@pytest.fixture(autouse=True)
def progress_on(monkeypatch):
    # The suite may run with OFFSITE_QUIET set; these tests decide for themselves.
    monkeypatch.delenv(progress.ENV_QUIET, raising=False)
    previous = progress.set_quiet(None)
    yield
    progress.set_quiet(previous)


def _gradot_argv(saved_model, text_file, out):
    path, _ = saved_model("llama", 4)
    return ["emulate", "--model", str(path), "--method", "gradot", "--adapter-layers", "1,1", "--calibration",
            str(text_file), "--set", "seq_len=16", "num_sequences=4", "batch_size=2", "--out", str(out)]


def test_gradot_emulate_shows_every_long_phase_then_the_cost_line(saved_model, text_file, tmp_path, capsys):
    assert main(_gradot_argv(saved_model, text_file, tmp_path / "emu")) == 0
    captured = capsys.readouterr()
    for shown in ("calibration forward", "backward sweep", "gcs terms, layer 2", "gcs terms, layer 1",
                  "[offsite] build the gradot emulator ... done in", "[offsite] write the package ... done in"):
        assert shown in captured.err
    assert COST.match(captured.err.splitlines()[-1]).group(1) == "emulate"
    assert "calibration" not in captured.out and "peak RSS" not in captured.out  # stdout keeps results only


@pytest.mark.parametrize("where", ["before", "after"])
def test_quiet_leaves_only_the_cost_line(saved_model, text_file, tmp_path, capsys, where):
    argv = _gradot_argv(saved_model, text_file, tmp_path / "emu")
    argv = ["--quiet", *argv] if where == "before" else [*argv, "--quiet"]
    assert main(argv) == 0
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and COST.match(lines[0])
    assert not progress.is_quiet()  # the switch does not outlive the command


def test_families_ends_with_the_cost_line(capsys):
    assert main(["families"]) == 0
    captured = capsys.readouterr()
    assert COST.match(captured.err.strip()).group(1) == "families" and "peak RSS" not in captured.out


def test_an_error_is_one_line_without_the_cost_line(tmp_path, capsys):
    assert main(["emulate", "--model", str(tmp_path / "none"), "--emulator-layers", "abc",
                 "--out", str(tmp_path / "emu")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("offsite emulate: error:") and "peak RSS" not in err


def test_switches_combine_and_the_environment_is_honoured(monkeypatch, capsys):
    assert not progress.bar(3, "x").disable
    assert progress.bar(3, "x", enabled=False).disable  # a caller's own progress=False wins
    with progress.quieted():
        assert progress.bar(3, "x").disable and not progress.showing(True)
        with progress.phase("silent"):
            pass
    monkeypatch.setenv(progress.ENV_QUIET, "1")
    assert progress.is_quiet()
    progress.set_quiet(False)  # an explicit switch overrides the environment
    assert progress.showing(True)
    with progress.phase("loud"):
        pass
    err = capsys.readouterr().err
    assert "silent" not in err and re.search(r"\[offsite\] loud \.\.\. done in \d+\.\ds\n", err)


def test_cost_line_adds_cuda_peak_when_cuda_was_used(monkeypatch):
    monkeypatch.setattr(progress, "cuda_peak_bytes", lambda: 4_560_000_000)
    line = progress.cost_line("eval", 12.34)
    assert line.startswith("offsite eval: done in 12.3 s, peak RSS ") and line.endswith(", CUDA peak 4.56 GB")
    assert COST.match(line)
