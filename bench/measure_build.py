"""Build one emulator and print its cost as JSON: wall-clock seconds, peak memory, parameter counts.

Usage: python bench/measure_build.py MODEL METHOD OUT [--calibration FILE] [--set KEY=VALUE ...]

Run once per method in a fresh process, so the peak resident memory (``ru_maxrss``) is this
build's alone (it includes loading the base model, which every method pays).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    from offsite.cli.common import parse_settings
    from offsite.workflows.emulate import emulate

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("method")
    p.add_argument("out")
    p.add_argument("--calibration", default=None)
    p.add_argument("--set", dest="settings", nargs="*", default=[], metavar="KEY=VALUE")
    p.add_argument("--stream", dest="stream", action="store_const", const=True, default=None,
                   help="emulate --stream (layers read from disk one at a time; emulate's default where it applies)")
    p.add_argument("--no-stream", dest="stream", action="store_const", const=False,
                   help="emulate --no-stream (the whole model loaded)")
    p.add_argument("--max-shard-size", default=None, help="emulate --max-shard-size (default: emulate's)")
    p.add_argument("--adapter-layers", default="2,2", help="emulate --adapter-layers")
    p.add_argument("--spill-above", default=None, help="emulate --spill-above, with --stream (default: emulate's)")
    args = p.parse_args(argv)
    started = time.time()
    out = emulate(args.model, args.out, method=args.method, calibration=args.calibration, overwrite=True,
                  adapter_layers=args.adapter_layers,
                  stream=args.stream, **parse_settings(args.settings),
                  **{k: v for k, v in (("max_shard_size", args.max_shard_size), ("spill_above", args.spill_above))
                     if v is not None})
    seconds = time.time() - started
    manifest = json.loads((Path(out) / "manifest.json").read_text())
    record = {"method": args.method + ("+stream" if args.stream else ""), "settings": parse_settings(args.settings), "seconds": round(seconds, 1),
              "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
              "parameters": manifest["parameters"]}
    try:
        import torch

        if torch.cuda.is_available():
            record["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    except ImportError:  # pragma: no cover
        pass
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
