"""The LM head only where a token is scored: the same losses, gradients and scores as full logits.

Closeness is judged against the scale of the quantity (``max |diff| <= k * eps32 * max |reference|``):
the scored path projects ``(n, hidden)`` rows instead of ``(batch, seq, hidden)``, so its matmuls
and sums round in another order, and nothing else may differ.
"""

import json

import pytest
import torch

from conftest import make_model
from offsite.data import token_loss
from offsite.data.records import IGNORE
from offsite.data.examples import collate, load_examples
from offsite.workflows.emulate import emulate
from offsite.eval.scoring import score_multiple_choice, score_token_pairs
from offsite.families import FAMILIES
from offsite.families.head import final_hidden, project, split_family
from offsite.workflows.finetune import finetune
from offsite.training.loop import validate
from offsite.data.token_loss import mean_loss, token_losses

EPS = torch.finfo(torch.float32).eps
TWO = ["llama", "gpt2", "opt"]


def close(got, want, k: float = 64, what: str = ""):
    """``max |got - want| <= k * eps32 * max |want|`` (a few roundings of the largest magnitude)."""
    got, want = torch.as_tensor(got).double(), torch.as_tensor(want).double()
    scale = float(want.abs().max())
    err = float((got - want).abs().max())
    assert err <= k * EPS * scale, f"{what}: max |diff| {err:.3g} > {k} eps * {scale:.3g}"


def _batch(tokenizer, fmt: str):
    """A right-padded batch of 3 examples: ``mc``-like (prompt masked) or ``text`` (every token)."""
    texts = ["the cat sat on the mat and the dog ran", "a red apple fell", "Question: where does the fish live?"]
    examples = []
    for t in texts:
        ids = tokenizer(t)["input_ids"]
        labels = list(ids) if fmt == "text" else [IGNORE] * (len(ids) - 3) + ids[-3:]
        examples.append({"input_ids": ids, "labels": labels})
    return collate(examples, tokenizer.pad_token_id)


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_the_split_forward_is_the_models_own(model_type):
    """Backbone then head gives the model's logits in every family (Gemma 2's soft-cap included)."""
    model = make_model(model_type, 2, **({"final_logit_softcapping": 0.5} if model_type == "gemma2" else {}))
    family = split_family(model)
    assert family is not None
    ids = torch.randint(3, 120, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
        got = project(model, family, final_hidden(model, family, input_ids=ids, attention_mask=mask))
    close(got, want, 8, model_type)


@pytest.mark.parametrize("model_type", TWO)
@pytest.mark.parametrize("fmt", ["mc", "text"])
def test_loss_and_gradients_equal_the_full_logits(model_type, fmt, tokenizer):
    """HF's own loss and its gradients on every parameter (the tied head included), text in chunks."""
    model = make_model(model_type, 3).train()
    batch = _batch(tokenizer, fmt)
    results = {}
    for mode, chunk in (("full", None), ("scored", None), ("scored", 4)):  # 4: several checkpointed chunks
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)  # the same dropout masks (GPT-2, OPT): the backbone runs the same either way
        loss, _ = mean_loss(model, batch, mode, chunk)
        loss.backward()
        results[mode, chunk] = loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}
    want, want_grads = results["full", None]
    torch.manual_seed(0)
    assert torch.equal(want, model(**batch).loss.detach())  # "full" is the model's own loss, bit for bit
    scale = max(float(g.abs().max()) for g in want_grads.values())
    for key in (("scored", None), ("scored", 4)):
        loss, grads = results[key]
        close(loss, want, 16, f"{key} loss")
        close(torch.cat([g.flatten() for g in grads.values()]), torch.cat([g.flatten() for g in want_grads.values()]),
              64, f"{key} gradient")
        for name, grad in grads.items():
            # Per tensor too, except where the exact gradient is 0 and the reference is rounding noise
            # (attention's k bias: softmax ignores a shift shared by every score).
            if float(want_grads[name].abs().max()) > 1e-4 * scale:
                close(grad, want_grads[name], 256, f"{key} grad {name}")


def test_a_lora_wrapper_is_scored_through_the_model_it_wraps(tokenizer):
    """The audit's LoRA attack trains a PeftModel: same loss and LoRA gradients as its full logits."""
    pytest.importorskip("peft")
    from offsite.families import get_family
    from offsite.workflows.finetune import make_config
    from offsite.adapters.lora import wrap_lora

    model = make_model("llama", 3)
    peft_model = wrap_lora(model, get_family(model), [0, 2], make_config({"lora": True, "lora_r": 2}))
    assert token_loss.splittable(peft_model)[1] is not None
    batch = _batch(tokenizer, "mc")
    results = {}
    for mode in ("full", "scored"):
        peft_model.zero_grad(set_to_none=True)
        loss, _ = mean_loss(peft_model, batch, mode)
        loss.backward()
        results[mode] = loss.detach(), {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    close(results["scored"][0], results["full"][0], 16, "loss")
    grads = [torch.cat([g.flatten() for g in results[m][1].values()]) for m in ("scored", "full")]
    close(grads[0], grads[1], 64, "LoRA gradient")


@pytest.mark.parametrize("model_type", TWO[:2])
def test_per_example_and_validation_losses_equal_the_full_logits(model_type, tokenizer):
    model = make_model(model_type, 3)
    batch = _batch(tokenizer, "mc")
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    target = batch["labels"][:, 1:]
    tokens = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), target, ignore_index=IGNORE,
                                               reduction="none")
    want = tokens.sum(1) / (target != IGNORE).sum(1)  # DP-SGD's per-example mean, as it was computed
    with torch.no_grad():
        close(token_losses(model, batch).per_example(3), want, 16, "per example")
    examples = [{"input_ids": r[m.bool()].tolist(), "labels": lab[m.bool()].tolist()}
                for r, lab, m in zip(batch["input_ids"], batch["labels"], batch["attention_mask"])]
    import contextlib

    full = validate(model, examples, 2, 0, "cpu", contextlib.nullcontext(), logits="full")
    scored = validate(model, examples, 2, 0, "cpu", contextlib.nullcontext())
    close(scored, full, 16, "validation")
    assert full == pytest.approx(float(tokens.sum() / (target != IGNORE).sum()), rel=1e-6)


