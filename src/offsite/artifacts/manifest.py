"""The manifest of an artifact folder: its identity, and the strict schema every reader checks first.

``artifact_id`` is the sha256 of the manifest's *content*: every field except the few that describe
one run rather than what the artifact is (``created``, ``run`` timing, the ``signature`` and the id
itself). So the id covers the file table, the tensor table, the kind, the base identity, the split
and the plan: editing any of them without recomputing the id is caught, and a bitwise-identical
rebuild gets the same id as its twin (so it accepts its twin's adapters). Recomputing the id after
an edit is possible for anyone; only a signature (:mod:`.signing`) ties the content to a party.

The schema is checked per kind before any other code reads a field, so a manifest with a missing,
mistyped or out-of-range field is one clear :class:`ArtifactError`, never a crash later.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path, PurePosixPath

from .. import __version__
from ..core.errors import ArtifactError
from .signing import check_embedded

SCHEMA_VERSION = 2
MANIFEST = "manifest.json"
KINDS = ("emulator", "adapter", "lora", "plugged", "peft")
# Fields of one run, not of the artifact: left out of the identity.
VOLATILE = ("artifact_id", "signature", "created", "run")
# Weight formats that unpickle (run code) when loaded; an artifact may never list one.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".npy", ".npz", ".joblib", ".h5", ".msgpack")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_BASE = {"name_or_path": str, "model_type": str, "num_layers": int, "config_hash": "hex", "weight_fingerprint": "hex"}
# Required top-level fields per kind, with their JSON type.
REQUIRED = {
    "emulator": {"base": dict, "family": str, "split": dict, "method": str, "config": dict, "plan": dict,
                 "tensors": dict},
    "adapter": {"base": dict, "family": str, "split": dict, "emulator": dict, "tensors": dict},
    "lora": {"base": dict, "family": str, "split": dict, "emulator": dict, "tensors": dict, "lora": dict},
    "plugged": {"base": dict, "family": str, "adapter": dict, "tensors": dict},
    "peft": {"base": dict, "family": str, "adapter": dict, "tensors": dict},
}


# Keys of measurements inside a plan (timings, memory peaks): facts of one run, moved to ``run``.
RUN_FACT_KEYS = frozenset({"seconds", "stats_seconds", "max_rss_mb", "cuda_max_allocated_mb"})


def split_run_facts(data):
    """``(data without RUN_FACT_KEYS at any depth, {path: value} of what was removed)``.

    A method's plan may record how long its build took; that must not enter the identity, or a
    bitwise-identical rebuild would be another artifact.
    """
    facts = {}

    def clean(value, path):
        if isinstance(value, dict):
            out = {}
            for k, v in value.items():
                if k in RUN_FACT_KEYS:
                    facts[".".join(path + (str(k),))] = v
                else:
                    out[k] = clean(v, path + (str(k),))
            return out
        if isinstance(value, list):
            return [clean(v, path + (str(i),)) for i, v in enumerate(value)]
        return value

    return clean(data, ()), facts


def canonical_json(data) -> str:
    """Deterministic JSON (sorted keys, no spaces) used for hashing plain data."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)


def artifact_id(manifest: dict) -> str:
    """Identity of an artifact: sha256 over its manifest without the :data:`VOLATILE` fields."""
    core = {k: v for k, v in manifest.items() if k not in VOLATILE}
    return hashlib.sha256(canonical_json(core).encode()).hexdigest()


def _is(value, kind) -> bool:
    if kind == "hex":
        return isinstance(value, str) and bool(_HEX64.match(value))
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _type_name(kind) -> str:
    return "a 64-digit lowercase sha256 hex string" if kind == "hex" else {dict: "an object", str: "a string",
                                                                          int: "an integer", list: "a list"}[kind]


def _check_file_name(rel, where) -> None:
    """A file-table key must be a plain relative path inside the folder, never a pickle format."""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\x00" in rel:
        raise ArtifactError(f"{where}: file table entry {rel!r} is not a relative path")
    pure = PurePosixPath(rel)
    if pure.is_absolute() or ".." in pure.parts or "." in pure.parts or str(pure) != rel:
        raise ArtifactError(f"{where}: file table entry {rel!r} points outside the folder or is not normalised; "
                            "only plain relative paths inside the artifact are allowed")
    if pure.name == MANIFEST:
        raise ArtifactError(f"{where}: the file table may not list {MANIFEST} itself")
    if pure.suffix.lower() in PICKLE_SUFFIXES:
        raise ArtifactError(f"{where}: lists '{rel}', a pickle-based weight format; offsite artifacts hold weights "
                            "only as .safetensors")


