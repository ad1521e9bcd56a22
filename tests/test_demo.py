"""The embedded demo: a deterministic generated world, and the quick end-to-end run showing OT's trade-off."""

from __future__ import annotations

import json

import pytest

from offsite.experiments.demo.world import POOL_SIZE, generate_world, questions, write_world


def _files(folder) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_world_is_deterministic_per_seed(tmp_path):
    a = _files_of(tmp_path / "a", seed=3)
    b = _files_of(tmp_path / "b", seed=3)
    c = _files_of(tmp_path / "c", seed=4)
    assert a == b
    assert set(a) == {"corpus.txt", "world.json", "train.jsonl", "validation.jsonl", "test.jsonl"}
    assert all(a[name] != c[name] for name in a)


def _files_of(folder, seed: int) -> dict:
    write_world(generate_world(people=30, seed=seed), folder, variants=2)
    return _files(folder)


def test_task_schema_and_person_disjoint_splits():
    world = generate_world(people=40, seed=0)
    names = {split: set(world.splits[split]) for split in ("train", "validation", "test")}
    assert not names["train"] & names["test"] and not names["train"] & names["validation"]
    assert sum(len(v) for v in names.values()) == 40
    by_name = {p["name"]: p for p in world.people}
    for record in questions(world, "test"):
        assert set(record) == {"id", "context", "question", "choices", "label"}
        assert len(record["choices"]) == len(set(record["choices"])) == POOL_SIZE
        _, person, relation = record["id"].split("-")
        assert person in names["test"] and person in record["context"] and record["question"] == ""
        assert record["choices"][record["label"]] == by_name[person][relation]
    blank = questions(world, "test", style="blank")[0]
    assert blank["question"].startswith("Fill in the blank: ") and blank["question"].endswith("___.")


def test_corpus_tells_every_fact_and_never_asks(tmp_path):
    paths = write_world(generate_world(people=30, seed=0), tmp_path, variants=3)
    corpus = paths["corpus"].read_text(encoding="utf-8")
    for marker in ("Question", "Answer", "blank", "___", "?"):
        assert marker not in corpus
    # values are dealt evenly within every split: answer frequencies learnt on one split say
    # nothing about another
    world_ = generate_world(people=50, seed=0)
    by_name = {p["name"]: p for p in world_.people}
    for relation in world_.relations:
        for members in world_.splits.values():
            counts = {}
            for name in members:
                counts[by_name[name][relation]] = counts.get(by_name[name][relation], 0) + 1
            assert max(counts.values()) - min(counts.values()) <= 1, relation
            assert len(counts) == min(len(members), 10)
    # every person's every fact is told at least once per variant
    world = json.loads(paths["world"].read_text(encoding="utf-8"))
    person = world["people"][0]
    assert corpus.count(person["name"]) >= 3 * len(world["relations"])


@pytest.mark.slow
def test_quick_demo_shows_the_offsite_tuning_trade_off(tmp_path):
    from offsite.experiments.demo import run_demo

    result = run_demo(tmp_path, quick=True, seed=0, progress=False)
    acc = result["accuracy"]
    # Measured at seed 0: full ZS 0.909, emulator ZS 0.345, emulator FT 0.364, plug-in 0.818 (chance
    # 0.10, 55 questions: one answer is 0.018).
    # Utility: the adapter tuned on the emulator works in the full model nearly as well as the
    # full model does, and far better than on the emulator ...
    assert acc["plug_in"] >= acc["emulator_ft"] + 0.30, acc
    assert acc["plug_in"] >= acc["full_zs"] - 0.15, acc
    # ... privacy: the emulator alone stays far below the full model, tuned or not.
    # Tuning helps the emulator a little (a few questions of 55 here, +7 points in the full demo);
    # the margin allows for other CPUs' rounding moving one or two answers.
    assert acc["emulator_ft"] >= acc["emulator_zs"] - 0.04, acc
    assert acc["emulator_zs"] <= acc["full_zs"] - 0.30, acc
    assert (tmp_path / "results.json").is_file() and (tmp_path / "plugged" / "config.json").is_file()
    # Benchmarks start from the same world and model: --prepare-only finds the finished pretraining.
    from offsite.cli import main

    before = (tmp_path / "model" / "model.safetensors").stat().st_mtime_ns
    assert main(["demo", "--world", "--quick", "--prepare-only", "--quiet", "--workdir", str(tmp_path)]) == 0
    assert (tmp_path / "model" / "model.safetensors").stat().st_mtime_ns == before


def test_real_demo_without_the_data_is_one_clear_error_and_writes_nothing(tmp_path, monkeypatch, capsys):
    from offsite.cli import main

    monkeypatch.chdir(tmp_path)  # no ../shared/data from here
    monkeypatch.delenv("OFFSITE_DATA_DIR", raising=False)
    monkeypatch.setenv("OFFSITE_SHARED", str(tmp_path / "nowhere"))
    assert main(["demo", "--workdir", "w"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs the offline SciQ data" in err[0] and "--data-dir" in err[0] and "--world" in err[0]
    assert not (tmp_path / "w").exists()
    (tmp_path / "d").mkdir()
    assert main(["demo", "--world", "--data-dir", "d", "--workdir", "w"]) == 2  # --data-dir means nothing there
    assert "reads no data" in capsys.readouterr().err and not (tmp_path / "w").exists()


@pytest.mark.parametrize("world", [True, False])
def test_the_table_and_the_plot_show_every_row(world, tmp_path):
    from offsite.experiments.demo import format_table, plot_result

    acc = {"full_zs": 0.73, "emulator_zs": 0.5, "emulator_ft": 0.6, "plug_in": 0.76}
    result = {"world": world, "accuracy": acc, "delta": 0.16, "chance": 0.25, "test_questions": 120, "task": "sciq",
              "test_split": "validation", "model": "smollm2-135m", "emulator": {"plan": 18}}
    table = format_table(result)
    assert [line.split()[-1] for line in table.splitlines()[2:6]] == ["73.0%", "50.0%", "60.0%", "76.0%"]
    assert "+16.0" in table and ("never saw" in table) == world and ("18 middle layers" in table) != world
    png = plot_result(result, tmp_path / "r.png")
    assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
