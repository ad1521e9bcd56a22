"""Task specs: prompts on one fixture record per task, splits, limits, errors, the evaluate workflow."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest
import torch

from offsite.core.errors import OffsiteError
from offsite.data.tasks import get_task, list_tasks

SHARED = Path(os.environ.get("OFFSITE_SHARED", Path(__file__).resolve().parents[1] / ".." / "shared")).resolve()
SHARED_DATA = SHARED / "data"


def mc(id_, context="", question="", choices=("a", "b"), label=0, **extra):
    return {"id": id_, "context": context, "question": question, "choices": list(choices), "label": label, **extra}


FIXTURES = {
    "mc/openbookqa/validation.jsonl.gz": [mc("o1", question="Frilled sharks live", choices=["deep", "high"])],
    "mc/piqa/validation.jsonl.gz": [mc("p1", question="How to boil water?", choices=["heat it", "cool it"]),
                                    mc("p2", question="How to dry?", choices=["sun", "rain"], label=1)],
    "mc/piqa/test.jsonl.gz": [mc("pt", question="hidden", label=-1)],
    "mc/arc_easy/validation.jsonl.gz": [mc("a0", question="Unlabeled?", label=-1)] +
                                       [mc(f"a{i}", question=f"Which is {i}?", choices=["x", "y", "z"], label=i % 3)
                                        for i in range(1, 6)],
    "mc/arc_easy/train.jsonl.gz": [mc("at", question="Train q?", choices=["x", "y"], label=1)],
    "mc/arc_challenge/validation.jsonl.gz": [mc("c1", question="Hard?", choices=["1", "2", "3", "4"], label=3)],
    "mc/hellaswag/validation.jsonl.gz": [mc("h1", context="Roof shingle removal: A man is sitting on a roof. he",
                                            choices=["is using wrap.", "starts pulling up roofing."], label=1)],
    "mc/sciq/validation.jsonl.gz": [mc("s1", context="  Cells make energy.", question="What makes energy?",
                                       choices=["rocks", "air", "sand", "cells"], label=3),
                                    mc("s2", question="No support?", choices=["a", "b", "c", "d"], label=3)],
    "mc/race/high/validation.jsonl.gz": [mc("r1#0", context="Tom went home.", question="Where did Tom go?",
                                            choices=["home", "school", "park", "shop"], article_id="r1")],
    "mc/boolq/validation.jsonl.gz": [mc("b1", context="Water is wet.", question="is water wet?",
                                        choices=["no", "yes"], label=1),
                                     mc("b2", context="Fire is hot.", question="is fire cold",
                                        choices=["no", "yes"], label=0)],
    "qa/webquestions/test.jsonl.gz": [{"id": "w1", "question": "what does jamaican people speak?",
                                       "answers": ["Jamaican English", "Jamaican Creole"]}],
    "qa/webquestions/train.jsonl.gz": [{"id": "w0", "question": "who is x?", "answers": ["Y", "Z"]}],
}
WIKI = " \n = Alpha = \n \n Alpha is a word @-@ like thing .\n = = Sub = = \n More text .\n = Beta = \n Beta 's end .\n"


@pytest.fixture
def data_dir(tmp_path):
    for rel, records in FIXTURES.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with gzip.open(path, "wt", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in records)
    wiki = tmp_path / "lm" / "wikitext-2-raw"
    wiki.mkdir(parents=True)
    with gzip.open(wiki / "wiki.valid.raw.gz", "wt", encoding="utf-8") as fh:
        fh.write(WIKI)
    return tmp_path


# Same tiny model builders as tests/test_eval_scoring.py (test files do not import each other).
TEXT = ["The quick brown fox jumps over the lazy dog.", "Question: What is the answer?\nAnswer: yes no maybe",
        "Science is the study of the natural world.", "A man is sitting on a roof. He starts pulling up roofing."]


def tiny_tokenizer(bos: bool = False):
    """Byte-level BPE trained on TEXT; with ``bos`` it prepends <s> like Llama tokenizers do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(TEXT * 5, trainer)
    if bos:
        tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def tiny_model(tok, family: str = "llama", max_positions: int = 512):
    """A random 2-layer model whose vocab matches ``tok``; a large init spreads the log-probs apart."""
    from transformers import AutoModelForCausalLM

    from offsite.families import tiny_config

    cfg = tiny_config(family, 2)
    cfg.vocab_size, cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = len(tok), 1, 2, 3
    cfg.initializer_range = 0.5
    for attr in ("max_position_embeddings", "n_positions"):
        if hasattr(cfg, attr):
            setattr(cfg, attr, max_positions)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


