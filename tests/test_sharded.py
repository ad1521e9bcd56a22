"""Artifacts for big models: sharded weights, meta-device loading, CRaSh layers stored once.

Every test checks a property that a regression would break: loaded logits bitwise equal to the
in-memory model they were saved from, an index that must agree with the signed tensor table, a
sharded plugged model that stock ``from_pretrained`` reads, a loader that never initialises or
copies weights, and a CRaSh package whose repeated layers take the space of one.
"""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from offsite.adapters.artifact import ADAPTER_WEIGHTS, save_full_adapter
from offsite.artifacts import (INDEX, WEIGHTS, artifact_id, load_into, load_tensors, parse_size, read_manifest,
                               sha256_file, unique_state_dict)
from offsite.workflows.emulate import emulate
from offsite.emulator import get_builder
from offsite.core.errors import ArtifactError, OffsiteError
from offsite.families import count_parameters, get_family, get_layers, layer_linears
from offsite.workflows.finetune import finetune
from offsite.model.loading import load_model
from offsite.emulator.package import load_emulator, save_emulator
from offsite.workflows.plug import plug
from offsite.model.split import Split
from offsite.workflows.verify import verify_artifact

FAMILIES = ["llama", "gpt2", "opt", "gemma2", "phi3", "falcon", "bloom"]
RECORD = ("base", "family", "split", "method", "config", "plan", "parameters", "disclosure")
CRASH = dict(seq_len=16, num_sequences=16, batch_size=4)


def ids(seed=0):
    return torch.randint(4, 120, (2, 9), generator=torch.Generator().manual_seed(seed))


def shard_size(model) -> int:
    """A max_shard_size that splits ``model``'s distinct weights into at least three shards."""
    return max(1, sum(t.numel() * t.element_size() for t in unique_state_dict(model).values()) // 4)


def shards_of(folder) -> list:
    return sorted(read_manifest(folder)["tensors"])


def resign(folder, edit=lambda m: None):
    """Edit the manifest, then re-hash the files and recompute the id, as a forger can."""
    path = folder / "manifest.json"
    m = json.loads(path.read_text())
    edit(m)
    m["files"] = {rel: sha256_file(folder / rel) for rel in m["files"] if (folder / rel).is_file()}
    m["artifact_id"] = artifact_id(m)
    path.write_text(json.dumps(m))


def table_of(tensors: dict) -> dict:
    return {k: [str(v.dtype)[6:], list(v.shape)] for k, v in sorted(tensors.items())}


def in_memory_emulator(path, package):
    """The emulator as ``emulate`` holds it before writing: the base loaded by from_pretrained, the plan applied."""
    m = read_manifest(package)
    base, _ = load_model(str(path))
    family = get_family(base)
    return get_builder(m["method"]).apply(base, family, Split.from_dict(m["split"]), m["plan"]).eval(), m


@pytest.fixture
def sharded(saved_model, tokenizer, tmp_path):
    """Factory: ``(in-memory emulator, its unsharded package, the same emulator saved in >= 3 shards)``."""

    def build(model_type="llama"):
        path, _ = saved_model(model_type, 6)
        package = emulate(str(path), tmp_path / f"{model_type}-emu", emulator_layers=1)
        model, m = in_memory_emulator(path, package)
        out = save_emulator(tmp_path / f"{model_type}-sharded", model, tokenizer, {k: m[k] for k in RECORD}, {},
                            max_shard_size=shard_size(model))
        return model, package, out

    return build


# --- sharded emulator packages ---------------------------------------------------------------------


@pytest.mark.parametrize("model_type", FAMILIES)
def test_a_sharded_package_loads_bitwise_equal_to_the_emulator_it_was_saved_from(sharded, model_type):
    model, package, out = sharded(model_type)
    files = shards_of(out)
    assert len(files) >= 3 and WEIGHTS not in files and (out / INDEX).is_file()
    assert files == [f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)]
    index = json.loads((out / INDEX).read_text())
    tables = read_manifest(out)["tensors"]
    assert index["weight_map"] == {name: rel for rel, table in tables.items() for name in table}
    assert set(index["weight_map"]) == set(unique_state_dict(model))  # every distinct tensor, once
    assert verify_artifact(out)["tensors"] == len(unique_state_dict(model))

    emu, plain = load_emulator(out), load_emulator(package)
    stock = AutoModelForCausalLM.from_pretrained(out).eval()  # a drop-only package stays a stock checkpoint
    with torch.no_grad():
        expected = model(ids()).logits
        assert torch.equal(emu.model(ids()).logits, expected)
        assert torch.equal(plain.model(ids()).logits, expected)
        assert torch.equal(stock(ids()).logits, expected)
    everything = [*emu.model.named_parameters(remove_duplicate=False), *emu.model.named_buffers()]
    assert not [n for n, t in everything if t.is_meta]
    if emu.model.config.tie_word_embeddings:  # stored once, tied again: one Parameter object
        assert emu.model.get_output_embeddings().weight is emu.model.get_input_embeddings().weight
    assert count_parameters(emu.model) == count_parameters(model) == emu.manifest["parameters"]["emulator"]


