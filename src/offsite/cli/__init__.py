"""``offsite`` command line: a thin shell over the workflow functions.

Each subcommand lives in its own module exposing ``add_parser(subparsers)`` (which sets
``func`` on its parser) and is listed in ``COMMANDS``. Errors of type :class:`OffsiteError` are
printed as one line and exit with status 2, and so is a full disk (``ENOSPC``); Ctrl-C prints one
line and exits with 130. Anything else is a bug and shows its traceback.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys

COMMANDS = ["families", "emulate", "finetune", "plug", "eval", "report", "demo", "inspect", "verify", "keygen"]


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(prog="offsite", description="Offsite-tuning of large language models.")
    parser.add_argument("--version", action="version", version=f"offsite {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        try:
            module = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith(f"{__name__}.{name}"):
                continue  # command not built yet in this checkout
            raise
        module.add_parser(sub)
    return parser


def main(argv=None) -> int:
    from ..errors import OffsiteError

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
    except OffsiteError as exc:
        print(f"offsite {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Ctrl-C is the user's choice, not a bug: one line, and 128 + SIGINT as shells report it.
        print(f"offsite {args.command}: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise  # any other OS error here is unexpected: keep its traceback
        where = f" writing {exc.filename}" if exc.filename else ""
        print(f"offsite {args.command}: error: no space left on device{where}; free disk space or choose "
              "another output folder (--out), then run the command again", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
