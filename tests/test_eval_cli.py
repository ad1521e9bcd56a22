"""``offsite eval`` end to end on a tiny saved model folder, through ``offsite.eval.loading.load_for_eval``."""

from __future__ import annotations

import gzip
import json

import pytest
import torch

from offsite.cli import main

TEXT = ["The quick brown fox jumps over the lazy dog.", "Question: What is the answer?\nAnswer: yes no maybe",
        "Science is the study of the natural world.", "A man is sitting on a roof. He starts pulling up roofing."]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A random 2-layer Llama and a byte-level BPE tokenizer saved as a plain HF folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from offsite.families import tiny_config

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(TEXT * 5, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>")
    cfg = tiny_config("llama", 2)
    cfg.vocab_size, cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = len(tok), 1, 2, 3
    cfg.max_position_embeddings = 512
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama")
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    files = {
        "mc/arc_easy/validation.jsonl.gz": [
            {"id": f"a{i}", "context": "", "question": f"Which one is {i}?", "choices": ["red", "blue", "green"],
             "label": i % 3} for i in range(4)],
        "qa/webquestions/test.jsonl.gz": [{"id": "w1", "question": "who is it?", "answers": ["me", "you"]}],
    }
    for rel, records in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        with gzip.open(root / rel, "wt", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in records)
    return root


@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is much faster on a busy 2-core machine
    yield
    torch.set_num_threads(old)


def test_eval_writes_results_json_and_prints_table(model_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "res" / "eval.json"
    rc = main(["eval", "--model", str(model_dir), "--tasks", "arc_easy,webquestions", "--data-dir", str(data_dir),
               "--limit", "3", "--batch-size", "4", "--out", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    arc = report["results"]["arc_easy"]
    assert arc["n"] == 3 and arc["split"] == "validation" and 0 <= arc["acc"] <= 1 and 0 <= arc["acc_norm"] <= 1
    assert report["results"]["webquestions"]["split"] == "test" and "exact_match" in report["results"]["webquestions"]
    assert report["settings"]["tasks"] == ["arc_easy", "webquestions"] and report["settings"]["limit"] == 3
    assert report["model"]["model_type"] == "llama" and report["model"]["parameters"] > 0
    printed = capsys.readouterr().out
    assert "arc_easy" in printed and "acc_norm" in printed and str(out) in printed


def test_data_dir_defaults_to_environment(model_dir, data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("OFFSITE_DATA_DIR", str(data_dir))
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", str(model_dir), "--tasks", "arc_easy", "--limit", "2", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["settings"]["data_dir"] == str(data_dir.resolve())


def test_missing_data_dir_is_a_clear_error(model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("OFFSITE_DATA_DIR", raising=False)
    rc = main(["eval", "--model", str(model_dir), "--tasks", "arc_easy", "--out", str(tmp_path / "x.json")])
    assert rc == 2 and "pass --data-dir" in capsys.readouterr().err


def test_own_data_tasks_need_no_data_dir(model_dir, mc_task, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("OFFSITE_DATA_DIR", raising=False)
    out = tmp_path / "x.json"
    assert main(["eval", "--model", str(model_dir), "--tasks", mc_task[0], "--limit", "4", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["settings"]["data_dir"] is None
    assert main(["report", "--model", str(model_dir), "--tasks", mc_task[0] + ",wikitext", "--workdir",
                 str(tmp_path / "w")]) == 2
    assert "pass --data-dir" in capsys.readouterr().err


def test_unknown_task_fails_before_loading_the_model(data_dir, tmp_path, capsys):
    rc = main(["eval", "--model", str(tmp_path / "no-such-model"), "--tasks", "arc_easy,piqaa",
               "--data-dir", str(data_dir), "--out", str(tmp_path / "x.json")])
    err = capsys.readouterr().err
    assert rc == 2 and "unknown task 'piqaa'" in err and "known tasks:" in err and "hellaswag" in err


def test_missing_task_file_names_the_path(model_dir, data_dir, tmp_path, capsys):
    rc = main(["eval", "--model", str(model_dir), "--tasks", "sciq", "--data-dir", str(data_dir),
               "--out", str(tmp_path / "x.json")])
    err = capsys.readouterr().err
    assert rc == 2 and str(data_dir / "mc" / "sciq" / "validation.jsonl.gz") in err and "--data-dir" in err
    assert not (tmp_path / "x.json").exists()


def test_bad_limit_is_refused(data_dir, tmp_path, capsys):
    rc = main(["eval", "--model", "m", "--tasks", "arc_easy", "--data-dir", str(data_dir), "--limit", "0",
               "--out", str(tmp_path / "x.json")])
    assert rc == 2 and "--limit must be a positive integer" in capsys.readouterr().err


def test_eval_scores_a_causal_lm_outside_the_families(mc_task, tmp_path, tokenizer, capsys):
    """Scoring an untouched model needs no knowledge of its layers: a StarCoder2 folder (no offsite
    family) is scored, with the log-likelihoods of one plain forward pass per choice; emulating it
    or plugging an adapter into it is still refused in one line."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from conftest import make_tokenizer

    tok = make_tokenizer()
    cfg = AutoConfig.for_model("starcoder2", vocab_size=128, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                               num_hidden_layers=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1,
                               eos_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    path = tmp_path / "starcoder2"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    template, folder = mc_task
    out = tmp_path / "r.json"
    assert main(["eval", "--model", str(path), "--tasks", template, "--limit", "5", "--details", "--out", str(out)]) == 0
    details = next(iter(json.loads(out.read_text())["details"].values()))
    rows = [json.loads(line) for line in (folder / "validation.jsonl").read_text().splitlines()][:5]
    for row, got in zip(rows, details):
        for choice, ll in zip(row["choices"], got["loglik"]):
            ctx = tok(f"Question: {row['question']}\nAnswer:")["input_ids"]
            ids = tok(f"Question: {row['question']}\nAnswer: {choice}")["input_ids"]
            assert ids[:len(ctx)] == ctx  # the choice is a continuation of the context's tokens
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].double(), -1)
            want = sum(logp[i - 1, ids[i]].item() for i in range(len(ctx), len(ids)))
            assert abs(want - ll) <= 1e-4 * max(1.0, abs(want)), (row["id"], choice)
    capsys.readouterr()
    assert main(["emulate", "uniform", "--model", str(path), "--out", str(tmp_path / "emu")]) == 2
    assert "unsupported architecture model_type='starcoder2'" in capsys.readouterr().err
