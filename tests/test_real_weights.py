"""The spine on real pretrained weights: stories260K (llama2.c) and the reference Llama, when present."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import state_equal
from offsite.adapters.artifact import save_full_adapter
from offsite.artifacts import unique_state_dict
from offsite.workflows.emulate import emulate
from offsite.emulator.package import load_emulator
from offsite.workflows.plug import plug

try:
    from fixtures.llama2c import ref_model_dir, stories260k_config, stories260k_model
except ImportError:  # pragma: no cover
    from tests.fixtures.llama2c import ref_model_dir, stories260k_config, stories260k_model


@pytest.fixture(scope="module")
def stories(tmp_path_factory):
    path = stories260k_model(tmp_path_factory.mktemp("stories"))
    if path is None:
        pytest.skip("shared stories260K checkpoint not available")
    return path


def test_stories260k_keep_all_emulator_is_exact_and_drop_emulator_is_worse(stories, tmp_path):
    ref = stories260k_config()["greedy_from_bos_first_100_tokens"]
    ids = torch.tensor([ref])
    full = AutoModelForCausalLM.from_pretrained(stories).eval()
    keep_all = load_emulator(emulate(str(stories), tmp_path / "all", adapter_layers="1,1", emulator_layers=3,
                                     allow_verbatim_middle=True))
    dropped = load_emulator(emulate(str(stories), tmp_path / "drop", adapter_layers="1,1", emulator_layers=1))
    with torch.no_grad():
        assert torch.equal(keep_all.model(ids).logits, full(ids).logits)
        nll_full = full(ids, labels=ids).loss.item()
        nll_drop = dropped.model(ids, labels=ids).loss.item()
    assert abs(nll_full - stories260k_config()["mean_nll_of_greedy_sample_above"]) < 1e-3
    assert nll_drop > nll_full + 0.5  # the emulator is clearly weaker on the model's own text
    out = plug(str(stories), save_full_adapter(tmp_path / "ad", dropped, {}, {}), tmp_path / "plugged")
    assert state_equal(unique_state_dict(AutoModelForCausalLM.from_pretrained(out)), unique_state_dict(full))


def test_reference_model_emulator_round_trip(tmp_path):
    ref = ref_model_dir()
    if ref is None:
        pytest.skip("shared reference model not available")
    out = emulate(str(ref), tmp_path / "emu", adapter_layers="2,2", emulator_layers=4)
    emu = load_emulator(out)
    assert emu.layer_map == [0, 1, 2, 4, 7, 9, 10, 11]
    assert emu.tokenizer is not None
    full = AutoModelForCausalLM.from_pretrained(ref).eval()
    ids = emu.tokenizer("Once upon a time there was a king who lived in a castle.", return_tensors="pt").input_ids
    with torch.no_grad():
        assert emu.model(ids, labels=ids).loss > full(ids, labels=ids).loss