EXPECTED_PROMPTS = {
    "openbookqa": "Frilled sharks live",
    "piqa": "Question: How to boil water?\nAnswer:",
    "arc_easy": "Question: Which is 1?\nAnswer:",
    "arc_challenge": "Question: Hard?\nAnswer:",
    "hellaswag": "Roof shingle removal: A man is sitting on a roof. he",
    "sciq": "Cells make energy.\nQuestion: What makes energy?\nAnswer:",
    "race": "Article: Tom went home.\n\nQuestion: Where did Tom go?\n\nAnswer:",
    "boolq": "Water is wet.\nQuestion: is water wet?\nAnswer:",
    "webquestions": "Question: what does jamaican people speak?\nAnswer:",
}


def test_list_tasks_has_the_ot_benchmark():
    assert set(list_tasks()) == {"openbookqa", "piqa", "arc_easy", "arc_challenge", "hellaswag", "sciq", "race",
                                 "boolq", "webquestions", "wikitext"}


@pytest.mark.parametrize("name", sorted(EXPECTED_PROMPTS))
def test_prompt_of_first_record(data_dir, name):
    first = next(get_task(name).examples(data_dir, "validation"))
    assert first["context"] == EXPECTED_PROMPTS[name]
    if name == "webquestions":
        assert first["answers"] == ["Jamaican English", "Jamaican Creole"]
    else:
        records = FIXTURES[next(k for k in FIXTURES if f"/{name}/" in k and "validation" in k)]
        record = next(r for r in records if r["label"] != -1)
        assert first["choices"] == record["choices"] and first["gold"] == record["label"]


def test_sciq_without_support_and_boolq_question_mark(data_dir):
    sciq = list(get_task("sciq").examples(data_dir, "validation"))
    assert sciq[1]["context"] == "\nQuestion: No support?\nAnswer:"  # lm-eval's template, empty support
    boolq = list(get_task("boolq").examples(data_dir, "validation"))
    assert boolq[1]["context"] == "Fire is hot.\nQuestion: is fire cold?\nAnswer:"


def test_unlabeled_records_are_dropped_before_limit(data_dir):
    ex = list(get_task("arc_easy").examples(data_dir, "validation", limit=2))
    assert [e["id"] for e in ex] == ["a1", "a2"]
    assert len(list(get_task("arc_easy").examples(data_dir, "validation"))) == 5


def test_split_fallbacks(data_dir):
    assert get_task("webquestions").resolve_split("validation") == "test"
    assert get_task("hellaswag").resolve_split("test") == "validation"
    assert get_task("boolq").resolve_split("train") == "validation"
    assert get_task("piqa").resolve_split("test") == "validation"  # hidden test labels
    assert [e["id"] for e in get_task("piqa").examples(data_dir, "test")] == ["p1", "p2"]
    assert get_task("arc_easy").resolve_split("default") == "test"
    assert get_task("piqa").resolve_split("default") == "validation"
    with pytest.raises(OffsiteError, match="available: validation"):
        get_task("hellaswag").resolve_split("train", strict=True)


def test_finetune_pairs(data_dir):
    assert list(get_task("arc_easy").finetune_pairs(data_dir, "train")) == [("Question: Train q?\nAnswer:", " y")]
    assert list(get_task("webquestions").finetune_pairs(data_dir, "train")) == [("Question: who is x?\nAnswer:", " Y")]
    pairs = list(get_task("boolq").finetune_pairs(data_dir, "validation", limit=1))
    assert pairs == [("Water is wet.\nQuestion: is water wet?\nAnswer:", " yes")]
    with pytest.raises(OffsiteError, match="no 'train' split"):
        list(get_task("hellaswag").finetune_pairs(data_dir, "train"))  # never trains on the eval split
    docs = list(get_task("wikitext").finetune_pairs(data_dir, "validation"))
    assert len(docs) == 2 and docs[0][0] == "" and "Alpha" in docs[0][1]


def test_unknown_task_lists_known_tasks():
    with pytest.raises(OffsiteError, match="unknown task 'arc_esay'.*arc_easy.*webquestions"):
        get_task("arc_esay")


def test_missing_file_names_the_path_and_the_option(tmp_path):
    with pytest.raises(OffsiteError) as err:
        list(get_task("sciq").examples(tmp_path, "validation"))
    assert str(tmp_path / "mc" / "sciq" / "validation.jsonl.gz") in str(err.value)
    assert "--data-dir" in str(err.value)
    with pytest.raises(OffsiteError, match="--data-dir"):
        list(get_task("wikitext").examples(tmp_path, "validation"))
    with pytest.raises(OffsiteError, match="OFFSITE_DATA_DIR"):
        list(get_task("sciq").examples(None, "validation"))