def test_no_scored_token_is_nan_as_in_hf(tokenizer):
    model = make_model("llama", 2)
    batch = _batch(tokenizer, "mc")
    batch["labels"][:] = IGNORE
    loss, anchor = mean_loss(model, batch)
    assert torch.isnan(loss) and torch.isnan(model(**batch).loss)
    (anchor.sum() * 0.0).backward()  # an empty shard still runs backward (finetune.distributed)


@pytest.mark.parametrize("model_type", TWO[:2])
@pytest.mark.parametrize("shared", [False, True])
def test_multiple_choice_scores_equal_the_full_logits(model_type, shared, tokenizer):
    model = make_model(model_type, 3)
    examples = [{"context": "Question: what colour is the sky? Answer:", "choices": ["blue", "red", "the mat"],
                 "gold": 0, "id": "a"},
                {"context": "the cat sat on the", "choices": ["mat", "dog ran in the park"], "gold": 0, "id": "b"}]
    kwargs = dict(batch_size=2, shared_context=shared, progress=False)
    want = score_multiple_choice(model, tokenizer, examples, logits="full", **kwargs)
    got = score_multiple_choice(model, tokenizer, examples, **kwargs)
    for w, g in zip(want["details"], got["details"]):
        close(g["loglik"], w["loglik"], 16, f"{model_type} loglik")
        assert g["pred"] == w["pred"] and g["pred_norm"] == w["pred_norm"]


@pytest.mark.parametrize("model_type", TWO[:2])
def test_perplexity_windows_in_chunks_equal_the_full_logits(model_type, monkeypatch):
    """Every token scored: the head runs over chunks of 5 positions, the sums are the full-logits ones."""
    model = make_model(model_type, 3)
    torch.manual_seed(1)
    windows = [([1], torch.randint(3, 120, (n,)).tolist()) for n in (30, 17, 9)]
    want = score_token_pairs(model, windows, batch_size=2, max_length=64, logits="full")
    monkeypatch.setattr(token_loss, "LOGIT_ELEMENTS", 5 * model.config.vocab_size)
    got = score_token_pairs(model, windows, batch_size=2, max_length=64)
    close([g for g, _ in got], [w for w, _ in want], 64, "window log-likelihoods")
    assert [g for _, g in got] == [w for _, w in want]


def test_finetune_scored_equals_full(saved_model, tmp_path, mc_file):
    """A few steps of ``finetune`` on mc data: the same losses and adapter either way."""
    path, _ = saved_model("llama", 6)
    emu = emulate(str(path), tmp_path / "emu", emulator_layers=1)
    logs, tensors = {}, {}
    for mode in ("full", "scored"):
        out = finetune(emu, mc_file, tmp_path / mode, format="mc", max_steps=3, batch_size=4, lr=1e-3,
                       eval_every=3, logits=mode, progress=False)
        logs[mode] = json.loads((out / "training_log.json").read_text())
        from safetensors.torch import load_file

        tensors[mode] = {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}
    for a, b in zip(logs["full"]["train"], logs["scored"]["train"]):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-4)
    assert logs["scored"]["val"][-1]["loss"] == pytest.approx(logs["full"]["val"][-1]["loss"], rel=1e-5)
    assert tensors["full"].keys() == tensors["scored"].keys() and tensors["full"]
    for name, want in tensors["full"].items():
        # 3 AdamW steps at lr 1e-3 move a weight by <= 3e-3; rounding may move it by one lr-sized step at most
        assert float((tensors["scored"][name].float() - want.float()).abs().max()) <= 3e-3, name


def test_a_tokenizer_batch_from_the_data_module_keeps_its_shape(tokenizer, mc_file):
    """The gathered positions are exactly the shifted labels that are not -100."""
    batch = collate(load_examples(mc_file, "mc", tokenizer, 64)[:4], 0)
    rows, cols, targets = token_loss.scored_positions(batch["labels"])
    assert len(rows) == int((batch["labels"][:, 1:] != IGNORE).sum())
    assert torch.equal(targets, batch["labels"][rows, cols + 1])
