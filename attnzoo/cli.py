"""The ``attnzoo`` command: one sub-command per module in :mod:`attnzoo.commands`.

Each command module defines ``NAME``, ``HELP``, ``add_arguments(parser)`` and
``run(args) -> int``. Errors a user can fix (bad options, missing files) print one
line on stderr and exit 2; nothing prints a traceback for them.

This module and :mod:`attnzoo.errors` import no torch: :func:`main` (the console script and
``python -m attnzoo``) first calls :func:`setup_process`, whose settings must be in the environment
before torch loads OpenMP.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from .errors import AttnzooError

COMMANDS = ["list", "info", "convert", "eval", "uptrain", "bench", "demo"]


def setup_process() -> None:
    """Process-wide settings of the ``attnzoo`` command (never of ``import attnzoo``); each is a
    default, so a value already in the environment wins. ``OMP_WAIT_POLICY=PASSIVE``: idle OpenMP
    threads sleep instead of spinning, which on a busy machine (more runnable threads than cores)
    made ``attnzoo demo`` several times slower. It only acts if set before torch is imported."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _load(name: str):
    try:
        return importlib.import_module(f"attnzoo.commands.{name}")
    except ModuleNotFoundError as e:
        if e.name == f"attnzoo.commands.{name}":
            return None  # not part of this build
        raise


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="attnzoo", description="Attention model surgery for Hugging Face models.")
    p.add_argument("--version", action="version", version=f"attnzoo {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging (shows backend choices)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        mod = _load(name)
        if mod is None:
            continue
        sp = sub.add_parser(name, help=mod.HELP, description=mod.__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(sp)
        sp.set_defaults(_run=mod.run)
    return p


def main(argv: list[str] | None = None) -> int:
    setup_process()  # first: before anything imports torch
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except (AttnzooError, ValueError, TypeError, FileNotFoundError, FileExistsError) as e:
        if args.verbose:
            raise
        print(f"attnzoo {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"attnzoo {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