def test_bad_records_are_refused(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(mc("x", question="q")) + "\n{not json\n")
    with pytest.raises(OffsiteError, match=r"bad.jsonl:2 is not valid JSON"):
        list(get_task(str(bad)).examples(None, "validation"))
    bad.write_text(json.dumps(mc("x", question="q", label=5)) + "\n")
    with pytest.raises(OffsiteError, match="'label' must be"):
        get_task(str(bad))
    with pytest.raises(OffsiteError, match="task file not found"):
        get_task(str(tmp_path / "nope.jsonl.gz"))
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps(mc("x", question="q")) + "\n")
    with pytest.raises(OffsiteError, match="--limit"):
        list(get_task(str(good)).examples(None, "validation", limit=0))


def test_adhoc_jsonl_tasks(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [mc("m1", context="Ctx.", question="Q?"),
                                                      mc("m2", context="Only context"),
                                                      mc("m3", question="Bare?", label=-1)]) + "\n")
    task = get_task(str(path))
    assert task.kind == "multiple_choice" and task.resolve_split("validation") == "file"
    assert [e["context"] for e in task.examples(None, "test")] == ["Ctx.\nQuestion: Q?\nAnswer:", "Only context"]
    qa = tmp_path / "qa.jsonl.gz"
    with gzip.open(qa, "wt") as fh:
        fh.write(json.dumps({"id": "z", "question": "who?", "answers": ["me"]}) + "\n")
    task = get_task(str(qa))
    assert task.kind == "exact_match" and next(task.examples(None, "test"))["answers"] == ["me"]
    with pytest.raises(OffsiteError, match="single file.*{split}"):  # would train on what it scores
        list(task.finetune_pairs(None, "train"))


def test_adhoc_tasks_with_one_file_per_split(tmp_path):
    for split in ("train", "test"):
        (tmp_path / f"{split}.jsonl").write_text(json.dumps(mc(f"{split}-1", question=f"{split}?")) + "\n")
    task = get_task(str(tmp_path / "{split}.jsonl"))
    assert task.splits == ("train", "test") and task.resolve_split("default") == "test"
    assert [e["id"] for e in task.examples(None, "test")] == ["test-1"]
    assert list(task.finetune_pairs(None, "train")) == [("Question: train?\nAnswer:", " a")]
    with pytest.raises(OffsiteError, match="no 'validation' split.*train, test"):
        list(task.examples(None, "validation"))
    with pytest.raises(OffsiteError, match="task files not found"):
        get_task(str(tmp_path / "nothing" / "{split}.jsonl"))


def test_evaluate_workflow_on_fixture_data(data_dir):
    from offsite.eval import evaluate, format_table

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is much faster on a busy 2-core box
    tok = tiny_tokenizer()
    model = tiny_model(tok)
    try:
        report = evaluate(model, tok, "arc_easy,boolq,webquestions,wikitext", data_dir, limit=3,
                          progress=False, keep_details=True)
    finally:
        torch.set_num_threads(threads)
    res = report["results"]
    assert list(res) == ["arc_easy", "boolq", "webquestions", "wikitext"]
    assert res["arc_easy"]["n"] == 3 and 0 <= res["arc_easy"]["acc"] <= 1 and "acc_norm" in res["arc_easy"]
    assert res["webquestions"]["split"] == "test" and res["webquestions"]["requested_split"] == "validation"
    assert "exact_match" in res["webquestions"]
    assert res["wikitext"]["n"] == 2 and res["wikitext"]["word_perplexity"] > 1
    assert len(report["details"]["arc_easy"]) == 3
    table = format_table(report)
    assert "arc_easy" in table and "word_perplexity" in table
    json.dumps(report)  # JSON-serialisable as is


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="shared data folder not available")
def test_shared_data_counts_and_first_prompts():
    counts = {"arc_easy": 570, "arc_challenge": 299, "openbookqa": 500, "sciq": 1000, "piqa": 1838,
              "boolq": 3270, "race": 3451}
    for name, n in counts.items():
        examples = list(get_task(name).examples(SHARED_DATA, "validation"))
        assert len(examples) == n, name
        assert all(0 <= e["gold"] < len(e["choices"]) for e in examples)
    assert sum(1 for _ in get_task("webquestions").examples(SHARED_DATA, "validation")) == 2032
    from offsite.data.wikitext import load_wikitext

    assert len(load_wikitext(SHARED_DATA, "validation")) == 60
    assert len(load_wikitext(SHARED_DATA, "test")) == 62
    first = next(get_task("hellaswag").examples(SHARED_DATA, "validation"))
    assert first["context"].startswith("Roof shingle removal: ") and len(first["choices"]) == 4
