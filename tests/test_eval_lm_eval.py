"""Agreement with lm-evaluation-harness: same model, same prompts -> same acc, acc_norm and log-likelihoods.

lm-eval runs its own ``HFLM`` on the in-memory tiny model with dict task configs whose
``doc_to_text`` is the prompt our task spec built, so any difference comes from the scoring code.
Also checked against lm-eval's own helpers: ``_encode_pair``, rolling windows, the WikiText
detokenizer and ``loglikelihood_rolling``.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import random
from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from offsite.data import wikitext  # noqa: E402
from offsite.eval import perplexity, scoring  # noqa: E402
from offsite.data.tasks import get_task  # noqa: E402

SHARED = Path(os.environ.get("OFFSITE_SHARED", Path(__file__).resolve().parents[1] / ".." / "shared")).resolve()
SHARED_DATA = SHARED / "data"
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


def tiny_model(tok, max_positions: int):
    from transformers import AutoModelForCausalLM

    from offsite.families import tiny_config

    cfg = tiny_config("llama", 2)
    cfg.vocab_size, cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = len(tok), 1, 2, 3
    cfg.initializer_range, cfg.max_position_embeddings = 0.5, max_positions
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is much faster on a busy 2-core machine
    yield
    torch.set_num_threads(old)


def synthetic_records(task: str, n: int = 20) -> list[dict]:
    """Records in the shared schema when the real data is absent (long passages for boolq)."""
    rng = random.Random(task)
    words = " ".join(TEXT).split()
    out = []
    for i in range(n):
        k = 2 if task == "boolq" else rng.randint(2, 4)
        context = " ".join(rng.choice(words) for _ in range(rng.randint(60, 200))) if task == "boolq" else ""
        choices = (["no", "yes"] if task == "boolq"
                   else [" ".join(rng.sample(words, rng.randint(1, 4))) for _ in range(k)])
        out.append({"id": f"{task}-{i}", "context": context, "question": f"is {rng.choice(words)} {i}?",
                    "choices": choices, "label": rng.randrange(k)})
    return out


def make_task_file(tmp_path: Path, task: str) -> Path:
    """20 labelled records of ``task`` (shared validation data when present) as a data-dir file."""
    rel = get_task(task).path.replace("{split}", "validation")
    path = tmp_path / "data" / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if SHARED_DATA.is_dir():
        records = list(get_task(task).records(SHARED_DATA, "validation", limit=20))
    else:
        records = synthetic_records(task)
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in records)
    return path


@pytest.mark.slow
def test_acc_and_loglik_equal_lm_eval(tmp_path):
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tok = tiny_tokenizer(bos=True)
    # 1024 positions: BoolQ passages (~1 token per character here) use the KV-cache path, and the
    # longest ones are left-truncated on both sides.
    model = tiny_model(tok, max_positions=1024)
    tasks = ["arc_easy", "piqa", "boolq"]
    configs, ours = [], {}
    for name in tasks:
        make_task_file(tmp_path, name)
        spec = get_task(name)
        examples = list(spec.examples(tmp_path / "data", "validation"))
        plain = tmp_path / f"{name}.jsonl"  # our prompt, verbatim, as lm-eval's doc_to_text
        plain.write_text("".join(json.dumps({"prompt": e["context"], "choices": e["choices"], "label": e["gold"]})
                                 + "\n" for e in examples))
        configs.append(dict(task=f"offsite_{name}", dataset_path="json", output_type="multiple_choice",
                            dataset_kwargs={"data_files": {"test": str(plain)}, "cache_dir": str(tmp_path / "hf")},
                            test_split="test", doc_to_text="{{prompt}}", doc_to_target="{{label}}",
                            doc_to_choice="{{choices}}", metadata={"version": 1.0},
                            metric_list=[{"metric": m, "aggregation": "mean", "higher_is_better": True}
                                         for m in ("acc", "acc_norm")]))
        ours[name] = scoring.score_multiple_choice(model, tok, examples, batch_size=8, progress=False)
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=8, device="cpu")
    out = lm_eval.simple_evaluate(model=lm, tasks=configs, task_manager=TaskManager(), log_samples=True)
    for name in tasks:
        theirs = out["results"][f"offsite_{name}"]
        samples = sorted(out["samples"][f"offsite_{name}"], key=lambda s: int(s["doc_id"]))
        assert len(samples) == ours[name]["n"] == 20
        assert ours[name]["acc"] == theirs["acc,none"], name
        assert ours[name]["acc_norm"] == theirs["acc_norm,none"], name
        for mine, sample in zip(ours[name]["details"], samples):
            assert mine["loglik"] == pytest.approx([ll for ll, _ in sample["filtered_resps"]], abs=1e-3)
    # The comparison must have covered both execution paths (shared from 64 context tokens).
    lengths = [len(tok.encode(e["context"])) for e in get_task("boolq").examples(tmp_path / "data", "validation")]
    assert any(64 <= n < 1000 for n in lengths)


def test_encode_pair_equals_lm_eval():
    from lm_eval.models.huggingface import HFLM

    for bos in (False, True):
        tok = tiny_tokenizer(bos=bos)
        lm = HFLM(pretrained=tiny_model(tok, 64), tokenizer=tok, batch_size=1, device="cpu")
        for ctx, cont in [("Question: why?\nAnswer:", " yes"), ("The quick brown fox ", " jumps"),
                          ("Roof:\n\n", " A man"), ("<s>Already bos", " x"), ("dog.", " The lazy  dog")]:
            assert scoring.encode_pair(tok, ctx, cont) == tuple(lm._encode_pair(ctx, cont))
        assert scoring.resolve_max_length(lm.model, tok) == lm.max_length


@pytest.mark.parametrize("n", [1, 5, 16, 17, 40, 64])
def test_rolling_windows_equal_lm_eval(n):
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    tokens = list(range(100, 100 + n))
    expected = [make_disjoint_window(w) for w in get_rolling_token_windows(tokens, prefix_token=7, max_seq_len=16,
                                                                           context_len=1)]
    assert perplexity.rolling_windows(tokens, 7, 16) == [tuple(map(list, w)) for w in expected]
    # stride s is lm-eval's context_len = L - s + 1
    expected = [make_disjoint_window(w) for w in get_rolling_token_windows(tokens, prefix_token=7, max_seq_len=16,
                                                                           context_len=12)]
    assert perplexity.rolling_windows(tokens, 7, 16, stride=5) == [tuple(map(list, w)) for w in expected]


def test_rolling_loglikelihood_equals_lm_eval():
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    tok = tiny_tokenizer()  # no BOS added: lm-eval's encoding of the text then equals ours
    model = tiny_model(tok, 512)
    text = " ".join(TEXT * 3)
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=4, device="cpu", max_length=32)
    request = Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0)
    (theirs,) = lm.loglikelihood_rolling([request], disable_tqdm=True)
    ours, _ = perplexity.rolling_loglikelihood(model, tok, text, max_length=32, batch_size=4)
    assert ours == pytest.approx(theirs, abs=1e-3)


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="shared data folder not available")
def test_wikitext_detokenizer_equals_lm_eval():
    path = Path(lm_eval.__file__).parent / "tasks" / "wikitext" / "preprocess_wikitext.py"
    spec = importlib.util.spec_from_file_location("lm_eval_wikitext_preprocess", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for doc in wikitext.load_wikitext(SHARED_DATA, "validation", limit=10):
        assert wikitext.wikitext_detokenize(doc) == module.wikitext_detokenizer({"page": doc})
