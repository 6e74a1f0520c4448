"""The README's claims about the live code: the Quickstart runs and its commented results hold, the Variants
table lists the registry with real option names, the Backends section gives the dispatch order."""
import contextlib
import io
import re
from pathlib import Path

import torch

import attnzoo
from attnzoo import registry

README = (Path(__file__).parents[1] / "README.md").read_text()


def _section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end if end != -1 else None]


def test_quickstart_runs_and_its_comments_hold():
    block = re.search(r"```python\n(.*?)```", _section("Quickstart"), re.S).group(1)
    listed = re.search(r"attnzoo\.list_variants\(\)\s+# (\[.*?\])", block).group(1)
    assert listed == repr(attnzoo.list_variants())
    scope: dict = {}
    with contextlib.redirect_stdout(io.StringIO()) as out:
        exec(compile(block, "README.md#quickstart", "exec"), scope)  # noqa: S102 (our own README)
    assert "runs this call" in out.getvalue() and "sdpa_math" in out.getvalue()  # explain names the others too
    assert scope["y"].shape == (2, 256, 512)
    claimed = int(re.search(r"kv_cache_bytes\(.*\)\s+# (\d+)", block).group(1))
    assert attnzoo.kv_cache_bytes(scope["attn"], seq_len=32768, batch=1, dtype=torch.bfloat16) == claimed


def test_variants_table_matches_the_registry():
    table = _section("Variants")
    names = []
    common: list = []
    for row in table.splitlines():
        if row.startswith("| name |"):  # each table's header names the options its rows share
            common = re.findall(r"`(\w+)`", row)
        if not row.startswith("| `"):
            continue
        cells = [c.strip() for c in row.strip("|").split("|")]
        (name,) = re.findall(r"`(\w+)`", cells[0])
        names.append(name)
        options = set(registry.get(name).config_cls.option_names())
        assert set(common) <= options | {"context_dim"}, (name, set(common) - options)
        assert set(re.findall(r"`(\w+)`", cells[2])) <= options, (name, cells[2])
        specific = options - set(common)
        assert specific <= set(re.findall(r"`(\w+)`", cells[2])), (name, "options missing from the table", specific)
    assert sorted(names) == attnzoo.list_variants()


def test_sliding_window_cache_claim():
    """Table: causal sliding window caches min(seq, window) tokens per sequence."""
    attn = attnzoo.create("sliding_window", dim=64, heads=4, groups=2, window=8, causal=True)
    per_token = 2 * 2 * 16 * 2
    for seq in (3, 8, 100):
        assert attnzoo.kv_cache_bytes(attn, seq_len=seq, dtype=torch.float16) == per_token * min(seq, 8)


def test_backends_order():
    text = " ".join(_section("Backends").split())
    cuda = re.search(r"on CUDA: (.*?); on the CPU", text).group(1)
    cpu = re.search(r"on the CPU: (.*?)\. The first", text).group(1)
    assert tuple(re.findall(r"`(\w+)`", cuda)) == attnzoo.ops.ORDER["cuda"]
    assert tuple(re.findall(r"`(\w+)`", cpu)) == attnzoo.ops.ORDER["cpu"]
