"""Faults the CLI promises to handle (issue 16).

* Ctrl-C and SIGTERM at any point of a ``convert --force`` of a sharded checkpoint leave either the
  old DST or the new one, complete, never both or neither, no hidden ``.attnzoo-tmp-*`` /
  ``.attnzoo-old-*`` folders (or, when their removal itself was interrupted, the folder is named),
  and the message and exit status say which outcome happened. Same for ``uptrain``'s OUT.partial.
* A full disk, bad paths and invalid files are one line on stderr naming the file, exit 2.
* Output directories get the user's normal permissions (the umask), not mkdtemp's 0700.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from hf_tiny import TINY
from tinylm import save_init

from attnzoo.cli import main

SIGNALS = [pytest.param(signal.SIGINT, 130, id="SIGINT"), pytest.param(signal.SIGTERM, 143, id="SIGTERM")]


@pytest.fixture(autouse=True)
def _sigint_raises_keyboardinterrupt():
    """A process started with SIGINT ignored (a background job of a shell without job control, as a CI runner
    may start the suite) never gets Python's KeyboardInterrupt handler; these tests deliver SIGINT in-process,
    so each runs with Python's default handler and gives back what it found."""
    before = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)
TO_MQA = ["--to", "mqa", "--no-progress"]
UPTRAIN = ["--tokens", "64", "--batch-size", "2", "--seq-len", "32", "--no-progress", "--cpu"]


def _hashes(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*"))
            if p.is_file()}


def _hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".attnzoo-" in p.name)


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    """A llama checkpoint in 11 shards, its --to mqa conversion ("new") and a --to gqa one ("old")."""
    root = tmp_path_factory.mktemp("faults")
    src = root / "src"
    model, _ = TINY["llama"].make()
    model.save_pretrained(src, max_shard_size="30KB")
    assert len(list(src.glob("model-*.safetensors"))) >= 6
    new, old = root / "new" / "dst", root / "old" / "dst"  # named as in the tests: the model card names DST
    new.parent.mkdir()
    old.parent.mkdir()
    assert main(["convert", str(src), str(new), *TO_MQA]) == 0
    assert main(["convert", str(src), str(old), "--to", "gqa", "--groups", "2", "--no-progress"]) == 0
    from transformers import LlamaForCausalLM

    assert LlamaForCausalLM.from_pretrained(new).config.num_key_value_heads == 1  # loadable
    return SimpleNamespace(src=src, new=new, old=old, new_hashes=_hashes(new), old_hashes=_hashes(old),
                           shards=len(list(new.glob("model-*.safetensors"))))


def _outcome(ck, dst: Path) -> str:
    """'old' or 'new' when DST is exactly one of them, complete; fails otherwise."""
    got = _hashes(dst)
    if got == ck.old_hashes:
        return "old"
    assert got == ck.new_hashes, f"DST is neither the old nor the new checkpoint: {sorted(got)}"
    return "new"


# ---------------------------------------------------------------------------------------- signal points
def _stop(sig):
    """Deliver ``sig`` to this process now; its handler raises (KeyboardInterrupt / Terminated)."""
    signal.raise_signal(sig)
    time.sleep(5)  # the handler raises before this ends (unless the signal is held back)


def _at_shard(monkeypatch, n, sig):
    from attnzoo.conversion import streaming

    class Hooked(streaming.ShardWriter):
        made = 0

        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            Hooked.made += 1
            if Hooked.made == n:
                self.close(check=False)
                _stop(sig)

    monkeypatch.setattr(streaming, "ShardWriter", Hooked)


def _before_swap(monkeypatch, sig):
    from attnzoo.conversion import output

    real, calls = output.check_destination, []

    def check(*a, **k):
        calls.append(1)
        real(*a, **k)
        if len(calls) == 2:  # the last check, after every file is written
            _stop(sig)

    monkeypatch.setattr(output, "check_destination", check)


def _between_renames(monkeypatch, sig):
    real = Path.rename

    def rename(self, target):
        out = real(self, target)
        if ".attnzoo-old-" in str(target):  # DST is aside, the new one not yet in place
            signal.raise_signal(sig)  # held back: no sleep, the swap must go on
        return out

    monkeypatch.setattr(Path, "rename", rename)