def _loaded_the_old_way(package):
    """The loader before meta skeletons: a randomly initialised CPU model, restructured, values copied in."""
    m = read_manifest(package)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(package))
    get_builder(m["method"]).restructure(model, get_family(m["family"]), m["plan"])
    tensors = {}
    for rel in m["tensors"]:
        tensors.update(load_tensors(package / rel))
    load_into(model, tensors, package)
    return model.eval()


def test_a_restructured_method_loads_sharded_from_a_meta_skeleton_bitwise(saved_model, tokenizer, text_file,
                                                                          tmp_path):
    """GradOT rebuilds low-rank modules in ``restructure``: on meta, they must still take every value."""
    path, _ = saved_model("phi3", 5)
    package = emulate(str(path), tmp_path / "emu", method="gradot", adapter_layers="1,1", calibration=text_file,
                      param_budget=0.3, seq_len=16, num_sequences=4, batch_size=2)
    emu = load_emulator(package)
    m = read_manifest(package)
    out = save_emulator(tmp_path / "sharded", emu.model, tokenizer, {k: m[k] for k in RECORD}, {},
                        max_shard_size=shard_size(emu.model))
    assert len(shards_of(out)) >= 3
    reference = _loaded_the_old_way(package)
    with torch.no_grad():
        expected = reference(ids()).logits
        assert torch.equal(emu.model(ids()).logits, expected)
        assert torch.equal(load_emulator(out).model(ids()).logits, expected)


def test_weights_that_fit_stay_one_file_written_exactly_as_before(saved_model, tokenizer, tmp_path):
    path, _ = saved_model("gpt2", 6)
    package = emulate(str(path), tmp_path / "emu", emulator_layers=1)
    assert shards_of(package) == [WEIGHTS] and not (package / INDEX).exists()
    model, m = in_memory_emulator(path, package)
    record = {k: m[k] for k in RECORD}
    default = save_emulator(tmp_path / "default", model, tokenizer, record, {})
    roomy = save_emulator(tmp_path / "roomy", model, tokenizer, record, {}, max_shard_size="1TB")
    assert read_manifest(default)["artifact_id"] == read_manifest(roomy)["artifact_id"]
    save_file(unique_state_dict(model), str(tmp_path / "before.safetensors"), metadata={"format": "pt"})
    assert sha256_file(default / WEIGHTS) == sha256_file(tmp_path / "before.safetensors")  # the old writer's bytes
    assert read_manifest(default)["files"][WEIGHTS] == m["files"][WEIGHTS]


def test_an_oversized_tensor_gets_a_shard_of_its_own(sharded, tmp_path, tokenizer):
    model, package, _ = sharded("llama")
    m = read_manifest(package)
    out = save_emulator(tmp_path / "tiny", model, tokenizer, {k: m[k] for k in RECORD}, {}, max_shard_size=1)
    tables = read_manifest(out)["tensors"]
    assert len(tables) == len(unique_state_dict(model)) and all(len(t) == 1 for t in tables.values())
    with torch.no_grad():
        assert torch.equal(load_emulator(out).model(ids()).logits, model(ids()).logits)


