"""The language model inside a multimodal Gemma 3 folder: refused with the way out, extracted exactly."""

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma3Config

from offsite.cli import main
from offsite.core.errors import OffsiteError
from offsite.families import TINY_CONFIGS
from offsite.workflows.emulate import emulate


@pytest.fixture
def gemma3_folder(tmp_path, tokenizer):
    """A tiny multimodal Gemma 3 checkpoint (vision tower + the family's tiny text model)."""
    text = dict(TINY_CONFIGS["gemma3_text"], num_hidden_layers=4)
    config = Gemma3Config(text_config=text, mm_tokens_per_image=4,
                          vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=28, patch_size=14))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    path = tmp_path / "gemma3"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, model


def test_a_multimodal_folder_is_refused_with_the_way_to_its_text_model(gemma3_folder, tmp_path):
    path, _ = gemma3_folder
    with pytest.raises(OffsiteError, match="multimodal.*offsite models extract-text"):
        emulate(str(path), tmp_path / "emu", adapter_layers="1,1")
    assert not (tmp_path / "emu").exists()


def test_the_extracted_text_model_gives_the_multimodal_logits_and_works_with_every_workflow(gemma3_folder, tmp_path):
    path, model = gemma3_folder
    out = tmp_path / "text"
    assert main(["models", "extract-text", str(path), "--out", str(out)]) == 0
    text = AutoModelForCausalLM.from_pretrained(out)
    assert text.config.model_type == "gemma3_text"
    ids = torch.randint(4, 120, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(text(input_ids=ids).logits, model(input_ids=ids).logits)
    assert sum(p.numel() for p in text.parameters()) < sum(p.numel() for p in model.parameters())  # no vision tower
    emu = emulate(str(out), tmp_path / "emu", adapter_layers="1,1", emulator_layers=1)
    assert (emu / "manifest.json").is_file()


def test_extract_text_refuses_a_model_that_is_not_multimodal_and_a_taken_folder(saved_model, gemma3_folder, tmp_path):
    from offsite.model.text_inside import extract_text

    path, _ = saved_model("llama", 2)
    with pytest.raises(OffsiteError, match="extract-text reads the multimodal types gemma3"):
        extract_text(str(path), tmp_path / "x")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(OffsiteError, match="already exists"):
        extract_text(str(gemma3_folder[0]), taken)
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]