def check_schema(manifest, where) -> None:
    """Validate a manifest's fields for its kind; raises :class:`ArtifactError` naming the first problem."""
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{where}: the manifest must be a JSON object, got {type(manifest).__name__}")
    kind = manifest.get("kind")
    if kind not in KINDS:
        raise ArtifactError(f"{where}: kind {kind!r} is not an offsite artifact kind; allowed: {', '.join(KINDS)}")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise ArtifactError(f"{where} lacks the required field 'files' (an object of file -> sha256)")
    for rel, digest in files.items():
        _check_file_name(rel, where)
        if not _is(digest, "hex"):
            raise ArtifactError(f"{where}: file '{rel}' has sha256 {digest!r}; expected {_type_name('hex')}")
    for key, kind_of in REQUIRED[kind].items():
        if key not in manifest:
            raise ArtifactError(f"{where}: a '{kind}' manifest needs the field '{key}', which is missing")
        if not _is(manifest[key], kind_of):
            raise ArtifactError(f"{where}: field '{key}' must be {_type_name(kind_of)}")
    for key, kind_of in _BASE.items():
        if not _is(manifest["base"].get(key), kind_of):
            raise ArtifactError(f"{where}: base.{key} must be {_type_name(kind_of)}")
    if "split" in REQUIRED[kind]:
        _check_split(manifest["split"], manifest["base"]["num_layers"], where)
    if kind == "emulator":
        _check_emulator_fields(manifest, where)
    if "emulator" in REQUIRED[kind] and not _is(manifest["emulator"].get("artifact_id"), "hex"):
        raise ArtifactError(f"{where}: emulator.artifact_id must be {_type_name('hex')}")
    _check_tensor_table(manifest["tensors"], files, where)


def _check_split(split: dict, num_layers: int, where) -> None:
    n, adapter = split.get("num_layers"), split.get("adapter")
    if n != num_layers or not isinstance(adapter, list) or not adapter:
        raise ArtifactError(f"{where}: split must give num_layers = base.num_layers ({num_layers}) and a non-empty "
                            "adapter list")
    if any(not _is(i, int) or not 0 <= i < n for i in adapter) or len(set(adapter)) != len(adapter):
        raise ArtifactError(f"{where}: split.adapter {adapter} must be distinct layer indices in 0..{n - 1}")
    middle = [i for i in range(n) if i not in set(adapter)]
    if "middle" in split and split["middle"] != middle:
        raise ArtifactError(f"{where}: split.middle must be the layers not in split.adapter ({middle})")


def _check_emulator_fields(manifest: dict, where) -> None:
    """The plan's layer table, and the numbers ``inspect`` shows, must be what offsite writes."""
    n, adapter = manifest["split"]["num_layers"], manifest["split"]["adapter"]
    layers = manifest["plan"].get("layers")
    ok = isinstance(layers, list) and layers and all(
        isinstance(e, dict) and _is(e.get("source"), int) and 0 <= e["source"] < n
        and e.get("role") in ("adapter", "emulator") for e in layers)
    if not ok:
        raise ArtifactError(f"{where}: plan.layers must be a non-empty list of {{'source': layer index in 0..{n - 1}, "
                            "'role': 'adapter' | 'emulator'}")
    roles = {}
    for e in layers:
        roles.setdefault(e["role"], []).append(e["source"])
    if sorted(roles.get("adapter", [])) != sorted(adapter) or set(roles.get("emulator", [])) & set(adapter):
        raise ArtifactError(f"{where}: plan.layers must hold each adapter layer {sorted(adapter)} once, as role "
                            "'adapter', and no adapter layer as an emulator layer")
    _check_shared_positions(manifest["plan"].get("shared_positions", []), layers, where)
    params = manifest.get("parameters", {})
    if not isinstance(params, dict) or not all(_is(v, int) for v in params.values()):
        raise ArtifactError(f"{where}: parameters must be an object of name -> integer count")
    disclosure = manifest.get("disclosure", {"fractions": {}})
    fractions = disclosure.get("fractions") if isinstance(disclosure, dict) else None
    if not isinstance(fractions, dict) or not all(_is(v, float) or _is(v, int) for v in fractions.values()):
        raise ArtifactError(f"{where}: disclosure must be an object with 'fractions' of name -> number")


