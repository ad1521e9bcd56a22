"""Never silent: with stderr in a file, long phases write plain progress lines at a steady interval."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from offsite.core import progress

LINE = re.compile(r"^\[offsite\] (?P<desc>[^:]+): (?P<n>\d+)/(?P<total>\d+) (?P<unit>\w+) "
                  r"\[(?P<elapsed>[\d:]+)<(?P<eta>[\d:?]+), [^\]]*\]$")


@pytest.fixture(autouse=True)
def progress_on(monkeypatch):
    # The suite may run with OFFSITE_QUIET set; these tests decide for themselves.
    monkeypatch.delenv(progress.ENV_QUIET, raising=False)
    previous_quiet, previous_beat = progress.set_quiet(None), progress.set_heartbeat(None)
    yield
    progress.set_quiet(previous_quiet)
    progress.set_heartbeat(previous_beat)


def test_a_bar_off_a_terminal_writes_a_line_at_every_interval_even_without_updates(capsys):
    progress.set_heartbeat(0.05)
    with progress.bar(3, "slow work", "step") as bar:
        time.sleep(0.4)  # one step that takes eight intervals: the timer speaks, not the updates
        bar.update(1)
        bar.set_postfix(loss="1.2345")
        bar.update(2)
    err = capsys.readouterr().err
    assert "\r" not in err and "\x1b" not in err  # plain lines, no redraws or cursor moves
    lines = err.splitlines()
    assert all(LINE.match(line) for line in lines), lines
    assert LINE.match(lines[0])["n"] == "0"  # the phase announces itself when it starts
    assert sum(LINE.match(line)["n"] == "0" for line in lines) >= 4  # heartbeats while the step ran
    last = LINE.match(lines[-1])
    assert (last["n"], last["total"], last["unit"]) == ("3", "3", "step") and lines[-1].endswith("loss=1.2345]")


def test_a_long_phase_off_a_terminal_says_it_is_still_running(capsys):
    progress.set_heartbeat(0.05)
    with progress.phase("load the model"):
        time.sleep(0.3)
    lines = capsys.readouterr().err.splitlines()
    running = [line for line in lines if re.fullmatch(r"\[offsite\] load the model \.\.\. running, 00:0\d so far", line)]
    assert len(running) >= 3 and re.fullmatch(r"\[offsite\] load the model \.\.\. done in 0\.\ds", lines[-1]), lines


def test_the_interval_comes_from_the_setting_or_the_environment(monkeypatch):
    monkeypatch.setenv(progress.ENV_INTERVAL, "7.5")
    assert progress.heartbeat_seconds() == 7.5
    monkeypatch.setenv(progress.ENV_INTERVAL, "often")  # a typo falls back to the default, it does not stop a run
    assert progress.heartbeat_seconds() == progress.HEARTBEAT
    progress.set_heartbeat(2.0)
    assert progress.heartbeat_seconds() == 2.0
    with pytest.raises(ValueError):
        progress.set_heartbeat(0)


@pytest.mark.slow  # a whole `offsite finetune` process: its import alone is seconds
def test_finetune_with_stderr_in_a_file_shows_step_loss_rate_and_eta(small_emulator, text_file, tmp_path):
    """``offsite finetune`` in the background: its log file gets progress lines, not one redrawn row."""
    log = tmp_path / "finetune.log"
    env = {**os.environ, progress.ENV_INTERVAL: "0.05"}
    env.pop(progress.ENV_QUIET, None)
    cmd = [sys.executable, "-m", "offsite.cli", "finetune", "--emulator", str(small_emulator), "--data",
           str(text_file), "--block-size", "16", "--batch-size", "4", "--max-steps", "40", "--out",
           str(tmp_path / "adapter")]
    with open(log, "w") as err:
        done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=Path(__file__).parents[1],
                              timeout=600)
    text = log.read_text()
    assert done.returncode == 0, text[-2000:]
    assert "\r" not in text
    steps = [LINE.match(line) for line in text.splitlines() if line.startswith("[offsite] finetune:")]
    assert len(steps) >= 3 and all(steps), text[-2000:]
    assert steps[0]["total"] == "40" and steps[0]["unit"] == "step"
    assert any(m["eta"] != "?" and m.string.endswith("]") and "loss=" in m.string for m in steps)
    assert len({m["n"] for m in steps}) >= 2  # the count moves between lines


def test_the_fine_tunes_and_scoring_inside_report_show_progress(saved_model, mc_task, tmp_path, capsys):
    from offsite.experiments.protocol import Protocol
    from offsite.experiments.report import run_report

    progress.set_heartbeat(0.01)
    path, _ = saved_model("llama", 6)
    task, _ = mc_task
    protocol = Protocol(limit=12, train_limit=24, finetune={"max_steps": 20, "batch_size": 4, "lr": 1e-3})
    run_report(str(path), [task], tmp_path / "work", protocol, adapter_layers="1,1",
               method_settings={"uniform": {"emulator_layers": 2}}, log=lambda *a: None)
    lines = capsys.readouterr().err.splitlines()
    descs = {m["desc"] for m in map(LINE.match, lines) if m}
    assert "finetune" in descs  # was silent before: report passed progress=False to its fine-tunes
    assert any(d != "finetune" for d in descs), descs  # and to its scoring
