"""The llama2.c -> Hugging Face converter reproduces the real stories260K model exactly.

Reference values come from ``<shared>/data/models/stories260K/config.json``:

- ``greedy_from_bos_first_100_tokens`` holds 101 ids: BOS followed by the first 100 greedy
  tokens, so it is reproduced with ``max_new_tokens = len(ref) - 1 = 100``.
- ``mean_nll_of_greedy_sample_above`` (0.4532) is the mean next-token NLL (natural log) of that
  sequence, teacher-forced from BOS, over all 100 predicted tokens ``ref[1:]`` -- the same number
  as ``model(ids, labels=ids).loss``. (Over only the first 99 predictions it would be 0.4578.)

Everything skips cleanly when the shared folder or the checkpoint is absent.
"""

from __future__ import annotations

import numpy as np
import pytest

try:
    from tests.fixtures import llama2c
except ModuleNotFoundError:  # tests/ is not a package: pytest puts tests/ itself on sys.path
    from fixtures import llama2c

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The model is tiny: one thread is fastest, and avoids OpenMP slowdowns on a busy 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def stories_src():
    src = llama2c.stories260k_dir()
    if src is None:
        pytest.skip("shared stories260K checkpoint not found (set OFFSITE_SHARED or provide ../shared)")
    return src


@pytest.fixture(scope="module")
def reference(stories_src):
    cfg = llama2c.stories260k_config()
    ref = cfg["greedy_from_bos_first_100_tokens"]
    assert ref[0] == 1 and len(ref) == 101, "expected BOS followed by 100 greedy tokens"
    return cfg


@pytest.fixture(scope="module")
def hf_dir(stories_src, tmp_path_factory):
    out = llama2c.stories260k_model(tmp_path_factory.mktemp("llama2c"))
    assert out is not None
    return out


@pytest.fixture(scope="module")
def hf_model(hf_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model.eval()
    return model


def test_converted_config(hf_dir):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(hf_dir)
    assert cfg.model_type == "llama"
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (64, 172, 5)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (8, 4, 8)
    assert (cfg.vocab_size, cfg.max_position_embeddings) == (512, 512)
    assert cfg.rms_norm_eps == pytest.approx(1e-5)
    assert cfg.tie_word_embeddings is True
    assert (cfg.bos_token_id, cfg.eos_token_id) == (1, 2)
    rope = getattr(cfg, "rope_parameters", None) or {"rope_theta": cfg.rope_theta}
    assert rope["rope_theta"] == pytest.approx(10000.0)
    assert (hf_dir / "model.safetensors").is_file()


def test_greedy_generation_reproduces_reference(hf_model, reference):
    ref = reference["greedy_from_bos_first_100_tokens"]
    bos = torch.tensor([[1]])
    with torch.no_grad():
        out = hf_model.generate(
            bos,
            attention_mask=torch.ones_like(bos),
            do_sample=False,
            max_new_tokens=len(ref) - 1,
            use_cache=True,
            pad_token_id=2,
        )
    assert out[0].tolist() == ref


def test_mean_nll_of_greedy_sample(hf_model, reference):
    ref = reference["greedy_from_bos_first_100_tokens"]
    ids = torch.tensor([ref])
    with torch.no_grad():
        out = hf_model(ids, labels=ids)
    logp = torch.log_softmax(out.logits[0, :-1].double(), dim=-1)
    nll = -logp.gather(1, ids[0, 1:, None])[:, 0]
    assert nll.numel() == len(ref) - 1
    assert nll.mean().item() == pytest.approx(out.loss.item(), abs=1e-5)
    assert nll.mean().item() == pytest.approx(reference["mean_nll_of_greedy_sample_above"], abs=0.02)
    # The recorded value is this definition to its four digits.
    assert abs(nll.mean().item() - reference["mean_nll_of_greedy_sample_above"]) < 1e-3
    # Teacher-forced argmax reproduces every greedy choice.
    assert torch.equal(out.logits[0, :-1].argmax(-1), ids[0, 1:])


def test_logits_match_llama2c_forward_and_permutation_matters(hf_model, reference, stories_src):
    """HF logits equal an independent NumPy forward pass that uses llama2.c's interleaved RoPE."""
    ref = reference["greedy_from_bos_first_100_tokens"][:64]
    bin_path = stories_src / "stories260K.bin"
    expected = llama2c.llama2c_forward_numpy(bin_path, ref)
    with torch.no_grad():
        got = hf_model(torch.tensor([ref])).logits[0].double().numpy()
    assert np.abs(got - expected).max() < 1e-3

    # Negative control: the same weights without the per-head q/k row permutation do not match.
    header, w = llama2c.read_llama2c(bin_path)
    unpermuted = llama2c.build_hf_model(bin_path)
    with torch.no_grad():
        for i, layer in enumerate(unpermuted.model.layers):
            layer.self_attn.q_proj.weight.copy_(torch.from_numpy(w["wq"][i]))
            layer.self_attn.k_proj.weight.copy_(torch.from_numpy(w["wk"][i]))
        wrong = unpermuted(torch.tensor([ref])).logits[0].double().numpy()
    assert np.abs(wrong - expected).max() > 1e-1


def test_permutation_is_the_meta_to_hf_one():
    perm = llama2c.interleaved_to_half_permutation(n_heads=2, head_dim=8)
    assert perm.tolist() == [0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15]
    # Same as transformers' convert_llama_weights_to_hf permute(): view(h, hd/2, 2, d).transpose(1, 2).
    rows = torch.arange(16).view(2, 4, 2, 1).transpose(1, 2).reshape(16)
    assert rows.tolist() == perm.tolist()


def test_reload_is_bitwise_equal(hf_model, stories_src):
    header, w = llama2c.read_llama2c(stories_src / "stories260K.bin")
    expected = llama2c.llama2c_to_hf_state_dict(header, w)
    params = dict(hf_model.named_parameters(remove_duplicate=False))
    assert set(params) == set(expected)
    for name, array in expected.items():
        tensor = params[name].detach()
        assert tensor.dtype == torch.float32, name
        assert np.array_equal(tensor.numpy(), array), name
    assert hf_model.lm_head.weight.data_ptr() == hf_model.model.embed_tokens.weight.data_ptr()
    n_params = sum(p.numel() for p in hf_model.parameters())  # tied classifier counted once
    assert n_params == 260032


def test_tokenizer_helpers(stories_src, reference):
    assert llama2c.encode_text("Once upon a time") == reference["encode('Once upon a time') with BOS"]
    text = llama2c.decode_tokens(reference["greedy_from_bos_first_100_tokens"])
    assert text.startswith("Once upon a time, there was a little girl named Lily.")


def test_shared_dir_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv("OFFSITE_SHARED", str(tmp_path))
    assert llama2c.shared_dir() == tmp_path.resolve()
    assert llama2c.stories260k_dir() is None
    assert llama2c.stories260k_model(tmp_path / "out") is None
    assert llama2c.ref_model_dir() is None
    monkeypatch.setenv("OFFSITE_SHARED", str(tmp_path / "missing"))
    assert llama2c.shared_dir() is None