def _in_rmtree(monkeypatch, sig, part):
    real = shutil.rmtree

    def rmtree(path, *a, **k):
        if part in Path(path).name:
            next(Path(path).glob("model-*.safetensors")).unlink()  # some of it is gone already
            _stop(sig)
        return real(path, *a, **k)

    monkeypatch.setattr(shutil, "rmtree", rmtree)


POINTS = ["shard 1", "shard 4", "last shard", "before the swap", "between the renames", "removing the old copy",
          "removing the partial copy", "shard 4, no DST before"]


@pytest.mark.parametrize("sig, status", SIGNALS)
@pytest.mark.parametrize("point", POINTS)
def test_interrupt_leaves_old_or_new_dst_complete_and_says_which(ck, point, sig, status, tmp_path, monkeypatch,
                                                                 capsys):
    dst = tmp_path / "dst"
    force = point != "shard 4, no DST before"
    if force:
        shutil.copytree(ck.old, dst)
    name = signal.Signals(sig).name
    if point.startswith("shard"):
        _at_shard(monkeypatch, 4 if "4" in point else int(point.split()[1]), sig)
    elif point == "last shard":
        _at_shard(monkeypatch, ck.shards, sig)
    elif point == "before the swap":
        _before_swap(monkeypatch, sig)
    elif point == "between the renames":
        _between_renames(monkeypatch, sig)
    elif point == "removing the old copy":
        _in_rmtree(monkeypatch, sig, ".attnzoo-old-")
    elif point == "removing the partial copy":  # a second interrupt while cleaning up after the first
        _at_shard(monkeypatch, 4, sig)
        _in_rmtree(monkeypatch, sig, ".attnzoo-tmp-")
    rc = main(["convert", str(ck.src), str(dst), *TO_MQA, *(["--force"] if force else [])])
    out, err = capsys.readouterr()
    monkeypatch.undo()
    where = str(dst.resolve())
    if point in ("between the renames", "removing the old copy"):  # DST was in place: the conversion stands
        assert rc == 0 and err == "", err
        assert _outcome(ck, dst) == "new"
        if point == "between the renames":
            assert f"{name} arrived after DST {where} was in place: it is complete" in out
            assert _hidden(tmp_path) == []
        else:
            left = _hidden(tmp_path)
            assert len(left) == 1 and ".attnzoo-old-" in left[0]
            assert f"the previous DST is left in {tmp_path.resolve() / left[0]} (removal stopped by {name}): " \
                   "delete it" in out
        return
    line = _one_line(err)
    assert rc == status
    if not force:
        assert line == f"attnzoo convert: interrupted ({name}); DST {where} not written"
        assert not dst.exists() and _hidden(tmp_path) == []
        return
    assert _outcome(ck, dst) == "old"
    if point == "removing the partial copy":
        left = _hidden(tmp_path)
        assert len(left) == 1 and ".attnzoo-tmp-" in left[0]
        assert line == (f"attnzoo convert: interrupted ({name}); DST {where} left as it was; its partial copy is left "
                        f"in {tmp_path.resolve() / left[0]} (removal stopped by {name}): delete it")
    else:
        assert line == f"attnzoo convert: interrupted ({name}); DST {where} left as it was"
        assert _hidden(tmp_path) == []


_HOOK = r"""
import pathlib, runpy, shutil, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored
marker, point = pathlib.Path(sys.argv.pop(1)), sys.argv.pop(1)

def wait():
    marker.write_text("ready")
    time.sleep(300)

if point == "shard":
    import attnzoo.conversion.streaming as st

    class Slow(st.ShardWriter):
        made = 0

        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            Slow.made += 1
            if Slow.made == 3:
                wait()

    st.ShardWriter = Slow
else:
    real = shutil.rmtree

    def rmtree(path, *a, **k):
        if ".attnzoo-old-" in str(path):
            wait()
        return real(path, *a, **k)

    shutil.rmtree = rmtree
runpy.run_module("attnzoo", run_name="__main__", alter_sys=True)  # python -m attnzoo ...
"""


