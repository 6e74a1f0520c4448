"""``attnzoo bench``: time attnzoo's variants beside their peers, one harness for every family.

A *group* is one module under :mod:`attnzoo.bench` (``dense``, ``sparse``, ...) listed in :data:`GROUPS`; adding a
family is that module plus one line here. A group module defines

* ``TITLE`` (one line for ``--help``), ``SECTIONS`` (``{name: description}``: the parts ``--sections`` can pick),
  ``PEERS`` (the ``peers_bench.py`` groups measured beside it) and optionally ``EXTRA_COLUMNS`` (row extras shown
  in its markdown tables);
* ``run(options: measure.Options) -> list[record.Row]``: builds :class:`~attnzoo.bench.measure.Case` objects and
  times them with :func:`~attnzoo.bench.measure.measure` (clocks, memory, device time, errors are done there);
* optionally ``summary(rows, peers, out_dir, stem) -> list[str]``: markdown lines after its tables (ratios,
  targets, charts written into ``out_dir``).

:func:`run` runs the peers (``--peers PATH``, once, for all groups) and then each group, and writes
``<group>-<tag>.json`` and ``<group>-<tag>.md`` (device, commit, date, rows, peers, summary) per group.
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType

from .measure import Options
from .record import Row, device_tag, environment, print_rows, read_group, write_group

__all__ = ["GROUPS", "load_group", "run", "report", "Options", "Row"]

#: Group name -> the module under attnzoo.bench that measures it.
GROUPS: dict[str, str] = {
    "dense": "dense",
    "sparse": "sparse",
    "mla": "mla",
    "arrcoc": "arrcoc",
    "context_parallel": "context_parallel",
    "reformer": "reformer",
    "linear": "linear",
}


def load_group(name: str) -> ModuleType:
    """The module of group ``name``; unknown names raise ``ValueError`` naming the valid ones."""
    from ..errors import check_choice

    check_choice("--variants", name, GROUPS)
    return importlib.import_module(f"{__name__}.{GROUPS[name]}")


def _check_sections(groups: dict[str, ModuleType], sections: set[str] | None) -> None:
    if sections is None:
        return
    valid = [s for mod in groups.values() for s in mod.SECTIONS]
    from ..errors import check_choice

    for s in sorted(sections):
        check_choice("--sections", s, valid)


def _group_files(name: str, mod: ModuleType, env: dict, rows: list[Row], peers: list[Row], out_dir: str, stem: str,
                 options: dict) -> tuple[str, str]:
    mine = [p for p in peers if p.group.split(":", 1)[-1] in getattr(mod, "PEERS", ())]
    lines = mod.summary(rows, mine, out_dir, stem) if hasattr(mod, "summary") else []
    return write_group(out_dir, stem, name, env, rows, mine, summary=lines,
                       extra_columns=tuple(getattr(mod, "EXTRA_COLUMNS", ())), title=mod.TITLE, options=options)


def _merge(path: str, name: str, mod: ModuleType, env: dict, rows: list[Row], peers: list[Row],
           sections: set[str] | None) -> tuple[dict, list[Row], list[Row]]:
    """``rows`` plus the rows of the sections not run now from an earlier ``path`` of the same group (and its
    peers when none ran now); the environment says which sections came from which commit and date."""
    if not os.path.isfile(path):
        return env, rows, peers
    old_name, old_env, old_rows, old_peers, _ = read_group(path)
    if old_name != name:
        raise ValueError(f"--merge: {path} holds group {old_name!r}, not {name!r}")
    ran = {r.group for r in rows} | (set(mod.SECTIONS) & sections if sections is not None else set(mod.SECTIONS))
    kept = [r for r in old_rows if r.group not in ran]
    if not kept:
        return env, rows, peers or old_peers
    order = {s: i for i, s in enumerate(mod.SECTIONS)}
    merged = sorted(kept + rows, key=lambda r: order.get(r.group, len(order)))  # stable: case order kept
    from_old = sorted({r.group for r in kept}, key=lambda s: order.get(s, len(order)))
    # a section kept through several merges keeps the commit it was measured at, not the last file's
    origin = {g: f"commit {old_env.get('commit')}, {old_env.get('date')}" for g in from_old}
    origin.update({g: o for g, o in _merged_origins(old_env.get("merged", "")).items() if g in origin})
    merged_note = "; ".join(f"{g} from {origin[g]}" for g in from_old)
    return dict(env, merged=merged_note), merged, peers or old_peers


def _merged_origins(note: str) -> dict[str, str]:
    """``{section: "commit C, DATE"}`` read back from an environment's ``merged`` note (as :func:`_merge` writes it:
    ``"a, b from commit C, DATE; c from commit D, DATE"``)."""
    out: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in note.split(";"))):
        names, sep, origin = part.partition(" from ")
        if sep:
            out.update({n.strip(): origin.strip() for n in names.split(",") if n.strip()})
    return out


def run(groups: list[str], *, smoke: bool = False, sections: set[str] | None = None, peers: str | None = None,
        peer_groups: list[str] | None = None, out_dir: str = "benchmarks/results", tag: str | None = None,
        cuda_graph: bool = True, merge: bool = False, profile: bool = False) -> list[Row]:
    """Run the peers (if ``peers`` names peers_bench.py) and then each group; write each group's files into
    ``out_dir`` as soon as it is done; print every row at the end. Returns all rows, the peers' last.

    ``merge``: keep the rows of the sections not run now from the group's earlier file in ``out_dir`` (a long
    group measured in several calls, e.g. ``--sections sliding,bigbird`` then ``--sections scaling``).
    ``profile``: each case's step also under torch.profiler; where its time goes in the markdown."""
    import torch

    mods = {g: load_group(g) for g in groups}
    _check_sections(mods, sections)
    tag = tag or device_tag()
    options = Options(smoke=smoke, sections=frozenset(sections) if sections is not None else None,
                      cuda_graph=cuda_graph, profile=profile)
    env = environment()
    options.log(f"attnzoo bench {', '.join(groups)} on {options.device} ({options.dtype}): " +
                ", ".join(f"{k} {v}" for k, v in env.items() if v))
    peer_rows: list[Row] = []
    if peers:
        from .peers import run_peers

        wanted = peer_groups if peer_groups is not None else [p for m in mods.values() for p in m.PEERS]
        peer_rows = run_peers(peers, list(dict.fromkeys(wanted)), smoke=smoke)
    threads = torch.get_num_threads()
    if smoke and not options.cuda:
        torch.set_num_threads(1)  # tiny shapes: threads only add synchronization
    rows: list[Row] = []
    written = []
    try:
        for name, mod in mods.items():
            if sections is not None and not sections & set(mod.SECTIONS):
                continue  # none of its sections picked
            group_rows = mod.run(options)
            rows += group_rows
            stem = f"{name}-{tag}"
            genv, grows, gpeers = env, group_rows, peer_rows
            if merge:
                genv, grows, gpeers = _merge(os.path.join(out_dir, stem + ".json"), name, mod, env, group_rows,
                                             peer_rows, sections)
            written += _group_files(name, mod, genv, grows, gpeers, out_dir, stem,
                                    {"smoke": smoke, "sections": sorted(sections) if sections else None})
    finally:
        torch.set_num_threads(threads)
    print("\nwrote " + ", ".join(written))
    print_rows(rows + peer_rows, title=f"\nattnzoo bench ({', '.join(groups)}) on {env['device']}, commit "
                                       f"{env['commit']}, {env['date']}")
    return rows + peer_rows


def report(path: str) -> str:
    """Rebuild the markdown (and charts) beside a group's JSON without measuring; returns the markdown path."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--report {path!r}: no such file (a <group>-<tag>.json that attnzoo bench wrote)")
    name, env, rows, peers, options = read_group(path)
    mod = load_group(name)
    out_dir, stem = os.path.dirname(path) or ".", os.path.splitext(os.path.basename(path))[0]
    _, mpath = _group_files(name, mod, env, rows, peers, out_dir, stem, options)
    return mpath