@pytest.mark.parametrize("value, size", [(123, 123), ("5GB", 5 * 10**9), ("1.5 KiB", 1536), ("2mb", 2 * 10**6),
                                         ("700", 700)])
def test_shard_sizes_parse_like_hugging_face(value, size):
    assert parse_size(value) == size


@pytest.mark.parametrize("value", [0, -3, "0B", "five GB", "5 PB", "", 2.5, True, None, "0.1B"])
def test_bad_shard_sizes_are_one_clear_error(value):
    with pytest.raises(OffsiteError, match="max_shard_size"):
        parse_size(value)


def test_a_bad_shard_size_is_refused_before_anything_is_written(sharded, tokenizer, tmp_path):
    model, package, _ = sharded("llama")
    m = read_manifest(package)
    with pytest.raises(OffsiteError, match=r"max_shard_size '5 GBs' is not a size; give bytes"):
        save_emulator(tmp_path / "bad", model, tokenizer, {k: m[k] for k in RECORD}, {}, max_shard_size="5 GBs")
    assert not (tmp_path / "bad").exists()


# --- the index must agree with the signed tensor table ---------------------------------------------


def _move_first_tensor(out, src: str, dst: str) -> str:
    """Move one tensor from shard ``src`` to shard ``dst``, rewriting both files; returns its name."""
    a, b = load_tensors(out / src), load_tensors(out / dst)
    name = sorted(a)[0]
    b[name] = a.pop(name)
    save_file(a, str(out / src), metadata={"format": "pt"})
    save_file(b, str(out / dst), metadata={"format": "pt"})
    return name


def _retable(out):
    """A manifest edit that re-describes every weight file present, as a forger would."""
    return lambda m: m.update(tensors={rel: table_of(load_tensors(out / rel)) for rel in m["files"]
                                       if rel.endswith(".safetensors") and (out / rel).is_file()})


def test_a_deleted_shard_is_refused_even_from_a_re_signed_manifest(sharded):
    _, _, out = sharded("llama")
    victim = shards_of(out)[1]
    (out / victim).unlink()
    with pytest.raises(ArtifactError, match=rf"files listed in the manifest are missing: \['{victim}'\]"):
        load_emulator(out)
    resign(out, _retable(out))  # the forger drops it from the file and tensor tables
    for reader in (load_emulator, verify_artifact):
        with pytest.raises(ArtifactError, match="needs the weight files to be shards"):
            reader(out)


def test_a_tensor_moved_to_another_shard_is_refused(sharded):
    _, _, out = sharded("gpt2")
    first, second = shards_of(out)[:2]
    name = _move_first_tensor(out, first, second)
    resign(out, _retable(out))  # file hashes and tensor table re-signed, the index left as it was
    with pytest.raises(ArtifactError, match=rf"maps tensor '{name}' to '{first}', but it is in '{second}'"):
        load_emulator(out)
    with pytest.raises(ArtifactError, match="but it is in"):
        verify_artifact(out)


def test_an_index_that_misplaces_a_tensor_or_lies_about_the_size_is_refused(sharded):
    _, _, out = sharded("opt")
    original = (out / INDEX).read_text()
    index = json.loads(original)
    name, rel = next(iter(index["weight_map"].items()))
    other = next(f for f in shards_of(out) if f != rel)
    for edit, message in [
        (lambda i: i["weight_map"].__setitem__(name, other), rf"maps tensor '{name}' to '{other}'"),
        (lambda i: i["weight_map"].pop(name), r"does not map 1 tensor\(s\)"),
        (lambda i: i["weight_map"].__setitem__("lm_head.extra", rel), "names tensor 'lm_head.extra', which no shard"),
        (lambda i: i["metadata"].__setitem__("total_size", i["metadata"]["total_size"] + 4), "total_size"),
        (lambda i: i.pop("weight_map"), "must be an object with 'metadata'"),
    ]:
        forged = json.loads(original)
        edit(forged)
        (out / INDEX).write_text(json.dumps(forged))
        with pytest.raises(ArtifactError, match="sha256"):  # unsigned edit: the hash catches it
            load_emulator(out)
        resign(out)
        with pytest.raises(ArtifactError, match=message):
            load_emulator(out)
    (out / INDEX).write_text("{not json")
    resign(out)
    with pytest.raises(ArtifactError, match="is not valid UTF-8 JSON"):
        verify_artifact(out)


