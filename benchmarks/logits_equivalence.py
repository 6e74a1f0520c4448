"""Logits of every patch and convert path on the tiny architectures, to check that a refactor changes none.

Run it at two commits (from the repo root of each), then compare:

    python benchmarks/logits_equivalence.py /tmp/before.pt        # at the old commit (a git worktree)
    python benchmarks/logits_equivalence.py /tmp/after.pt         # at the new one
    python benchmarks/logits_equivalence.py --compare /tmp/before.pt /tmp/after.pt

Each entry is the model's output after ``attnzoo.patch`` and after ``attnzoo convert`` + reload, or the
error a refusal raised; the comparison wants them bit-identical.
"""
import contextlib
import io
import sys
import tempfile
from pathlib import Path
import torch
sys.path.insert(0, "tests")
from hf_tiny import TINY, main_output
import attnzoo
from attnzoo.cli import main

PATCHES = {
    True: [("mha", {}), ("gqa", {"groups": 2}), ("mqa", {}), ("mqa", {"method": "svd"}), ("sliding_window", {"window": 3})],
    False: [("mha", {}), ("gqa", {"groups": 2}), ("mqa", {}), ("sliding_window", {"window": 3}),
            ("longformer", {"window": 2, "global_tokens": 1}), ("bigbird", {"block_size": 2, "random_blocks": 1})],
}

def compare(a_path, b_path) -> int:
    a, b = torch.load(a_path), torch.load(b_path)
    diff = [k for k in sorted(set(a) | set(b))
            if k not in a or k not in b or type(a[k]) is not type(b[k])
            or (a[k] != b[k] if isinstance(a[k], str) else not torch.equal(a[k], b[k]))]
    for k in diff:
        print("different:", k)
    print(f"{len(set(a) | set(b)) - len(diff)} identical, {len(diff)} different")
    return 1 if diff else 0


if sys.argv[1] == "--compare":
    sys.exit(compare(sys.argv[2], sys.argv[3]))
out = {}
for name, t in TINY.items():
    for kind, opts in PATCHES[t.decoder]:
        key = f"{name}/{kind}/{opts}"
        torch.manual_seed(0)
        model, inputs = t.make()
        try:
            attnzoo.patch(model, kind, **opts)
            with torch.no_grad():
                out["patch:" + key] = main_output(model(**inputs))
        except Exception as e:
            out["patch:" + key] = f"error {type(e).__name__}"
            continue
        # convert path
        torch.manual_seed(0)
        model, inputs = t.make()
        with tempfile.TemporaryDirectory() as d:
            model.save_pretrained(Path(d) / "src")
            args = ["convert", str(Path(d) / "src"), str(Path(d) / "dst"), "--to", kind, "--no-progress"]
            for k, v in opts.items():
                args += ["--" + k.replace("_", "-"), str(v)]
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                rc = main(args)
            if rc != 0:
                out["convert:" + key] = f"rc {rc}"
                continue
            again = attnzoo.from_pretrained(Path(d) / "dst").eval()
            with torch.no_grad():
                out["convert:" + key] = main_output(again(**inputs))
torch.save(out, sys.argv[1])
print(len(out), "results")
