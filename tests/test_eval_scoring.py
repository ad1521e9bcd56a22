"""Scoring invariants: log-likelihoods, acc/acc_norm, batching, KV-cache path, perplexity, exact match.

Every reference number is recomputed here with the plainest possible code: one full forward pass
per (context + continuation), log_softmax, sum.
"""

from __future__ import annotations

import math
import re

import pytest
import torch

from offsite.data import wikitext
from offsite.eval import generation, perplexity, scoring

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


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny matmuls are far slower with 2 OpenMP threads on a shared 2-core machine.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(tok)


def naive_loglik(model, ctx_ids, cont_ids, max_length=None):
    """Sum of log p(cont | ctx) from one full forward pass (left-truncated to max_length + 1)."""
    seq = (ctx_ids + cont_ids)[-(max_length + 1):] if max_length else ctx_ids + cont_ids
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([seq[:-1]])).logits[0].double(), -1)  # [T-1, V]
    n = len(cont_ids)
    return sum(logp[len(seq) - 1 - n + i, t].item() for i, t in enumerate(cont_ids))


QUESTIONS = [
    {"id": "q0", "context": "Question: What is the answer?\nAnswer:", "choices": ["yes", "no", "maybe so"], "gold": 0},
    {"id": "q1", "context": "The quick brown fox ", "choices": ["jumps", "sits over the dog", "x"], "gold": 1},
    {"id": "q2", "context": "Science is the study of the natural world. " * 6 + "It is",
     "choices": ["the study", "a roof", "lazy"], "gold": 2},
    {"id": "q3", "context": "", "choices": ["A man is sitting", "He starts"], "gold": 1},
    {"id": "q4", "context": "A man is sitting on a roof.", "choices": ["He starts pulling", "The dog", "Yes"],
     "gold": 0},
]


def test_encode_pair_moves_trailing_space_and_splits_joint_encoding(tok):
    ctx, cont = scoring.encode_pair(tok, "The quick brown fox ", " jumps")
    assert ctx == tok.encode("The quick brown fox")
    assert ctx + cont == tok.encode("The quick brown fox  jumps")
    ctx, cont = scoring.encode_pair(tok, "", " yes")
    assert ctx == [tok.bos_token_id] and cont == tok.encode(" yes", add_special_tokens=False)


def test_encode_pair_with_bos_tokenizer():
    btok = tiny_tokenizer(bos=True)
    ctx, cont = scoring.encode_pair(btok, "Question: why?\nAnswer:", " yes")
    assert ctx[0] == btok.bos_token_id and ctx.count(btok.bos_token_id) == 1
    assert btok.decode(cont) == " yes"
    # A string that already starts with the BOS text gets no second BOS (lm-eval's rule).
    assert scoring.tok_encode(btok, "<s> hi")[:2] != [btok.bos_token_id, btok.bos_token_id]


def test_loglikelihood_matches_naive_forward(model, tok):
    requests = [(q["context"], " " + c) for q in QUESTIONS for c in q["choices"]]
    got = scoring.loglikelihood(model, tok, requests, batch_size=3)
    for (ctx, cont), (ll, _) in zip(requests, got):
        assert ll == pytest.approx(naive_loglik(model, *scoring.encode_pair(tok, ctx, cont)), abs=1e-4)


@pytest.mark.parametrize("shared", [False, True, "auto"])
def test_acc_and_acc_norm_against_hand_computation(model, tok, shared):
    res = scoring.score_multiple_choice(model, tok, QUESTIONS, batch_size=4, shared_context=shared, progress=False)
    accs, norms = [], []
    for q, d in zip(QUESTIONS, res["details"]):
        lls = [naive_loglik(model, *scoring.encode_pair(tok, q["context"], " " + c)) for c in q["choices"]]
        assert d["loglik"] == pytest.approx(lls, abs=1e-4)
        pred = max(range(len(lls)), key=lambda i: lls[i])
        pred_norm = max(range(len(lls)), key=lambda i: lls[i] / len(q["choices"][i]))
        assert (d["pred"], d["pred_norm"]) == (pred, pred_norm)
        accs.append(pred == q["gold"])
        norms.append(pred_norm == q["gold"])
    assert res["acc"] == pytest.approx(sum(accs) / len(accs))
    assert res["acc_norm"] == pytest.approx(sum(norms) / len(norms))
    assert res["n"] == len(QUESTIONS)
    # The fixture is only useful if acc and acc_norm can disagree somewhere.
    assert any(d["pred"] != d["pred_norm"] for d in res["details"])