def test_extra_shards_missing_indexes_and_duplicated_tensors_are_refused(sharded, tmp_path):
    _, _, out = sharded("llama")
    files = shards_of(out)
    stray = out / f"model-{len(files) + 1:05d}-of-{len(files):05d}.safetensors"
    save_file({"x": torch.zeros(2)}, str(stray), metadata={"format": "pt"})
    with pytest.raises(ArtifactError, match="files not listed in the manifest are present"):
        load_emulator(out)
    resign(out, lambda m: (m["files"].__setitem__(stray.name, "0" * 64), _retable(out)(m)))
    with pytest.raises(ArtifactError, match="needs the weight files to be shards"):
        load_emulator(out)
    stray.unlink()
    resign(out, _retable(out))
    load_emulator(out)  # back to the consistent package

    index = (out / INDEX).read_text()
    (out / INDEX).unlink()
    resign(out)
    with pytest.raises(ArtifactError, match="holds shard files .* but no model.safetensors.index.json"):
        verify_artifact(out)
    (out / INDEX).write_text(index)
    resign(out, lambda m: m["files"].__setitem__(INDEX, "0" * 64))

    a, b = load_tensors(out / files[0]), load_tensors(out / files[1])
    b.update(a)  # every tensor of shard 1 now also in shard 2
    save_file(b, str(out / files[1]), metadata={"format": "pt"})
    resign(out, _retable(out))
    with pytest.raises(ArtifactError, match="is in two shards"):
        load_emulator(out)


def test_a_consistent_forgery_that_drops_a_tensor_is_refused_by_the_architecture(sharded):
    _, _, out = sharded("llama")
    first = shards_of(out)[0]
    tensors = load_tensors(out / first)
    dropped = sorted(tensors)[0]
    gone = tensors.pop(dropped)
    save_file(tensors, str(out / first), metadata={"format": "pt"})
    index = json.loads((out / INDEX).read_text())
    index["weight_map"].pop(dropped)
    index["metadata"]["total_size"] -= gone.numel() * gone.element_size()
    (out / INDEX).write_text(json.dumps(index))
    resign(out, _retable(out))  # files, tensor table and index all agree: only the architecture can tell
    verify_artifact(out.parent / "llama-emu")  # (the untouched twin still verifies)
    for reader in (load_emulator, verify_artifact):
        with pytest.raises(ArtifactError, match=rf"missing 1 tensor\(s\) e.g. \['{dropped}'\]"):
            reader(out)


# --- plugged models --------------------------------------------------------------------------------


def test_a_sharded_plugged_model_loads_with_stock_transformers_and_equals_the_unsharded_one(saved_model,
                                                                                            tmp_path):
    path, base = saved_model("gpt2", 6)
    package = emulate(str(path), tmp_path / "emu", emulator_layers=1)
    emu = load_emulator(package)
    with torch.no_grad():  # a "trained" adapter: the adapter layers differ from the base model's
        for pos in emu.adapter_positions:
            for p in get_layers(emu.model, emu.family)[pos].parameters():
                p.add_(0.01)
    adapter = save_full_adapter(tmp_path / "adapter", emu, {}, {})
    whole = plug(str(path), adapter, tmp_path / "whole")
    split = plug(str(path), adapter, tmp_path / "split", max_shard_size=shard_size(base))
    assert shards_of(whole) == [WEIGHTS] and len(shards_of(split)) >= 3 and (split / INDEX).is_file()
    verify_artifact(split)
    a = AutoModelForCausalLM.from_pretrained(whole).eval()
    b = AutoModelForCausalLM.from_pretrained(split).eval()
    left, right = unique_state_dict(a), unique_state_dict(b)
    assert left.keys() == right.keys() and all(torch.equal(v, right[k]) for k, v in left.items())
    with torch.no_grad():
        assert torch.equal(a(ids()).logits, b(ids()).logits)
        assert not torch.equal(a(ids()).logits, base(ids()).logits)  # the adapter is in
    merged = {}
    for rel in shards_of(split):
        merged.update(load_file(str(split / rel)))
    assert merged.keys() == load_file(str(whole / WEIGHTS)).keys()