@pytest.mark.parametrize("sig, status, point", [
    pytest.param(signal.SIGTERM, 143, "shard", id="SIGTERM while writing shard 3"),
    pytest.param(signal.SIGTERM, 0, "removing the old copy", id="SIGTERM while removing the old DST"),
])
def test_real_signal_to_python_m_attnzoo_convert(ck, sig, status, point, tmp_path):
    dst, marker = tmp_path / "dst", tmp_path / "ready"
    shutil.copytree(ck.old, dst)
    cmd = [sys.executable, "-c", _HOOK, str(marker), point, "convert", str(ck.src), str(dst), *TO_MQA, "--force"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).parents[1])
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == status, err
    name, where = signal.Signals(sig).name, dst.resolve()
    if point == "shard":
        assert _one_line(err) == f"attnzoo convert: interrupted ({name}); DST {where} left as it was"
        assert _outcome(ck, dst) == "old" and _hidden(tmp_path) == []
    else:
        assert _outcome(ck, dst) == "new" and "Traceback" not in err
        left = _hidden(tmp_path)
        assert len(left) == 1 and _hashes(tmp_path / left[0]) == ck.old_hashes  # named, not lost
        assert f"the previous DST is left in {tmp_path.resolve() / left[0]} (removal stopped by {name})" in out


# ---------------------------------------------------------------------------------------- a full disk
def _disk_full_after(monkeypatch, budget: int):
    """The shard writer's writes fail with ENOSPC (naming no file, as os.write does) after ``budget`` bytes."""
    from attnzoo.conversion import safetensors_io as io

    left = [budget]

    def take(n):
        if left[0] < n:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        left[0] -= n

    real_write, real_copy = io._write_all, io.copy_range

    def write_all(fd, view):
        take(len(view))
        real_write(fd, view)

    def copy_range(src_fd, dst_fd, offset, count, progress=None, chunk=1 << 30):
        take(count)
        real_copy(src_fd, dst_fd, offset, count, progress, chunk)

    monkeypatch.setattr(io, "_write_all", write_all)
    monkeypatch.setattr(io, "copy_range", copy_range)


@pytest.mark.parametrize("force", [False, True])
def test_disk_full_in_convert_is_one_line_and_leaves_nothing(ck, force, tmp_path, monkeypatch, capsys):
    dst = tmp_path / "dst"
    if force:
        shutil.copytree(ck.old, dst)
    _disk_full_after(monkeypatch, 60_000)
    rc = main(["convert", str(ck.src), str(dst), *TO_MQA, *(["--force"] if force else [])])
    line = _one_line(capsys.readouterr().err)
    assert rc == 2 and line.startswith("attnzoo convert: error: ") and ": No space left on device; " in line
    assert ".safetensors: No space left on device" in line  # names the file it was writing
    assert _hidden(tmp_path) == []
    if force:
        assert line.endswith(f"DST {dst.resolve()} left as it was") and _outcome(ck, dst) == "old"
    else:
        assert line.endswith(f"DST {dst.resolve()} not written") and not dst.exists()


@pytest.fixture(scope="module")
def init(tmp_path_factory):
    return save_init(tmp_path_factory.mktemp("uptrain") / "init")


