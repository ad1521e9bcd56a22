"""Shared fixtures: tiny random models per family (no downloads), a tiny tokenizer, data files."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Base-model fingerprints are cached per weight file; keep the suite's cache out of the user's home.
if "OFFSITE_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["OFFSITE_CACHE_DIR"] = tempfile.mkdtemp(prefix="offsite-test-cache-")
    atexit.register(shutil.rmtree, os.environ["OFFSITE_CACHE_DIR"], True)  # leave no cache behind in /tmp

import json  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny models gain nothing from threads, and OpenMP spin-waits badly on a busy 2-core machine.
torch.set_num_threads(1)

SENTENCES = [
    "the cat sat on the mat and the dog ran in the park",
    "a red apple fell from the old tree near the river",
    "Question: what colour is the sky? Answer: blue",
    "Question: where does the fish live? Answer: in the water",
]


def make_tokenizer():
    """A character-level BPE (no byte alphabet) whose vocabulary fits the tiny configs' 128 ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tk.decoder = decoders.Metaspace()
    tk.train_from_iterator(SENTENCES * 4, trainers.BpeTrainer(vocab_size=120, special_tokens=["<pad>", "<s>", "</s>", "<unk>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def make_model(model_type: str, layers: int = 6, seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    from offsite.families import tiny_config

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, layers, **overrides))
    # Random init leaves some norms/biases at exactly 1/0; perturb every tensor so that copying
    # the wrong layer or the wrong slice can never go unnoticed.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture
def saved_model(tmp_path, tokenizer):
    """Factory: save a tiny model + tokenizer to a folder and return ``(path, model)``."""

    def build(model_type: str = "llama", layers: int = 6, seed: int = 0, name: str | None = None, **overrides):
        path = tmp_path / (name or f"{model_type}-{layers}-{seed}")
        model = make_model(model_type, layers, seed, **overrides)
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        return path, model

    return build


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("\n".join(SENTENCES * 30))
    return path


@pytest.fixture
def mc_file(tmp_path):
    """A small multiple-choice file in the shared data schema."""
    path = tmp_path / "mc.jsonl"
    rows = [{"id": f"q{i}", "context": "", "question": f"what colour is thing {i % 3}?",
             "choices": ["red", "blue", "green"], "label": i % 3} for i in range(40)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture
def mc_task(tmp_path):
    """An ad-hoc task with one file per split: ``(path template with {split}, folder)``."""
    folder = tmp_path / "task"
    folder.mkdir()
    for split, start in (("train", 0), ("validation", 40)):
        rows = [{"id": f"{split}{i}", "context": "", "question": f"what colour is thing {i % 3}?",
                 "choices": ["red", "blue", "green"], "label": i % 3} for i in range(start, start + 40)]
        (folder / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(folder / "{split}.jsonl"), folder


def state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def small_emulator(saved_model, tmp_path):
    """A 6-layer tiny Llama's emulator package: 1 + 1 adapter layers, 2 of 4 middle layers kept."""
    from offsite.workflows.emulate import emulate

    path, _ = saved_model("llama", 6)
    return emulate(str(path), tmp_path / "emu", adapter_layers="1,1", emulator_layers=2)


def artifact_tensors(folder) -> dict:
    """Every tensor of an artifact's single ``.safetensors`` file."""
    import os

    from safetensors.torch import load_file

    (name,) = [p for p in os.listdir(folder) if p.endswith(".safetensors")]
    return load_file(str(folder / name))


def pytest_collection_modifyitems(config, items):
    """The ``real`` tier (tests on the prepared real model) runs only when asked for: ``pytest -m real``."""
    if "real" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="real-model tier: opt in with pytest -m real (after offsite models prepare smollm2-135m)")
    for item in items:
        if item.get_closest_marker("real") is not None:
            item.add_marker(skip)
