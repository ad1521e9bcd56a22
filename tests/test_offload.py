"""Scoring a full model with its decoder layers on disk (offsite.model.offload, ``eval --stream``): the
scores are the in-memory model's, bitwise, and at most one offloaded layer holds real tensors."""

import json

import pytest
import torch

from offsite.cli import main
from offsite.workflows.emulate import emulate
from offsite.core.errors import OffsiteError
from offsite.eval.generation import score_exact_match
from offsite.eval.perplexity import score_documents
from offsite.eval.scoring import score_multiple_choice
from offsite.families import get_family, get_layers
from offsite.eval.loading import load_for_eval

FAMILIES = ["llama", "gpt2", "opt", "gpt_neox", "falcon", "gemma2", "phi3", "bloom"]
QUESTIONS = [{"id": f"q{i}", "context": "the colour of thing %d is" % i + " x" * (70 * (i % 2)),
              "choices": ["red", "blue", "green"], "gold": i % 3} for i in range(6)]
DOCUMENTS = ["the quick brown fox jumps over the lazy dog " * 6, "a b c d e f g h i j k l m n o p " * 5]


def _live_layers(model) -> list:
    """Indices of decoder layers whose parameters hold real values now."""
    return [i for i, layer in enumerate(get_layers(model, get_family(model)))
            if any(not p.is_meta for p in layer.parameters())]


def _watch(model, keep=()):
    """Record the most offloaded layers seen with real values while one of their modules runs.

    accelerate's hook reads a module's tensors inside its forward, around the original forward
    (``_old_forward``); wrapping that is the one place where they are real.
    """
    most = [0]

    def wrap(forward):
        def run(*args, **kwargs):
            most[0] = max(most[0], len([i for i in _live_layers(model) if i not in keep]))
            return forward(*args, **kwargs)
        return run

    for layer in get_layers(model, get_family(model)):
        for module in layer.modules():
            if hasattr(module, "_old_forward"):
                module._old_forward = wrap(module._old_forward)
    return most


def _scores(model, tok) -> dict:
    mc = score_multiple_choice(model, tok, QUESTIONS, batch_size=4, shared_min_tokens=16, progress=False)
    ppl = score_documents(model, tok, DOCUMENTS, max_length=32, stride=16, batch_size=2, progress=False)
    em = score_exact_match(model, tok, [{"id": "a", "context": "the quick", "answers": ["brown"]},
                                        {"id": "b", "context": "a b c", "answers": ["d"]}],
                           max_new_tokens=4, batch_size=2, progress=False)
    return {"mc": mc, "ppl": ppl, "em": em}


@pytest.mark.parametrize("model_type", FAMILIES)
def test_a_streamed_model_scores_like_the_model_in_memory(model_type, saved_model):
    """Multiple choice (flat and shared-context), perplexity windows and generation give the very
    numbers of the loaded model, with one offloaded layer in memory at a time."""
    path, _ = saved_model(model_type, 4)
    whole, tok, _ = load_for_eval(str(path), device="cpu")
    streamed, _, info = load_for_eval(str(path), device="cpu", stream=True)
    assert info["stream"] is True
    assert _live_layers(streamed) == []  # nothing of the decoder stack is loaded up front
    most = _watch(streamed)
    assert _scores(streamed, tok) == _scores(whole, tok)
    assert most[0] == 1
    assert _live_layers(streamed) == []


@pytest.mark.parametrize("lora", [False, True])
def test_a_streamed_plug_in_scores_like_the_plug_in_in_memory(lora, saved_model, text_file, tmp_path):
    """The adapter layers are loaded, plugged and kept; every other layer stays on disk."""
    from offsite.workflows.finetune import finetune

    path, _ = saved_model("llama", 6)
    package = emulate(str(path), tmp_path / "emu", adapter_layers="1,1", emulator_layers=2)
    adapter = finetune(package, text_file, tmp_path / "adapter", max_steps=2, batch_size=2, block_size=16, lr=1e-2,
                       lora=lora, progress=False)
    whole, tok, a = load_for_eval(str(path), adapter=str(adapter), device="cpu")
    streamed, _, b = load_for_eval(str(path), adapter=str(adapter), device="cpu", stream=True)
    assert a["kind"] == b["kind"] == "plug-in"
    assert _live_layers(streamed) == [0, 5]
    most = _watch(streamed, keep=(0, 5))
    assert _scores(streamed, tok) == _scores(whole, tok)
    assert most[0] == 1


def test_streamed_scoring_refusals(saved_model, small_emulator, tmp_path):
    path, model = saved_model("llama", 4)
    with pytest.raises(OffsiteError, match="emulator package: --stream applies to full models"):
        load_for_eval(str(small_emulator), stream=True)
    bare = tmp_path / "no-safetensors"
    bare.mkdir()
    (bare / "config.json").write_text((path / "config.json").read_text())
    torch.save(model.state_dict(), bare / "pytorch_model.bin")
    with pytest.raises(OffsiteError, match="reads a checkpoint's .safetensors files in place"):
        load_for_eval(str(bare), stream=True)


def test_eval_cli_stream(saved_model, mc_file, tmp_path, capsys):
    path, _ = saved_model("llama", 4)
    results = {}
    for flag in ([], ["--stream"]):
        out = tmp_path / f"r{len(flag)}.json"
        assert main(["eval", "--model", str(path), "--tasks", str(mc_file), "--limit", "12", "--device", "cpu",
                     "--no-progress", "--out", str(out), *flag]) == 0
        results[len(flag)] = json.loads(out.read_text())
    for r in results.values():
        r["results"][str(mc_file)].pop("seconds")
    assert results[0]["results"] == results[1]["results"]
    assert results[1]["settings"]["stream"] is True and results[1]["model"]["stream"] is True
    assert not list(tmp_path.glob(".offsite-offload-*"))