def test_batched_equals_unbatched(model, tok):
    one = scoring.score_multiple_choice(model, tok, QUESTIONS, batch_size=1, shared_context=False, progress=False)
    many = scoring.score_multiple_choice(model, tok, QUESTIONS, batch_size=16, shared_context=False, progress=False)
    for a, b in zip(one["details"], many["details"]):
        assert a["loglik"] == pytest.approx(b["loglik"], abs=1e-4)
    assert (one["acc"], one["acc_norm"]) == (many["acc"], many["acc_norm"])


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "gpt_neox", "bloom", "mistral"])
def test_shared_context_path_equals_flat_path(tok, family):
    m = tiny_model(tok, family)
    flat = scoring.score_multiple_choice(m, tok, QUESTIONS, shared_context=False, progress=False)
    shared = scoring.score_multiple_choice(m, tok, QUESTIONS, shared_context=True, progress=False)
    for a, b in zip(flat["details"], shared["details"]):
        assert a["loglik"] == pytest.approx(b["loglik"], abs=1e-4)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_shared_context_uses_the_cache_under_the_installed_name(tok, family):
    import warnings

    m = tiny_model(tok, family)
    ctx, conts = tok.encode("Question: is the sky blue? Answer:"), [tok.encode(" yes"), tok.encode(" no way")]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # transformers 5.24+ warns on the old name past_key_values
        got = scoring.score_shared_context(m.eval(), ctx, conts)
    assert got is not None  # the cached path ran; None would mean the cache was lost
    for (ll, _), cont in zip(got, conts):
        ids = torch.tensor([ctx + cont])
        logp = torch.log_softmax(m(input_ids=ids).logits[0, :-1].float(), -1)
        naive = sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))
        assert ll == pytest.approx(naive, abs=1e-4)


def test_left_truncation_matches_naive(tok):
    m = tiny_model(tok, max_positions=24)  # the long question (q2) no longer fits
    res = scoring.score_multiple_choice(m, tok, QUESTIONS, shared_context=True, progress=False)
    for q, d in zip(QUESTIONS, res["details"]):
        lls = [naive_loglik(m, *scoring.encode_pair(tok, q["context"], " " + c), max_length=24) for c in q["choices"]]
        assert d["loglik"] == pytest.approx(lls, abs=1e-4)


def test_training_flag_is_restored(tok):
    m = tiny_model(tok).train()
    scoring.score_multiple_choice(m, tok, QUESTIONS[:1], progress=False)
    assert m.training


def test_argmax_ties_keep_lowest_index():
    assert scoring._argmax([1.0, 3.0, 3.0]) == 1


# --- perplexity -------------------------------------------------------------------------------

@pytest.mark.parametrize("n,length,stride", [(1, 8, None), (8, 8, None), (9, 8, None), (30, 8, None),
                                             (30, 8, 3), (30, 8, 1), (0, 8, None)])
def test_rolling_windows_tile_the_text(n, length, stride):
    tokens = list(range(10, 10 + n))
    windows = perplexity.rolling_windows(tokens, prefix=0, max_length=length, stride=stride)
    assert [t for _, target in windows for t in target] == tokens  # every token scored exactly once
    for ctx, target in windows:
        assert len(ctx) >= 1 and len(ctx) + len(target) <= length + 1  # the input fits the model
        full = [0] + tokens  # tokens are distinct, so index() finds the window's position
        start = full.index(target[0])
        assert target == full[start:start + len(target)]
        assert ctx == full[max(0, start + len(target) - 1 - length):start]  # the tokens just before