def _enospc(*a, **k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("checkpoints", [False, True])
def test_disk_full_in_uptrain_is_one_line_and_leaves_nothing(init, checkpoints, tmp_path, monkeypatch, capsys):
    import transformers.modeling_utils

    out = tmp_path / "o"
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", _enospc)  # the final save only
    extra = ["--tokens", "128", "--checkpoint-every", "1"] if checkpoints else []
    rc = main(["uptrain", "--model", str(init), "--out", str(out), *UPTRAIN, *extra])
    line = _one_line(capsys.readouterr().err)
    assert rc == 2 and line.startswith(f"attnzoo uptrain: error: {out}: No space left on device; --out {out} "
                                       "not written")
    assert not out.exists() and _hidden(tmp_path) == []
    partial = tmp_path / "o.partial"
    if checkpoints:  # kept to resume from, and said so
        assert partial.is_dir() and "checkpoints kept in" in line and "--resume" in line
        assert not list(partial.glob("checkpoints/*.tmp"))
    else:
        assert not partial.exists()


@pytest.mark.parametrize("sig, status", SIGNALS)
@pytest.mark.parametrize("checkpoints", [False, True])
def test_interrupted_uptrain_keeps_partial_only_to_resume(init, checkpoints, sig, status, tmp_path, monkeypatch,
                                                          capsys):
    from attnzoo.uptrain.step import TrainModule

    real, calls = TrainModule.forward, []

    def forward(self, *a, **k):  # one call per micro-batch: the signal comes during the third
        calls.append(1)
        if len(calls) == 3:
            _stop(sig)
        return real(self, *a, **k)

    monkeypatch.setattr(TrainModule, "forward", forward)
    out = tmp_path / "o"
    extra = ["--checkpoint-every", "1"] if checkpoints else []
    rc = main(["uptrain", "--model", str(init), "--out", str(out), *UPTRAIN, "--tokens", "256", *extra])
    line = _one_line(capsys.readouterr().err)
    assert rc == status and line.startswith(f"attnzoo uptrain: interrupted ({signal.Signals(sig).name})")
    assert not out.exists() and _hidden(tmp_path) == []
    partial = tmp_path / "o.partial"
    if checkpoints:
        assert line.endswith(f"checkpoints kept in {partial} (newest: step_000002): continue with --resume, or "
                             "start over with --force")
    else:
        assert not partial.exists() and line == f"attnzoo uptrain: interrupted ({signal.Signals(sig).name})"


def test_unreadable_checkpoint_on_resume_is_one_line(init, tmp_path, capsys):
    out = tmp_path / "o"
    argv = ["uptrain", "--model", str(init), "--out", str(out), *UPTRAIN, "--tokens", "128", "--checkpoint-every", "1"]
    assert main([*argv, "--stop-after", "1"]) == 0
    ckpt = tmp_path / "o.partial" / "checkpoints" / "step_000001"
    opt = ckpt / "optimizer.safetensors"
    opt.write_bytes(opt.read_bytes()[:-64])
    capsys.readouterr()
    assert main([*argv, "--resume"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith(f"attnzoo uptrain: error: --resume: the checkpoint '{ckpt}' cannot be read "
                           "(SafetensorError: "), line
    assert line.endswith(f"checkpoints kept in {tmp_path / 'o.partial'} (newest: step_000001): continue with "
                         "--resume, or start over with --force")


# ---------------------------------------------------------------------------------------- one-line errors
@pytest.fixture(scope="module")
def bad(ck, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    (root / "a_file").write_text("not a directory")
    for name, text in [("not_json", "{bad json"), ("not_a_config", '{"foo": 1}'), ("a_list", "[1, 2]")]:
        (root / name).mkdir()
        (root / name / "config.json").write_text(text)
    shutil.copytree(ck.src, root / "bad_field")
    cfg = json.loads((root / "bad_field" / "config.json").read_text())
    cfg["hidden_size"] = "wide"
    (root / "bad_field" / "config.json").write_text(json.dumps(cfg))
    shutil.copytree(ck.src, root / "truncated")
    last = sorted((root / "truncated").glob("model-*.safetensors"))[-1]
    last.write_bytes(last.read_bytes()[:-100])
    return root


CASES = {  # name: (what the message must contain, a regular expression; commands it applies to)
    "a_file": ("a_file'?: is a file, not a", ("convert", "info", "eval", "uptrain")),
    "missing": ("missing'?: no such", ("convert", "info", "eval", "uptrain")),
    "not_json": ("not_json/config.json: not valid JSON", ("convert", "info", "eval", "uptrain")),
    "not_a_config": (r"not_a_config/config.json: not a Hugging Face model config \(no 'model_type' key\)",
                     ("convert", "info", "eval", "uptrain")),
    "a_list": (r"a_list/config.json: not a model config \(expected a JSON object, found a list\)",
               ("convert", "info", "eval", "uptrain")),
    "bad_field": ("bad_field/config.json: transformers cannot read this config", ("convert", "info", "eval", "uptrain")),
    "truncated": ("-of-00011.safetensors: truncated", ("convert", "eval", "uptrain")),
}


def _argv(command: str, model: Path, out: Path) -> list[str]:
    return {"convert": ["convert", str(model), str(out), *TO_MQA], "info": ["info", str(model)],
            "eval": ["eval", "--model", str(model), "--num-seqs", "1", "--decode-tokens", "0"],
            "uptrain": ["uptrain", "--model", str(model), "--out", str(out), *UPTRAIN]}[command]


@pytest.mark.parametrize("case, command", [(c, cmd) for c, (_, cmds) in CASES.items() for cmd in cmds])
def test_user_errors_are_one_line_naming_the_file(bad, case, command, tmp_path, capsys):
    rc = main(_argv(command, bad / case, tmp_path / "o"))
    line = _one_line(capsys.readouterr().err)
    assert rc == 2 and line.startswith(f"attnzoo {command}: error: "), line
    assert re.search(CASES[case][0], line), line
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.parametrize("flag_first", [True, False])
def test_debug_shows_the_traceback_then_the_line(bad, flag_first, capsys):
    argv = ["info", str(bad / "not_json")]
    rc = main(["--debug", *argv] if flag_first else [*argv, "--debug"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback (most recent call last)" in err
    assert err.splitlines()[-1].startswith("attnzoo info: error: ") and "not valid JSON" in err.splitlines()[-1]
    assert main(["-v", *argv]) == 2  # -v is logging only
    assert "Traceback" not in capsys.readouterr().err


def _deny_writes(monkeypatch, parent: Path) -> None:
    parent.chmod(0o555)
    if os.geteuid() == 0:  # root writes anyway: make the access check see what a user would
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: False if Path(p).resolve() == parent.resolve()
                            and mode & os.W_OK else real(p, mode, *a, **k))


@pytest.mark.parametrize("command", ["convert", "uptrain", "eval"])
def test_permission_denied_on_the_output_parent(ck, init, command, tmp_path, monkeypatch, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    _deny_writes(monkeypatch, locked)
    try:
        if command == "eval":
            argv = _argv("eval", init, locked) + ["--json", str(locked / "m.json")]
        else:
            argv = _argv(command, ck.src if command == "convert" else init, locked / "o")
        rc = main(argv)
        line = _one_line(capsys.readouterr().err)
        assert rc == 2 and line.startswith(f"attnzoo {command}: error: ") and "locked" in line
        assert "not writable (permission denied)" in line, line
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)


def test_permission_denied_while_writing_names_the_directory(ck, tmp_path, monkeypatch, capsys):
    real = os.mkdir

    def mkdir(path, *a, **k):  # the directory became unwritable after the checks
        if ".attnzoo-tmp-" in str(path):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real(path, *a, **k)

    monkeypatch.setattr(os, "mkdir", mkdir)
    dst = tmp_path / "dst"
    assert main(["convert", str(ck.src), str(dst), *TO_MQA]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line == f"attnzoo convert: error: {tmp_path.resolve()}: Permission denied; DST {dst.resolve()} not written"


# ---------------------------------------------------------------------------------------- permissions
@pytest.mark.parametrize("umask, dir_mode", [pytest.param(0o022, 0o755, id="umask 022"),
                                             pytest.param(0o027, 0o750, id="umask 027")])
def test_output_mode_follows_the_umask(ck, init, umask, dir_mode, tmp_path):
    old = os.umask(umask)
    try:
        assert main(["convert", str(ck.src), str(tmp_path / "c"), *TO_MQA]) == 0
        assert main(["convert", str(ck.src), str(tmp_path / "c"), *TO_MQA, "--force"]) == 0
        assert main(["uptrain", "--model", str(init), "--out", str(tmp_path / "u"), *UPTRAIN]) == 0
    finally:
        os.umask(old)
    for out in (tmp_path / "c", tmp_path / "u"):
        assert stat.S_IMODE(out.stat().st_mode) == dir_mode, out
        for f in out.iterdir():  # safetensors writes 0600: the output gets the user's normal mode
            assert stat.S_IMODE(f.stat().st_mode) == dir_mode & 0o666, f
    assert _hidden(tmp_path) == []


# ---------------------------------------------------------------------------------------- the pieces
def test_deferred_signals_hold_then_deliver():
    from attnzoo.faults import deferred_signals

    before = signal.getsignal(signal.SIGINT)
    done = []
    with pytest.raises(KeyboardInterrupt):
        with deferred_signals() as caught:
            signal.raise_signal(signal.SIGINT)
            time.sleep(0.01)
            done.append(1)  # not interrupted inside the block
            assert caught == [signal.SIGINT]
    assert done == [1] and signal.getsignal(signal.SIGINT) is before


def test_sigterm_as_interrupt_restores_the_previous_handler():
    from attnzoo.faults import Terminated, interrupt_status, sigterm_as_interrupt

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated) as info:
        with sigterm_as_interrupt():
            signal.raise_signal(signal.SIGTERM)
            time.sleep(5)
    assert isinstance(info.value, KeyboardInterrupt) and interrupt_status(info.value) == 143
    assert signal.getsignal(signal.SIGTERM) is before