def test_plug_refuses_a_bad_shard_size_before_loading_anything(tmp_path):
    with pytest.raises(OffsiteError, match="max_shard_size must be at least 1 byte"):
        plug(str(tmp_path / "no-model"), tmp_path / "no-adapter", tmp_path / "out", max_shard_size=0)


# --- loading: a meta skeleton, assigned, never initialised -----------------------------------------


def test_loading_never_initialises_or_copies_weights(sharded, monkeypatch):
    import transformers.modeling_utils as modeling_utils

    _, _, out = sharded("llama")

    def forbidden(*args, **kwargs):
        raise AssertionError("a weight initialiser ran while loading a package")

    for name in ("normal_", "uniform_", "kaiming_uniform_", "trunc_normal_", "xavier_uniform_"):
        monkeypatch.setattr(torch.nn.init, name, forbidden)
    monkeypatch.setattr(modeling_utils.PreTrainedModel, "initialize_weights", forbidden)
    read, devices = {}, []
    real_load, real_read = torch.nn.Module.load_state_dict, load_tensors

    def spy_load(self, state, *args, **kwargs):
        devices.extend({p.device.type for p in self.parameters()})
        return real_load(self, state, *args, **kwargs)

    def spy_read(path):
        part = real_read(path)
        read.update(part)
        return part

    monkeypatch.setattr(torch.nn.Module, "load_state_dict", spy_load)
    monkeypatch.setattr("offsite.emulator.package.load_tensors", spy_read)
    emu = load_emulator(out)
    assert set(devices) == {"meta"}  # nothing was allocated for the weights before they were assigned
    for name, p in emu.model.named_parameters():
        assert p.data_ptr() == read[name].data_ptr(), f"{name} was copied, not assigned"


def test_anything_left_on_meta_is_named():
    class Skeleton(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.empty(2, 2, device="meta"))
            self.register_buffer("table", torch.empty(3, device="meta"), persistent=False)

    with pytest.raises(ArtifactError, match=r"1 tensor\(s\) of the architecture got no value, e.g. 'table'"):
        load_into(Skeleton(), {"weight": torch.ones(2, 2)}, "here", assign=True)
    with pytest.raises(ArtifactError, match="tensor 'weight' is float64, the architecture has float32"):
        load_into(Skeleton(), {"weight": torch.ones(2, 2, dtype=torch.float64)}, "here", assign=True)


# --- CRaSh: shared layers stored once --------------------------------------------------------------


def _identity_middle(model, layers):
    """Zero the attention-output and MLP-down projections: those layers become exact identities."""
    family = get_family(model)
    with torch.no_grad():
        for i in layers:
            for role in ("attn.o", "mlp.down"):
                linear = layer_linears(get_layers(model, family)[i], family)[role]
                linear.weight.zero_()
                if getattr(linear, "bias", None) is not None:
                    linear.bias.zero_()


@pytest.fixture
def crash_pair(saved_model, text_file, tmp_path):
    """``(base path, tied package, copies package)``: CRaSh with share=true, with and without tie_shared."""
    path, model = saved_model("llama", 8)
    _identity_middle(model, [3, 4])  # clusters [2, 3, 4], [5]: representatives 3 and 5 fill two positions each
    model.save_pretrained(path)
    common = dict(method="crash", calibration=text_file, emulator_layers=2, share=True, **CRASH)
    tied = emulate(str(path), tmp_path / "tied", tie_shared=True, **common)
    copies = emulate(str(path), tmp_path / "copies", tie_shared=False, **common)
    return path, tied, copies


