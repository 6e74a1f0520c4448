"""Interrupts, signals and the errors a user can cause, as the ``attnzoo`` command reports them.

* SIGTERM is handled like Ctrl-C: :func:`sigterm_as_interrupt` (installed by the CLI's ``main``)
  makes it raise :class:`Terminated`, a ``KeyboardInterrupt``, so every clean-up that runs on
  Ctrl-C runs on SIGTERM too. :func:`interrupt_status` gives the exit status a shell reports
  for the signal: 130 (SIGINT) or 143 (SIGTERM).
* :func:`deferred_signals` holds SIGINT and SIGTERM back during a few lines that must not be
  split (swapping an output directory into place) and delivers them at the end of the block.
* :func:`add_note` attaches what happened on disk (``"DST left as it was"``, a leftover folder to
  delete) to an exception on its way out; :func:`user_message` is the one line the CLI prints
  for an error a user can cause (bad paths, invalid files, a full disk, no permission), or
  None for anything else (a bug: the CLI lets its traceback through).
"""
from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

from .errors import AttnzooError

__all__ = ["Terminated", "sigterm_as_interrupt", "deferred_signals", "interrupt_signal", "interrupt_status", "signal_name", "add_note",
           "notes_of", "os_error_text", "is_safetensors_error", "user_message"]

_DEFERRED = (signal.SIGINT, signal.SIGTERM)


class Terminated(KeyboardInterrupt):
    """SIGTERM (or another terminating signal) turned into an exception, handled like Ctrl-C."""

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__(signum)
        self.signum = int(signum)

    def __str__(self) -> str:
        return signal_name(self.signum)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def interrupt_signal(exc: BaseException) -> int:
    """The signal behind an interrupt: :class:`Terminated`'s, else SIGINT (a plain ``KeyboardInterrupt``)."""
    return int(getattr(exc, "signum", signal.SIGINT))


def interrupt_status(exc: BaseException) -> int:
    """Exit status for an interrupt: 128 + the signal number (130 for Ctrl-C, 143 for SIGTERM)."""
    return 128 + interrupt_signal(exc)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _raise_terminated(signum, frame):
    raise Terminated(signum)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Inside the block SIGTERM raises :class:`Terminated`; the previous handler is restored after.

    Nothing changes outside the main thread (Python runs signal handlers there only) or when
    SIGTERM is ignored (the process that started us asked for that)."""
    if not _in_main_thread() or signal.getsignal(signal.SIGTERM) is signal.SIG_IGN:
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


@contextlib.contextmanager
def deferred_signals() -> Iterator[list[int]]:
    """Hold SIGINT and SIGTERM back inside the block; deliver them when it ends.

    Yields the list of signals that arrived. At the end the previous handlers are restored and
    each held signal is delivered to its handler as if it arrived then: a Python handler (Ctrl-C's
    ``KeyboardInterrupt``, :class:`Terminated`) raises from the ``with`` statement; a default
    action (SIGTERM outside the CLI) is carried out by re-raising the signal. Only the main
    thread receives Python signals, so elsewhere this does nothing. SIGKILL cannot be held.
    """
    caught: list[int] = []
    if not _in_main_thread():
        yield caught
        return

    def hold(signum, frame):
        caught.append(signum)

    previous = {}
    try:
        for s in _DEFERRED:
            if signal.getsignal(s) is not signal.SIG_IGN:
                previous[s] = signal.signal(s, hold)
        yield caught
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        for s in dict.fromkeys(caught):  # each signal once, in arrival order
            h = previous.get(s)
            if callable(h):
                h(s, None)
            else:
                signal.raise_signal(s)


def add_note(exc: BaseException, text: str) -> None:
    """Attach ``text`` to ``exc`` (``__notes__``: Python >= 3.11 prints them under a traceback too)."""
    if hasattr(exc, "add_note"):
        exc.add_note(text)
    else:  # Python 3.10
        exc.__notes__ = [*getattr(exc, "__notes__", []), text]


def notes_of(exc: BaseException) -> list[str]:
    return [str(n) for n in getattr(exc, "__notes__", None) or []]


def os_error_text(e: OSError) -> str:
    """``FILE: what is wrong`` for an ``OSError`` (``[Errno N]`` left out); its own text without a file."""
    if e.strerror and e.filename is not None:
        where = f"{e.filename} -> {e.filename2}" if e.filename2 is not None else f"{e.filename}"
        return f"{where}: {e.strerror}"
    return e.strerror or str(e) or type(e).__name__


def is_safetensors_error(e: BaseException) -> bool:
    try:
        from safetensors import SafetensorError
    except ImportError:  # safetensors < 0.4.3 did not export it
        return type(e).__name__ == "SafetensorError"
    return isinstance(e, SafetensorError)


def user_message(e: BaseException) -> str | None:
    """The one line the CLI prints for an error a user can cause, with its notes; None for a bug.

    User errors: attnzoo's own errors, ``ValueError``/``TypeError`` (bad option values, invalid
    files, ``json.JSONDecodeError``), every ``OSError`` (missing files, permission denied, disk
    full, read-only file system...) and safetensors' ``SafetensorError``. The code that reads
    or writes a file names it in the message (see :func:`os_error_text`)."""
    if isinstance(e, OSError):
        text = os_error_text(e)
    elif isinstance(e, (AttnzooError, ValueError, TypeError)) or is_safetensors_error(e):
        text = str(e) or type(e).__name__
    else:
        return None
    return "; ".join([" ".join(text.split()), *notes_of(e)])
