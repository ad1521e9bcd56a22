"""Property-based tests of the artifact readers: random corruptions are refused, never crash, never pass.

A reader that meets hostile bytes may answer in exactly two ways: accept content that is
unchanged, or raise :class:`ArtifactError`. Any other exception is a crash; accepting a change is
a hole.
"""

import copy
import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from offsite.artifacts import artifact_id, load_tensors, read_manifest
from offsite.artifacts.manifest import VOLATILE
from offsite.core.errors import ArtifactError

SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                max_size=3), max_leaves=8)


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    """A small, valid adapter artifact folder written by the library itself."""
    from offsite.artifacts import save_tensors, writing_artifact

    out = tmp_path_factory.mktemp("a") / "adapter"
    with writing_artifact(out, "adapter") as stage:
        index = save_tensors({"model.layers.0.w": torch.ones(2, 2), "model.layers.3.w": torch.zeros(2, 2)},
                             stage.path / "adapter.safetensors")
        stage.manifest.update({"base": {"name_or_path": "m", "model_type": "llama", "num_layers": 4,
                                        "config_hash": "a" * 64, "weight_fingerprint": "b" * 64},
                               "family": "llama", "split": {"num_layers": 4, "adapter": [0, 3], "middle": [1, 2]},
                               "emulator": {"artifact_id": "c" * 64}, "tensors": {"adapter.safetensors": index}})
    return out


def _paths(data, prefix=()):
    """Every (path) to a value inside nested dicts/lists."""
    yield prefix
    if isinstance(data, dict):
        for k, v in data.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            yield from _paths(v, prefix + (i,))


def _set(data, path, value):
    for key in path[:-1]:
        data = data[key]
    data[path[-1]] = value


@SETTINGS
@given(st.data())
def test_any_edit_of_a_manifest_is_refused_or_harmless(adapter_dir, data):
    original = json.loads((adapter_dir / "manifest.json").read_text())
    edited = copy.deepcopy(original)
    paths = [p for p in _paths(original) if p]
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(paths))
        try:
            _set(edited, path, data.draw(JSON))
        except (TypeError, KeyError, IndexError):
            pass  # the parent was replaced by a scalar by an earlier edit
    # what a file can hold: JSON object keys are strings (an edit inside a replaced dict may have set key 0)
    edited = json.loads(json.dumps(edited))
    recompute = data.draw(st.booleans())  # a forger who also recomputes the id
    if recompute and isinstance(edited, dict):
        edited["artifact_id"] = artifact_id(edited)
    (adapter_dir / "manifest.json").write_text(json.dumps(edited))
    try:
        read = read_manifest(adapter_dir)
    except ArtifactError:
        return
    finally:
        (adapter_dir / "manifest.json").write_text(json.dumps(original))
    core = {k: v for k, v in read.items() if k not in VOLATILE}
    if not recompute:
        assert core == {k: v for k, v in original.items() if k not in VOLATILE}, "an edit was accepted"


@SETTINGS
@given(st.binary(max_size=300))
def test_random_bytes_as_a_manifest_are_refused(adapter_dir, blob):
    original = (adapter_dir / "manifest.json").read_bytes()
    (adapter_dir / "manifest.json").write_bytes(blob)
    try:
        with pytest.raises(ArtifactError):
            read_manifest(adapter_dir)
    finally:
        (adapter_dir / "manifest.json").write_bytes(original)


@pytest.fixture(scope="module")
def good_safetensors(tmp_path_factory):
    path = tmp_path_factory.mktemp("s") / "w.safetensors"
    save_file({"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.int64)},
              str(path))
    return path.read_bytes()


@SETTINGS
@given(st.data())
def test_corrupted_safetensors_are_refused_or_read_cleanly(tmp_path_factory, good_safetensors, data):
    blob = bytearray(good_safetensors)
    mode = data.draw(st.sampled_from(["flip", "truncate", "header", "random"]))
    if mode == "flip":
        for _ in range(data.draw(st.integers(1, 4))):
            blob[data.draw(st.integers(0, len(blob) - 1))] ^= data.draw(st.integers(1, 255))
    elif mode == "truncate":
        blob = blob[:data.draw(st.integers(0, len(blob) - 1))]
    elif mode == "header":  # a header that claims absurd sizes or offsets
        header = json.dumps({"a": {"dtype": data.draw(st.sampled_from(["F32", "I64", "XX"])),
                                   "shape": data.draw(st.lists(st.integers(-2, 10 ** 12), max_size=3)),
                                   "data_offsets": data.draw(st.lists(st.integers(-2, 10 ** 12), max_size=3))}})
        blob = bytearray(len(header).to_bytes(8, "little") + header.encode() + bytes(16))
    else:
        blob = bytearray(data.draw(st.binary(max_size=200)))
    path = tmp_path_factory.mktemp("c") / "w.safetensors"
    path.write_bytes(bytes(blob))
    try:
        tensors = load_tensors(path)
    except ArtifactError:
        return
    assert all(isinstance(t, torch.Tensor) for t in tensors.values())
