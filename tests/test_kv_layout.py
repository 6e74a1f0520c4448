"""One KV layout per layer, and every byte count computed from it: kv_cache_bytes, PatchReport, attnzoo info,
attnzoo eval and the model card agree with what the caches really hold."""
import json
import re

import pytest
import torch
from hf_tiny import TINY, VOCAB
from tinylm import save_init

import attnzoo
from attnzoo.cli import main
from attnzoo.conversion.card import format_bytes
from attnzoo.data import BuiltinCorpus
from attnzoo.hf_compat import output_cache
from attnzoo.kv import KVLayout, kv_bytes_per_token, kv_layouts


def _held(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def test_layout_arithmetic_and_records():
    kv = KVLayout(kv_heads=2, head_dim=8)
    assert kv.per_token == 32 and kv.elements(10) == 320 and kv.nbytes(10, torch.bfloat16) == 640
    win = kv.with_window(4)
    assert win.elements(3) == 96 and win.elements(1000) == 128
    mla = KVLayout(latent=576)
    assert mla.elements(7) == 7 * 576 and mla.describe() == "latent 576"
    state = KVLayout(state=4096)
    assert state.elements(1) == state.elements(10_000) == 4096
    for lay in (kv, win, mla, state, KVLayout(kv_heads=1, head_dim=64, latent=3, state=5, window=9)):
        assert KVLayout.from_json(json.loads(json.dumps(lay.to_json()))) == lay
    assert KVLayout.from_json([4, 16]) == KVLayout(4, 16)  # records written by attnzoo 0.1.0
    with pytest.raises(ValueError, match="kv_layout entry"):
        KVLayout.from_json({"heads": 3})


@pytest.mark.parametrize("name", ["llama", "gpt2", "mistral"])
def test_sliding_window_bytes_are_what_the_cache_holds(name, tmp_path, capsys):
    """kv_cache_bytes, attnzoo info and attnzoo eval's JSON report the window, not the whole sequence."""
    model, _ = TINY[name].make()
    attnzoo.patch(model, "sliding_window", window=3)
    n = 12
    with torch.no_grad():
        cache = output_cache(model(input_ids=torch.randint(3, VOCAB, (1, n)), use_cache=True))
    held = _held(cache)
    assert attnzoo.kv_cache_bytes(model, n) == held
    layers = model.config.get_text_config().num_hidden_layers
    assert held == layers * 3 * kv_bytes_per_token(model) // layers  # the last `window` tokens per layer
    assert all(lay.window == 3 for lay in kv_layouts(model))
    model.save_pretrained(tmp_path / "m")
    again = attnzoo.from_pretrained(tmp_path / "m")
    assert attnzoo.kv_cache_bytes(again, n) == attnzoo.kv_cache_bytes(again.config, n, dtype=torch.float32) == held
    assert main(["info", str(tmp_path / "m"), "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("as is"))
    assert format_bytes(attnzoo.kv_cache_bytes(again.config, 8192, dtype=torch.float32)) in row
    assert format_bytes(held) in row  # @8k: the window only, as after 12 tokens


def test_eval_json_reports_the_cache_held_at_the_eval_length(tmp_path):
    path = save_init(tmp_path / "m")
    model = attnzoo.from_pretrained(path)
    attnzoo.patch(model, "sliding_window", window=5)
    model.save_pretrained(tmp_path / "w")
    (tmp_path / "w" / "tokenizer.json").write_bytes((path / "tokenizer.json").read_bytes())
    ids = BuiltinCorpus(1, 64).batch(range(2))
    (tmp_path / "d.ids").write_text(" ".join(map(str, ids.flatten().tolist())))
    for d, window in ((path, None), (tmp_path / "w", 5)):
        assert main(["eval", "--model", str(d), "--data", str(tmp_path / "d.ids"), "--seq-len", "64",
                     "--num-seqs", "0", "--decode-tokens", "0", "--json", str(tmp_path / "r.json")]) == 0
        r = json.loads((tmp_path / "r.json").read_text())
        loaded = attnzoo.from_pretrained(d)
        with torch.no_grad():
            held = _held(output_cache(loaded(input_ids=torch.randint(3, 100, (1, 64)), use_cache=True)))
        assert r["kv_seq_len"] == 64 and r["kv_cache_bytes"] == held
        tokens = 64 if window is None else window
        assert r["kv_cache_bytes"] == r["kv_bytes_per_token"] * tokens


def test_convert_table_and_card_count_the_window(tmp_path, capsys):
    model, _ = TINY["mistral"].make()
    model.save_pretrained(tmp_path / "src")
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "dst"), "--to", "sliding_window", "--window",
                 "3", "--no-progress"]) == 0
    out = capsys.readouterr().out
    after = next(line for line in out.splitlines() if line.startswith("after:"))
    assert "last 3 tokens" in after
    cfg = attnzoo.from_pretrained(tmp_path / "dst").config
    held = format_bytes(attnzoo.kv_cache_bytes(cfg, 8192, dtype=torch.float32))
    assert re.search(rf"\b{re.escape(held)}\b", after)
    card = (tmp_path / "dst" / "README.md").read_text()
    assert "last 3 tokens" in card and held in card
