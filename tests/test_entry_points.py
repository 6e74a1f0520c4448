"""The `attnzoo` command's entry points set OMP_WAIT_POLICY before torch loads; `import attnzoo` sets nothing.

Each check runs in a fresh interpreter (this test process imported torch long ago). A meta-path hook
records the environment at the moment something first imports torch.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]

HOOK = """
import json, os, sys
seen = {}
class _Watch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and "omp" not in seen:
            seen["omp"] = os.environ.get("OMP_WAIT_POLICY")
        return None
sys.meta_path.insert(0, _Watch())
def report(**extra):
    print("RESULT " + json.dumps({"omp_at_torch_import": seen.get("omp", "torch not imported"),
                                  "torch_loaded": "torch" in sys.modules, **extra}), flush=True)
"""


def _run(body: str, env_omp: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if env_omp is not None:
        env["OMP_WAIT_POLICY"] = env_omp
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", HOOK + body], capture_output=True, text=True, cwd=ROOT, env=env,
                         timeout=300, check=False)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, f"rc={res.returncode}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    return {**json.loads(lines[-1][len("RESULT "):]), "stdout": res.stdout, "stderr": res.stderr}


def test_import_attnzoo_loads_no_torch_and_sets_nothing():
    r = _run("""
import attnzoo, attnzoo.cli, attnzoo.errors
report(omp=os.environ.get("OMP_WAIT_POLICY"), file=attnzoo.__file__)
""")
    assert r["file"].startswith(str(ROOT))
    assert not r["torch_loaded"], "import attnzoo / attnzoo.cli / attnzoo.errors must not import torch"
    assert r["omp"] is None, "import attnzoo must not change the process environment"


def test_console_script_sets_omp_before_torch():
    """What the installed `attnzoo` script does: `from attnzoo.cli import main; sys.exit(main())`."""
    r = _run("""
from importlib.metadata import entry_points
from attnzoo.cli import main
eps = [ep.value for ep in entry_points(group="console_scripts") if ep.name == "attnzoo"]
before = ("torch" in sys.modules, os.environ.get("OMP_WAIT_POLICY"))
code = main(["list", "gqa"])
report(before=before, code=code, eps=eps)
""")
    assert r["before"] == [False, None]
    assert r["code"] == 0 and "gqa" in r["stdout"]
    assert r["omp_at_torch_import"] == "PASSIVE"
    assert all(ep == "attnzoo.cli:main" for ep in r["eps"])  # the entry point this test stands for


def test_python_dash_m_sets_omp_before_torch_and_user_value_wins():
    body = """
import runpy
sys.argv = ["attnzoo", "list", "mqa"]
try:
    runpy.run_module("attnzoo", run_name="__main__", alter_sys=True)
except SystemExit as e:
    report(code=e.code)
"""
    r = _run(body)
    assert r["code"] == 0 and "mqa" in r["stdout"]
    assert r["omp_at_torch_import"] == "PASSIVE"
    assert _run(body, env_omp="ACTIVE")["omp_at_torch_import"] == "ACTIVE"


def test_lazy_public_names():
    import attnzoo
    from attnzoo import PatchReport, create, list_variants, ops  # noqa: F401

    for name in attnzoo.__all__:
        assert getattr(attnzoo, name) is not None
        assert name in dir(attnzoo)
    assert attnzoo.ops is ops and callable(attnzoo.patch) and attnzoo.create is create
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        attnzoo.nope  # noqa: B018