def test_crash_stores_each_shared_layer_once_and_reties_it_bitwise(crash_pair):
    path, tied, copies = crash_pair
    m = read_manifest(tied)
    assert [e["source"] for e in m["plan"]["layers"]] == [0, 1, 3, 3, 5, 5, 6, 7]
    assert m["plan"]["shared_positions"] == [[2, 3], [4, 5]] and "shared_positions" not in read_manifest(copies)["plan"]

    stored = {n: e for table in m["tensors"].values() for n, e in table.items()}
    assert not [n for n in stored if n.startswith(("model.layers.3.", "model.layers.5."))]  # the repeats
    copy_stored = {n: e for table in read_manifest(copies)["tensors"].values() for n, e in table.items()}
    numel = lambda table: sum(torch.Size(e[1]).numel() for e in table.values())  # noqa: E731
    one = list(get_layers(load_model(str(path))[0], get_family("llama"))[0].parameters())
    layer = sum(p.numel() for p in one)
    assert len(copy_stored) - len(stored) == 2 * len(one)  # two repeated layers' tensors no longer stored
    assert numel(copy_stored) - numel(stored) == 2 * layer
    assert numel(stored) == m["parameters"]["emulator"] == read_manifest(copies)["parameters"]["emulator"] - 2 * layer

    memory, _ = in_memory_emulator(path, tied)  # the emulator as emulate held it, shared parameters and all
    emu, twin = load_emulator(tied), load_emulator(copies)
    layers = get_layers(emu.model, emu.family)
    for group in m["plan"]["shared_positions"]:
        first = dict(layers[group[0]].named_parameters())
        for pos in group[1:]:
            assert layers[pos] is not layers[group[0]]
            assert all(p is first[n] for n, p in layers[pos].named_parameters())
            assert layers[pos].self_attn.layer_idx == pos  # its own KV-cache slot
    assert count_parameters(emu.model) == count_parameters(memory) == m["parameters"]["emulator"]
    with torch.no_grad():
        expected = memory(ids()).logits
        assert torch.equal(emu.model(ids()).logits, expected)
        assert torch.equal(twin.model(ids()).logits, expected)
        prompt = ids()[:1, :5]
        assert torch.equal(emu.model.generate(prompt, max_new_tokens=4, do_sample=False),
                           twin.model.generate(prompt, max_new_tokens=4, do_sample=False))
    verify_artifact(tied)


def test_the_data_owner_trains_the_same_adapter_on_a_tied_package(crash_pair, text_file, tmp_path):
    _, tied, copies = crash_pair
    frozen = {n: p.clone() for n, p in load_emulator(tied).model.named_parameters()}
    runs = {}
    for name, package in (("tied", tied), ("copies", copies)):
        out = finetune(package, text_file, tmp_path / f"adapter-{name}", format="text", max_steps=2, lr=1e-2,
                       block_size=16, batch_size=2, progress=False)
        runs[name] = load_tensors(out / ADAPTER_WEIGHTS)
    assert runs["tied"].keys() == runs["copies"].keys()
    assert all(torch.equal(runs["tied"][k], runs["copies"][k]) for k in runs["tied"])
    changed = [k for k in runs["tied"] if not torch.equal(runs["tied"][k], frozen[k])]
    assert changed and all(k.startswith(("model.layers.0.", "model.layers.1.", "model.layers.6.",
                                         "model.layers.7.")) for k in runs["tied"])


@pytest.mark.parametrize("groups, message", [
    ([[0, 2]], "includes an adapter position; adapter layers are never shared"),
    ([[2, 4]], "whose layers have different sources"),
    ([[3, 2]], "at least two increasing emulator positions"),
    ([[2, 3], [3, 4]], "no position twice"),
    ([[2]], "at least two increasing"),
    ("2,3", "must be a list of groups"),
])
def test_forged_shared_positions_are_refused(crash_pair, groups, message):
    _, tied, _ = crash_pair
    resign(tied, lambda m: m["plan"].__setitem__("shared_positions", groups))
    with pytest.raises(ArtifactError, match=message):
        read_manifest(tied)


def test_tie_shared_is_the_default_and_needs_a_bool():
    builder = get_builder("crash")
    assert builder.make_config(share=True).tie_shared is True
    with pytest.raises(OffsiteError, match="tie_shared must be true or false"):
        builder.make_config(share=True, tie_shared="yes")


