"""Output directories written safely: into a temporary directory beside them, swapped in at the end.

:func:`staged_dir` is what ``attnzoo convert`` (DST) and ``attnzoo uptrain`` (OUT) write through.

* The temporary directory ``.NAME.attnzoo-tmp-XXXXXXXX`` is made beside NAME with the mode a
  plain ``mkdir`` gives (0777 less the umask, not ``mkdtemp``'s 0700), and before the swap every
  file in it gets the mode a new file gets (0666 less the umask, execute bits kept as the umask
  allows; safetensors writes its files 0600): the output can be read by whoever could read
  anything else the user makes.
* When the body succeeds, an existing NAME is renamed to ``.NAME.attnzoo-old-XXXXXXXX`` and the
  temporary directory to NAME, with SIGINT and SIGTERM held back between the two renames: NAME
  is always either the old directory or the new one, complete. From then on the output is
  written, whatever happens: an interrupt that arrives later (or was held back) does not fail
  it, the old copy is removed, and if that removal is interrupted or fails, the folder left is
  named in a note instead.
* When the body fails (an error, Ctrl-C, SIGTERM), the temporary directory is removed and NAME
  is as it was. Notes on the exception say so, or name what is left when the removal itself
  was interrupted (see :func:`attnzoo.faults.user_message`).
"""
from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

from .faults import add_note, deferred_signals, interrupt_signal, signal_name

__all__ = ["staged_dir", "make_dir", "remove_tree"]

log = logging.getLogger(__name__)


def _unused(parent: Path, prefix: str) -> Path:
    while True:
        p = parent / f"{prefix}{secrets.token_hex(4)}"
        if not os.path.lexists(p):
            return p


def make_dir(parent: Path, prefix: str) -> Path:
    """A new, empty directory ``parent/prefix********`` with the mode ``mkdir`` gives (the umask applies)."""
    parent = Path(parent)
    while True:
        p = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            os.mkdir(p, 0o777)
            return p
        except FileExistsError:
            continue
        except OSError as e:  # no permission, read-only file system, full disk: the parent is the culprit
            e.filename = str(parent)
            raise


def _default_modes(tmp: Path) -> None:
    """Give the files and folders under ``tmp`` the modes new ones get: ``tmp``'s own mode was set by
    ``mkdir(0o777)`` through the umask, so it tells the umask without changing it (which is racy)."""
    dir_mode = stat.S_IMODE(os.stat(tmp).st_mode) & 0o777
    for root, dirs, files in os.walk(tmp):
        for name in dirs + files:
            p = os.path.join(root, name)
            st = os.lstat(p)
            if stat.S_ISDIR(st.st_mode):
                os.chmod(p, (stat.S_IMODE(st.st_mode) & ~0o777) | dir_mode)  # setgid etc. kept
            elif stat.S_ISREG(st.st_mode):
                os.chmod(p, (dir_mode & 0o666) | (st.st_mode & 0o111 & dir_mode))


def remove_tree(path: Path) -> tuple[bool, KeyboardInterrupt | None]:
    """Remove the directory tree ``path``; returns ``(gone, the interrupt that stopped the removal or None)``.

    A Ctrl-C or SIGTERM during the removal stops it and is returned, not raised: the caller
    reports what is left."""
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        pass
    except KeyboardInterrupt as e:
        return not os.path.lexists(path), e
    except OSError:
        return not os.path.lexists(path), None
    return True, None


def _swap(tmp: Path, dst: Path) -> Path | None:
    """Rename ``dst`` (if any) aside and ``tmp`` to ``dst``; returns where the old ``dst`` went."""
    old = None
    if os.path.lexists(dst):
        old = _unused(dst.parent, f".{dst.name}.attnzoo-old-")
        dst.rename(old)
    try:
        tmp.rename(dst)
    except BaseException:
        if old is not None:
            old.rename(dst)  # put the previous one back
        raise
    return old


def _interrupt_name(e: BaseException) -> str:
    return signal_name(interrupt_signal(e))


@contextlib.contextmanager
def staged_dir(dst: str | os.PathLike, label: str = "DST", notes: list[str] | None = None,
               before_commit: Callable[[], None] | None = None) -> Iterator[Path]:
    """Yield a new temporary directory beside ``dst``; when the block succeeds it becomes ``dst``.

    ``label`` names the output in messages (``"DST"``, ``"--out"``). ``notes`` receives what
    happened after the output was in place (a late interrupt, an old copy that could not be
    removed); without a list they are logged as warnings. ``before_commit`` runs last, before
    the swap (a final check that nothing appeared meanwhile). See the module docstring.
    """
    dst = Path(dst)
    existed = os.path.lexists(dst)
    try:
        tmp = make_dir(dst.parent, f".{dst.name}.attnzoo-tmp-")
    except BaseException as e:
        add_note(e, f"{label} {dst} " + ("left as it was" if existed else "not written"))
        raise
    committed, old, late = False, None, None
    try:
        yield tmp
        _default_modes(tmp)
        if before_commit is not None:
            before_commit()
        with deferred_signals():
            old = _swap(tmp, dst)
            committed = True
    except BaseException as e:
        if not committed or not isinstance(e, KeyboardInterrupt):
            if not committed:
                _discard(tmp, e, label, dst, existed)
            raise
        late = e  # held back during the swap and delivered after it
    said = []
    if late is not None:
        said.append(f"{_interrupt_name(late)} arrived after {label} {dst} was in place: it is complete")
    if old is not None:
        try:
            gone, stopped = remove_tree(old)
        except KeyboardInterrupt as e:  # landed just outside the removal
            gone, stopped = not os.path.lexists(old), e
        if not gone:
            how = f"removal stopped by {_interrupt_name(stopped)}" if stopped else "could not be removed"
            said.append(f"the previous {label} is left in {old} ({how}): delete it")
        elif stopped is not None:
            said.append(f"{_interrupt_name(stopped)} arrived after {label} {dst} was in place: it is complete")
    if notes is None:
        for s in said:
            log.warning(s)
    else:
        notes.extend(said)


def _discard(tmp: Path, e: BaseException, label: str, dst: Path, existed: bool) -> None:
    """After a failure: remove ``tmp`` and say on ``e`` what the disk looks like."""
    if isinstance(e, OSError) and e.filename is None and e.strerror:
        e.filename = str(dst)  # a write that failed without naming its file (a full disk): name the output
    gone, stopped = remove_tree(tmp)
    state = f"{label} {dst} " + ("left as it was" if existed else "not written")
    if gone:
        add_note(e, state)
    else:
        how = f"removal stopped by {_interrupt_name(stopped)}" if stopped else "could not be removed"
        add_note(e, f"{state}; its partial copy is left in {tmp} ({how}): delete it")
