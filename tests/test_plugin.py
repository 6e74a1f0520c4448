"""examples/plugin: a variant in its own package, found through the entry-point group attnzoo.variants, gets
list, patch, convert, info and reload with nothing in attnzoo changed.

The test makes the package visible as `pip install -e examples/plugin` does (its directory on the path and a
dist-info holding its entry point) in a fresh interpreter, and runs the whole flow there."""
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = ROOT / "examples" / "plugin"

FLOW = textwrap.dedent('''
    import json, sys, torch, transformers as tf
    from pathlib import Path
    import attnzoo
    from attnzoo.cli import main
    tmp = Path(sys.argv[1])

    # attnzoo list --json lists it, with its options and defaults
    import io, contextlib
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["list", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(buf.getvalue())}
    assert "halve_kv" in rows, sorted(rows)
    assert {o["name"]: o.get("default") for o in rows["halve_kv"]["patch_options"]}["factor"] == 2

    cfg = tf.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=64)
    torch.manual_seed(0)
    src = tf.LlamaForCausalLM(cfg).eval()
    src.save_pretrained(tmp / "src")
    ids = torch.randint(3, 97, (2, 11))

    # attnzoo.patch(model, NAME) and the typed config: same logits
    from attnzoo_halve_kv import HalveKV
    a = tf.LlamaForCausalLM.from_pretrained(tmp / "src").eval()
    b = tf.LlamaForCausalLM.from_pretrained(tmp / "src").eval()
    ra, rb = attnzoo.patch(a, "halve_kv"), attnzoo.patch(b, HalveKV(factor=2))
    assert a.config.num_key_value_heads == 2 and ra.kv_bytes_per_token_after * 2 == ra.kv_bytes_per_token_before
    with torch.no_grad():
        want = a(input_ids=ids).logits
        assert torch.equal(b(input_ids=ids).logits, want)

    # attnzoo convert SRC DST --to NAME, attnzoo info DST, attnzoo.from_pretrained(DST)
    assert main(["convert", str(tmp / "src"), str(tmp / "dst"), "--to", "halve_kv", "--no-progress"]) == 0
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["info", str(tmp / "dst")]) == 0
    assert "K/V 2 x 8 in every layer" in buf.getvalue() or "GQA-2" in buf.getvalue(), buf.getvalue()
    again = attnzoo.from_pretrained(tmp / "dst").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
    assert attnzoo.kv_cache_bytes(again, 100) == attnzoo.kv_cache_bytes(a, 100)

    # a non-native architecture goes through the converter's in-memory path and reloads from the record
    g = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()
    g.save_pretrained(tmp / "gsrc")
    assert main(["convert", str(tmp / "gsrc"), str(tmp / "gdst"), "--to", "halve_kv", "--factor", "4",
                 "--no-progress"]) == 0
    gp = tf.GPT2LMHeadModel.from_pretrained(tmp / "gsrc").eval()
    attnzoo.patch(gp, "halve_kv", factor=4)
    with torch.no_grad():
        torch.testing.assert_close(attnzoo.from_pretrained(tmp / "gdst").eval()(input_ids=ids).logits,
                                   gp(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    print("plugin flow ok")
''')


def _fake_install(site: Path) -> None:
    """What `pip install -e examples/plugin` leaves for importlib.metadata: a dist-info with the entry point."""
    info = site / "attnzoo_halve_kv-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: attnzoo-halve-kv\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text("[attnzoo.variants]\nhalve_kv = attnzoo_halve_kv\n")


def test_plugin_variant_gets_list_patch_convert_info_and_reload(tmp_path):
    _fake_install(tmp_path / "site")
    env = {"PYTHONPATH": f"{tmp_path / 'site'}:{PLUGIN}:{ROOT}", "PATH": "/usr/bin:/bin",
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", FLOW, str(tmp_path)], capture_output=True, text=True, env=env,
                         timeout=600)
    assert res.returncode == 0 and "plugin flow ok" in res.stdout, res.stdout[-2000:] + res.stderr[-4000:]


def test_plugin_variant_runs_the_registry_tests_when_installed(tmp_path):
    """The registry-parametrized checks (forward/backward against its own float64 reference) pass for it."""
    _fake_install(tmp_path / "site")
    code = textwrap.dedent('''
        import torch, attnzoo
        e = attnzoo.registry.get("halve_kv")
        m = attnzoo.create("halve_kv", **e.example, causal=True).double()
        x = torch.randn(2, 7, 64, dtype=torch.float64)
        kpm = torch.ones(2, 7, dtype=torch.bool); kpm[1, 5:] = False
        torch.testing.assert_close(m(x, key_padding_mask=kpm), e.reference(m, x, key_padding_mask=kpm))
        assert m.kv_heads == 2 and attnzoo.kv_cache_bytes(m, 10, dtype=torch.float32) == 10 * 2 * 2 * 16 * 4
        print("ok")
    ''')
    env = {"PYTHONPATH": f"{tmp_path / 'site'}:{PLUGIN}:{ROOT}", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]
