"""Behaviour unchanged across a refactor: build 70 emulator packages (14 families x 5 methods, tiny
models, adapter 1+1) and print their artifact ids as JSON, to compare with another checkout's.

An artifact id covers every file of the package and its manifest bar run facts (times), so equal ids
mean bitwise equal packages. Build both checkouts into the SAME folder (the base model's path is part
of the manifest):

    PYTHONPATH=OLD/src python bench/same_packages.py /tmp/pkgs OLD > old.json
    PYTHONPATH=NEW/src python bench/same_packages.py /tmp/pkgs NEW > new.json

ROOT (the second argument) is the checkout whose tests/conftest.py makes the tiny models.
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(sys.argv[2]) / "tests"))
from conftest import SENTENCES, make_model, make_tokenizer  # noqa: E402

try:
    from offsite.workflows.emulate import emulate  # the layered layout (issue 25)
except ImportError:
    from offsite.emulate import emulate  # the flat layout before it

FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "phi", "phi3", "opt", "gpt2", "gpt_neox",
            "falcon", "bloom", "gptj"]
METHODS = {"uniform": dict(emulator_layers=2),
           "crash": dict(seq_len=16, num_sequences=8, batch_size=4, emulator_layers=2, share=True),
           "distill": dict(steps=2, seq_len=16, num_sequences=8, batch_size=4, emulator_layers=2),
           "scaleot": dict(steps=2, seq_len=16, num_sequences=8, batch_size=4, harmonizer_rank=4, alpha=0.5, beta=0.5),
           "gradot": dict(param_budget=0.4, seq_len=16, num_sequences=4, batch_size=2)}


def main() -> int:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    text = out / "calib.txt"
    text.write_text("\n".join(SENTENCES * 30))
    tok = make_tokenizer()
    ids = {}
    for family in FAMILIES:
        path = out / family
        if not path.exists():
            make_model(family, 6, 0).save_pretrained(path)
            tok.save_pretrained(path)
        for method, settings in METHODS.items():
            torch.manual_seed(0)
            package = emulate(str(path), out / f"{family}-{method}", method=method, adapter_layers="1,1",
                              calibration=str(text), overwrite=True, **settings)
            ids[f"{family}/{method}"] = json.loads((Path(package) / "manifest.json").read_text())["artifact_id"]
    print(json.dumps(ids, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