@pytest.mark.parametrize("stride", [None, 5])
def test_rolling_loglikelihood_equals_naive_windows(model, tok, stride):
    text = " ".join(TEXT * 2)
    ll, n = perplexity.rolling_loglikelihood(model, tok, text, max_length=16, stride=stride, batch_size=3)
    tokens = tok.encode(text, add_special_tokens=False)
    windows = perplexity.rolling_windows(tokens, tok.bos_token_id, 16, stride)
    assert len(windows) > 3 and n == len(tokens)
    assert ll == pytest.approx(sum(naive_loglik(model, c, t) for c, t in windows), abs=1e-3)


def test_perplexity_metrics_formulas(model, tok):
    docs = [" = Title = \n Some words here .\n", "Other text , more words .\n"]
    res = perplexity.score_documents(model, tok, docs, max_length=16, progress=False)
    words = sum(len(re.split(r"\s+", d)) for d in docs)
    n_bytes = sum(len(d.encode()) for d in docs)
    assert (res["words"], res["bytes"], res["n"]) == (words, n_bytes, 2)
    assert res["word_perplexity"] == pytest.approx(math.exp(-res["loglikelihood"] / words))
    assert res["byte_perplexity"] == pytest.approx(math.exp(-res["loglikelihood"] / n_bytes))
    assert res["bits_per_byte"] == pytest.approx(-res["loglikelihood"] / n_bytes / math.log(2))
    assert res["token_perplexity"] == pytest.approx(math.exp(-res["loglikelihood"] / res["tokens"]))


def test_wikitext_document_split_and_detokenizer():
    raw = " \n = Alpha = \n \n Alpha is a word @-@ like thing , see ( here ) .\n = = Sub = = \n More .\n" \
          " = Beta = \n Beta 's 1 @,@ 000 items .\n"
    docs = wikitext.split_wikitext_documents(raw)
    assert len(docs) == 2 and "".join(docs) == raw
    assert docs[0].startswith(" \n = Alpha = ") and "= = Sub = =" in docs[0]
    assert wikitext.wikitext_detokenize(docs[1]) == " = Beta =\nBeta's 1,000 items .\n"  # lm-eval's rules
    assert "word-like thing, see (here) .\n== Sub ==" in wikitext.wikitext_detokenize(docs[0])


# --- exact match -----------------------------------------------------------------------------

def test_normalize_answer_and_exact_match():
    assert generation.normalize_answer("  The Jamaican-English, language! ") == "jamaicanenglish language"
    assert generation.normalize_answer("an Apple a day") == "apple day"
    assert generation.exact_match("the United States.", ["USA", "United States"])
    assert not generation.exact_match("United", ["United States"])


def naive_greedy(model, tok, prompt, max_new_tokens):
    ids = tok.encode(prompt)
    new = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
            new.append(nxt)
            if nxt == tok.eos_token_id or "\n" in tok.decode(new):
                break
    return tok.decode([t for t in new if t != tok.eos_token_id], skip_special_tokens=True).split("\n")[0].strip()


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_batched_cached_generation_equals_naive_loop(tok, family):
    m = tiny_model(tok, family)
    prompts = ["Question: What is the answer?\nAnswer:", "The quick", "Science is the study of the natural"]
    got = generation.greedy_generate(m, tok, prompts, max_new_tokens=6, batch_size=3)
    assert got == [naive_greedy(m, tok, p, 6) for p in prompts]


def test_score_exact_match_counts_any_answer(model, tok, monkeypatch):
    monkeypatch.setattr(generation, "greedy_generate", lambda *a, **k: ["The yes", "nope"])
    examples = [{"id": 1, "context": "Q1", "answers": ["no", "yes"]}, {"id": 2, "context": "Q2", "answers": ["yes"]}]
    res = generation.score_exact_match(model, tok, examples, progress=False)
    assert res["exact_match"] == 0.5 and res["n"] == 2 and 0 <= res["greedy_match"] <= 1
