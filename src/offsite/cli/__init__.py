"""``offsite`` command line: a thin shell over the workflow functions.

Each subcommand lives in its own module exposing ``add_parser(subparsers)`` (which sets
``func`` on its parser) and is listed in ``COMMANDS``. Errors of type :class:`OffsiteError` are
printed as one line and exit with status 2, and so is a full disk (``ENOSPC``); Ctrl-C prints one
line and exits with 130. Anything else is a bug and shows its traceback.

After a successful command one line goes to stderr: ``offsite <cmd>: done in 12.3 s, peak RSS
1.23 GB`` (plus ``, CUDA peak 4.56 GB`` when CUDA was used); see :func:`offsite.core.progress.cost_line`.
``--quiet``, before or after the subcommand, switches progress bars and phase lines off for the
command (not the cost line, nor errors); ``OFFSITE_QUIET=1`` does the same.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import os
import sys
import time

QUIET_HELP = "no progress bars or phase timings on stderr (the final cost line and errors stay)"
COMMANDS = ["families", "emulate", "finetune", "federate", "plug", "eval", "report", "audit", "frontier", "demo", "inspect", "verify", "keygen", "models"]


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(prog="offsite", description="Offsite-tuning of large language models.")
    parser.add_argument("--version", action="version", version=f"offsite {__version__}")
    # Its own dest: a subcommand's --quiet default (demo has one) would overwrite a shared one.
    parser.add_argument("--quiet", dest="quiet_all", action="store_true", help=QUIET_HELP)
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
    for command in sub.choices.values():
        if "--quiet" not in command._option_string_actions:  # demo defines its own, with the same meaning
            # SUPPRESS: no default, so the top-level --quiet is not overwritten when this one is absent.
            command.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help=QUIET_HELP)
    return parser


def main(argv=None) -> int:
    from ..core.errors import OffsiteError
    from ..core.progress import cost_line, quieted

    started = time.perf_counter()  # before parsing: building the parser imports torch
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    args.quiet = args.quiet_all or getattr(args, "quiet", False)  # demo reads args.quiet for its own messages
    try:
        with quieted(args.quiet) if args.quiet else contextlib.nullcontext():
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
    code = int(result or 0)
    if code == 0:
        print(cost_line(args.command, time.perf_counter() - started), file=sys.stderr)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