def test_the_cli_writes_sharded_packages_that_fine_tune_and_plug(saved_model, text_file, tmp_path):
    """emulate --max-shard-size -> a sharded package; finetune on it (the adapter binds to every shard's
    tensors) and plug --max-shard-size -> a sharded stock checkpoint equal to the unsharded plug."""
    from offsite.cli import main

    path, _ = saved_model("llama", 6)
    emu, adapter = tmp_path / "emu", tmp_path / "adapter"
    assert main(["--quiet", "emulate", "--model", str(path), "--adapter-layers", "1,1", "--emulator-layers", "2",
                 "--max-shard-size", "40KB", "--out", str(emu)]) == 0
    assert (emu / INDEX).is_file() and len(list(emu.glob("model-*-of-*.safetensors"))) >= 3
    assert main(["--quiet", "finetune", "--emulator", str(emu), "--data", str(text_file), "--format", "text",
                 "--max-steps", "2", "--batch-size", "2", "--block-size", "16", "--out", str(adapter)]) == 0
    assert json.loads((adapter / "manifest.json").read_text())["emulator"]["dtype"] == "float32"
    for name, size in (("plugged", "40KB"), ("whole", "5GB")):
        assert main(["--quiet", "plug", "--model", str(path), "--adapter", str(adapter), "--emulator", str(emu),
                     "--max-shard-size", size, "--out", str(tmp_path / name)]) == 0
    assert (tmp_path / "plugged" / INDEX).is_file() and not (tmp_path / "whole" / INDEX).is_file()
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "plugged").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "whole").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("model_type", sorted(__import__("offsite.families", fromlist=["FAMILIES"]).FAMILIES))
@pytest.mark.parametrize("max_shard", ["5GB", "20KB"])
def test_streamed_writer_is_bitwise_safetensors_for_every_family(model_type, max_shard, tmp_path):
    """The tensor-by-tensor writer's files are byte for byte what save_file writes for each shard's
    tensors, for every family's state dict (dtypes mixed in: bf16, fp16, int64, bool), one file and
    sharded; values that live on meta are read one at a time."""
    import weakref

    from conftest import make_model
    from offsite.artifacts import save_sharded, tensor_aliases
    from offsite.artifacts.shards import plan_shards

    model = make_model(model_type, 3)
    distinct, _ = tensor_aliases(model)
    tensors = {name: t.detach() for name, t in distinct.items()}
    names = sorted(tensors)
    tensors[names[0]] = tensors[names[0]].bfloat16()
    tensors[names[1]] = tensors[names[1]].half()
    tensors["extra.steps"] = torch.arange(5)
    tensors["extra.mask"] = torch.tensor([True, False, True])
    tensors["extra.empty"] = torch.zeros(0, 4)
    tensors[names[2]] = tensors[names[2]].t()  # not contiguous
    truth = dict(tensors)
    held = {name: torch.empty(t.shape, dtype=t.dtype, device="meta") for name, t in list(tensors.items())[::2]}
    tensors.update(held)
    calls, alive = [], []

    def read(wanted):
        assert len(wanted) == 1 and all(ref() is None for ref in alive), "more than one read tensor alive"
        calls.append(wanted[0])
        value = truth[wanted[0]].clone()
        alive.append(weakref.ref(value))
        return {wanted[0]: value}

    out = tmp_path / "streamed"
    out.mkdir()
    table = save_sharded(tensors, out, max_shard, read=read)
    assert sorted(calls) == sorted(held)
    groups = plan_shards({n: t.numel() * t.element_size() for n, t in tensors.items()},
                         parse_size(max_shard))
    assert len(table) == len(groups) and (len(groups) > 1) == (max_shard == "20KB")
    ref = tmp_path / "ref"
    ref.mkdir()
    for file, group in zip(sorted(table), groups):
        save_file({n: truth[n].contiguous() for n in group}, str(ref / file), metadata={"format": "pt"})
        assert (out / file).read_bytes() == (ref / file).read_bytes(), file