def _check_shared_positions(groups, layers: list, where) -> None:
    """``plan.shared_positions``: emulator positions that hold one set of parameters (CRaSh ``tie_shared``).

    Each group lists two or more distinct positions in increasing order, all of role ``emulator``
    with the same source; no position is in two groups. An adapter position is never tied: the data
    owner trains those layers, and a tie would let training write into a frozen middle layer.
    """
    allowed = ("plan.shared_positions must be a list of groups of at least two increasing emulator positions "
               f"in 0..{len(layers) - 1}, each group one source layer, no position twice")
    if not isinstance(groups, list) or not all(isinstance(g, list) and len(g) >= 2 for g in groups):
        raise ArtifactError(f"{where}: {allowed}")
    seen = set()
    for group in groups:
        if not all(_is(p, int) and 0 <= p < len(layers) for p in group) or group != sorted(set(group)) \
                or seen & set(group):
            raise ArtifactError(f"{where}: {allowed}; got {group}")
        seen |= set(group)
        if any(layers[p]["role"] != "emulator" for p in group):
            raise ArtifactError(f"{where}: plan.shared_positions ties {group}, which includes an adapter position; "
                                "adapter layers are never shared")
        if len({layers[p]["source"] for p in group}) != 1:
            raise ArtifactError(f"{where}: plan.shared_positions ties {group}, whose layers have different sources")


def _check_tensor_table(tensors: dict, files: dict, where) -> None:
    """Every safetensors file is listed in the tensor table and every table entry is a listed file."""
    weight_files = {rel for rel in files if rel.endswith(".safetensors")}
    if set(tensors) != weight_files:
        raise ArtifactError(f"{where}: the tensor table covers {sorted(tensors)} but the weight files are "
                            f"{sorted(weight_files)}; every .safetensors file must be described")
    for rel, index in tensors.items():
        if not isinstance(index, dict):
            raise ArtifactError(f"{where}: tensors['{rel}'] must be an object of name -> [dtype, shape]")
        for name, entry in index.items():
            ok = (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)
                  and isinstance(entry[1], list) and all(_is(d, int) and d >= 0 for d in entry[1]))
            if not ok:
                raise ArtifactError(f"{where}: tensors['{rel}']['{name}'] must be [dtype, [dims...]]")


def read_manifest(path, kind=None) -> dict:
    """Read ``manifest.json`` of an artifact folder and check its schema and identity (no file hashing).

    Args:
        path: the artifact folder.
        kind: expected kind or tuple of kinds; ``None`` accepts any.

    Raises:
        ArtifactError: not an artifact folder, unreadable or malformed manifest, wrong kind, or an
            ``artifact_id`` that does not match the content (the manifest was edited).
    """
    root = Path(path)
    if root.is_symlink() or not root.is_dir():
        raise ArtifactError(f"{root} is not a folder; expected an offsite artifact folder with {MANIFEST}")
    mpath = root / MANIFEST
    if mpath.is_symlink() or not mpath.is_file():
        raise ArtifactError(f"{root} has no {MANIFEST}: it is not an offsite artifact, or it was never completed")
    try:
        manifest = json.loads(mpath.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise ArtifactError(f"{mpath} is not valid UTF-8 JSON ({type(exc).__name__})") from None
    if isinstance(manifest, dict) and manifest.get("schema_version") != SCHEMA_VERSION:
        raise ArtifactError(f"{root} has manifest schema {manifest.get('schema_version')!r}; this offsite "
                            f"({__version__}) reads schema {SCHEMA_VERSION}; rebuild the artifact with this version")
    check_schema(manifest, mpath)
    kinds = (kind,) if isinstance(kind, str) else kind
    if kinds and manifest["kind"] not in kinds:
        raise ArtifactError(f"{root} is a '{manifest['kind']}' artifact; expected {' or '.join(kinds)}")
    if artifact_id(manifest) != manifest.get("artifact_id"):
        raise ArtifactError(f"{mpath}: artifact_id does not match its content (manifest edited)")

    check_embedded(manifest, mpath)
    return manifest
