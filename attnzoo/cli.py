"""The ``attnzoo`` command: one sub-command per module in :mod:`attnzoo.commands`.

Each command module defines ``NAME``, ``HELP``, ``add_arguments(parser)`` and
``run(args) -> int``. Errors a user can fix (bad options, missing or invalid files, a full
disk, no permission) print one line on stderr and exit 2; nothing prints a traceback for them
unless ``--debug`` is given. Ctrl-C and SIGTERM are handled alike (see :mod:`attnzoo.faults`):
one line saying what was left on disk, exit 130 (SIGINT) or 143 (SIGTERM).

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

from . import faults

COMMANDS = ["list", "info", "convert", "eval", "uptrain", "bench", "demo", "data"]


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
    p.add_argument("--debug", action="store_true", help="print the traceback of an error or interrupt before its "
                   "one-line message (implies --verbose)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        mod = _load(name)
        if mod is None:
            continue
        sp = sub.add_parser(name, help=mod.HELP, description=mod.__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(sp)
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="print the traceback of an error or interrupt before its one-line message")
        sp.set_defaults(_run=mod.run)
    return p


def main(argv: list[str] | None = None) -> int:
    setup_process()  # first: before anything imports torch
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose or args.debug else logging.WARNING,
                        format="%(name)s: %(message)s")
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    with faults.sigterm_as_interrupt():
        try:
            return int(args._run(args) or 0)
        except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (faults.Terminated)
            return _report(args, e, f"interrupted ({faults.signal_name(faults.interrupt_signal(e))})",
                           faults.interrupt_status(e))
        except Exception as e:
            message = faults.user_message(e)
            if message is None:
                raise  # a bug: its traceback is the useful report
            return _report(args, e, "error: " + message, 2)


def _report(args, e: BaseException, message: str, status: int) -> int:
    """Print the one line for ``e`` (its traceback first with --debug); return the exit status."""
    if args.debug:
        import traceback

        traceback.print_exception(type(e), e, e.__traceback__)
    if isinstance(e, KeyboardInterrupt):
        message = "; ".join([message, *faults.notes_of(e)])
    print(f"attnzoo {args.command}: {message}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
