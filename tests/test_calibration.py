"""Calibration runner: deterministic batches, refusals, streamed statistics = whole-model statistics."""

import json
import warnings

import pytest
import torch
import torch.nn.functional as F

from conftest import make_model, make_tokenizer
from offsite.calibration import (DampingWarning, backward_sweep, calibration_batches, capture_boundaries,
                                 damped_cholesky, damped_inverse, gather_linear_stats)
from offsite.core.errors import OffsiteError
from offsite.families import get_family, get_layers, layer_linears
from fixtures.tolerance import assert_close_to_scale


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def test_batches_are_deterministic_shaped_and_seeded(tok, text_file):
    a = calibration_batches(text_file, tok, seq_len=16, num_sequences=10, batch_size=4, seed=3)
    b = calibration_batches(text_file, tok, seq_len=16, num_sequences=10, batch_size=4, seed=3)
    c = calibration_batches(text_file, tok, seq_len=16, num_sequences=10, batch_size=4, seed=4)
    assert [x.shape for x in a] == [(4, 16), (4, 16), (2, 16)] and all(x.dtype == torch.long for x in a)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    # windows are contiguous slices of the tokenised text, without special tokens
    ids = tok(text_file.read_text(), add_special_tokens=False)["input_ids"]
    text = " ".join(map(str, ids))
    assert all(" ".join(map(str, row.tolist())) in text for row in a[0])


def test_jsonl_text_field_is_read(tok, tmp_path, text_file):
    path = tmp_path / "cal.jsonl"
    path.write_text("".join(json.dumps({"text": line}) + "\n" for line in text_file.read_text().splitlines()))
    assert len(calibration_batches(path, tok, seq_len=8, num_sequences=4, batch_size=2)) == 2


def test_refusals(tok, tmp_path, text_file):
    with pytest.raises(OffsiteError, match="does not exist"):
        calibration_batches(tmp_path / "nope.txt", tok)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(OffsiteError, match="is empty"):
        calibration_batches(empty, tok)
    with pytest.raises(OffsiteError, match=r"window\(s\) of 64; 10000 windows need 640000 tokens"):
        calibration_batches(text_file, tok, seq_len=64, num_sequences=10000)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    with pytest.raises(OffsiteError, match="no string 'text' field"):
        calibration_batches(bad, tok)
    with pytest.raises(OffsiteError, match="seq_len must be a positive integer"):
        calibration_batches(text_file, tok, seq_len=0)


def _whole_model_stats(model, family, batches, indices):
    """Reference: ordinary full backward of the summed loss, hooks on every wanted layer at once."""
    layers = get_layers(model, family)
    out = {}
    for i in indices:
        with gather_linear_stats(layer_linears(layers[i], family)) as stats:
            for ids in batches:
                emb = model.get_input_embeddings()
                emb.weight.requires_grad_(True)  # makes every activation require grad
                logits = model(input_ids=ids, use_cache=False).logits
                F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").backward()
        out[i] = {r: s.finalize() for r, s in stats.items()}
    return out


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "bloom", "gemma2"])
def test_streamed_statistics_equal_whole_model_backward(model_type, tok, text_file):
    model = make_model(model_type, 4)
    family = get_family(model)
    batches = [torch.randint(4, 120, (2, 12), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    got = {}
    bounds = capture_boundaries(model, family, batches)
    backward_sweep(model, family, bounds, [1, 2], lambda i, s: got.__setitem__(i, s))
    want = _whole_model_stats(model, family, batches, [1, 2])
    assert sorted(got) == [1, 2]
    for i in (1, 2):
        assert set(got[i]) == set(layer_linears(get_layers(model, family)[i], family))
        for role, s in got[i].items():
            for key in ("A", "G", "grad"):
                assert_close_to_scale(s[key], want[i][role][key], k=256, dtype=torch.float32, what=f"{i} {role} {key}")
            assert s["tokens"] == 2 * 2 * 12
    # the released boundaries above the lowest wanted layer are gone
    assert bounds.hidden[3] is None and bounds.hidden[2] is None and bounds.hidden[1] is not None
    with torch.no_grad():
        ids = batches[0]
        ref = F.cross_entropy(model(ids).logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    assert bounds.tokens == 2 * 2 * 11 and abs(bounds.loss - float(ref)) < 0.5


def test_linears_reading_one_input_share_one_covariance(tok):
    """q/k/v and gate/up read the same tensor: one A each group (the same object), equal to the mean
    outer product of the inputs recorded independently; o and down have their own. Without the
    gradient, G is unchanged and no (out, in) accumulator exists."""
    model = make_model("llama", 3)
    family = get_family(model)
    layer = get_layers(model, family)[1]
    linears = layer_linears(layer, family)
    seen = {role: [] for role in linears}
    hooks = [m.register_forward_hook(lambda mod, inp, out, r=role: seen[r].append(inp[0].detach().flatten(0, 1)))
             for role, m in linears.items()]
    batches = [torch.randint(4, 120, (2, 10), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    results = {}
    for with_grad in (True, False):
        got = {}
        bounds = capture_boundaries(model, family, batches)
        for role in seen:
            seen[role].clear()
        backward_sweep(model, family, bounds, [1], lambda i, st: got.update(st), with_grad=with_grad)
        results[with_grad] = got
    for h in hooks:
        h.remove()
    got = results[True]
    for group in (("attn.q", "attn.k", "attn.v"), ("mlp.gate", "mlp.up")):
        assert all(got[r]["A"] is got[group[0]]["A"] for r in group)
    assert got["attn.o"]["A"] is not got["attn.q"]["A"] and got["mlp.down"]["A"] is not got["mlp.up"]["A"]
    for role, inputs in seen.items():
        x = torch.cat(inputs).double()
        assert_close_to_scale(got[role]["A"], x.T @ x / len(x), k=64, dtype=torch.float32, what=role)
    lean = results[False]
    for role in got:
        assert lean[role]["grad"] is None and got[role]["grad"].shape == got[role]["G"].shape[:1] + got[role]["A"].shape[:1]
        assert_close_to_scale(lean[role]["G"], got[role]["G"], k=64, dtype=torch.float32, what=role)


def test_damping_triggers_only_when_needed():
    pd = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        factor, used = damped_cholesky(pd, name="A")
    assert used == 0.0 and torch.allclose(factor @ factor.T, pd)
    singular = torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    with pytest.warns(DampingWarning, match="G: not positive definite; damped with"):
        inv = damped_inverse(singular, name="G")
    assert torch.isfinite(inv).all()
