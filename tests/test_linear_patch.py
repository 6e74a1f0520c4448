"""patch(model, "linear" | "performer" | "linformer") on tiny Hugging Face models: q/k/v/o reused, cached decoding
equals the full forward, generate() keeps a fixed-size state, save and reload, and the refusals."""
import pytest
import torch
from hf_tiny import TINY, VOCAB

import attnzoo
from attnzoo.hf_compat import model_cache_kwarg, output_cache

DECODE = [("llama", "linear", {"feature_map": "hedgehog", "window": 3}),
          ("llama", "performer", {"features": 16}),
          ("mistral", "linear", {"feature_map": "t2r"}),
          ("gpt2", "linear", {"feature_map": "performer", "features": 16, "window": 2}),
          ("gpt_neox", "performer", {"features": 16})]


@pytest.mark.parametrize("name,kind,opts", DECODE, ids=[f"{n}-{k}" for n, k, _ in DECODE])
def test_cached_decoding_equals_the_full_forward(name, kind, opts):
    model, inputs = TINY[name].make()
    q_before = model.get_submodule(_first_attn(model)).state_dict()
    attnzoo.patch(model, kind, **opts)
    new = model.get_submodule(_first_attn(model))
    assert type(new).__name__ == "HFLinearAttention"
    if "q_proj.weight" in q_before:
        torch.testing.assert_close(new.q_proj.weight, q_before["q_proj.weight"])
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    nxt = torch.randint(3, VOCAB, (ids.shape[0], 1))
    full_ids, full_mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    with torch.no_grad():
        want = model(input_ids=full_ids, attention_mask=full_mask).logits[:, -1]
        first = model(input_ids=ids, attention_mask=mask, use_cache=True)
        cache = output_cache(first)
        step = model(input_ids=nxt, attention_mask=full_mask, use_cache=True, **{model_cache_kwarg(model): cache})
    torch.testing.assert_close(step.logits[:, -1], want, rtol=1e-4, atol=1e-4)
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(model.generate(**inputs, **kw, use_cache=True), model.generate(**inputs, **kw, use_cache=False))


def _first_attn(model):
    return attnzoo.patches.attention_sites(model)[1][0].fqn


def test_generate_state_is_constant_in_length():
    """The cache's layers hold the fixed state (and the window), not keys: the same bytes after 20 and 60 tokens."""
    model, _ = TINY["llama"].make()
    attnzoo.patch(model, "linear", feature_map="t2r", window=4)

    def state_bytes(n):
        ids = torch.randint(3, VOCAB, (1, n))
        with torch.no_grad():
            cache = output_cache(model(input_ids=ids, use_cache=True))
        return sum(t.numel() * t.element_size() for layer in cache.layers for t in layer.attnzoo_state), cache

    (a, _), (b, cache) = state_bytes(20), state_bytes(60)
    assert a == b and cache.get_seq_length() == 60


@pytest.mark.parametrize("name", ["bert", "roberta"])
def test_linformer_on_encoders_ignores_padding(name):
    model, inputs = TINY[name].make()
    attnzoo.patch(model, "linformer", k=4, max_len=32, share_layers=True)
    mods = [s.module for s in attnzoo.patches.attention_sites(model)[1]]
    assert mods[1].k_seq_proj is None and mods[1].projections()[0] is mods[0].k_seq_proj
    ids, mask = inputs["input_ids"][:1, :6], torch.ones(1, 6, dtype=torch.long)
    longer = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1)
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask).logits
        b = model(input_ids=longer, attention_mask=torch.cat([mask, torch.zeros(1, 3, dtype=torch.long)], 1)).logits
    torch.testing.assert_close(a if a.dim() == 2 else a, b if b.dim() == 2 else b[:, :6], rtol=1e-5, atol=1e-5)


def test_refusals_name_the_reason():
    model, _ = TINY["llama"].make()
    with pytest.raises(ValueError, match="linformer is for encoders"):
        attnzoo.patch(model, "linformer")
    model, _ = TINY["bert"].make()
    with pytest.raises(ValueError, match="window=4.*not causal"):
        attnzoo.patch(model, "linear", window=4)
    model, _ = TINY["qwen3"].make()
    with pytest.raises(attnzoo.errors.UnsupportedArchitectureError, match="q_norm"):
        attnzoo.patch(model, "performer")


def test_save_and_reload(tmp_path):
    model, inputs = TINY["llama"].make()
    attnzoo.patch(model, attnzoo.Linear(feature_map="hedgehog", window=2))
    with torch.no_grad():
        model.model.layers[0].self_attn.q_feature_map.bias.add_(0.1)
        want = model(**inputs).logits
    model.save_pretrained(tmp_path)
    again = attnzoo.from_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(again(**inputs).logits, want)
    # the recorded layout: a fixed state plus the window's 2 tokens, whatever the length
    assert attnzoo.kv_cache_bytes(again, 1024) == attnzoo.kv_cache_bytes(again, 8192) > 0


@pytest.mark.parametrize("name,argv", [("llama", ["--to", "linear", "--feature-map", "hedgehog", "--window", "3"]),
                                       ("bert", ["--to", "linformer", "--k", "8", "--share-layers"])])
def test_convert_cli_reuses_weights_and_reloads(tmp_path, name, argv):
    from attnzoo.cli import main

    model, inputs = TINY[name].make()
    model.save_pretrained(tmp_path / "src")
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "dst"), *argv, "--no-progress"]) == 0
    again = attnzoo.from_pretrained(tmp_path / "dst").eval()
    site = attnzoo.patches.attention_sites(again)[1][0]
    assert "Linear" in type(site.module).__name__ or "Linformer" in type(site.module).__name__
    w = site.read()
    src_site = attnzoo.patches.attention_sites(model)[1][0]
    torch.testing.assert_close(w.q, src_site.read().q)
    if name == "bert":
        assert site.module.max_len == model.config.max_position_embeddings
    with torch.no_grad():
        assert torch.isfinite(again(**inputs).logits).all()


def test_beam_search_reorders_the_state():
    """Beam search with the state cache gives the beams it gives without a cache (the state follows the beams)."""
    model, inputs = TINY["llama"].make()
    attnzoo.patch(model, "linear", feature_map="t2r", window=2)
    kw = dict(max_new_tokens=4, do_sample=False, num_beams=3, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(model.generate(**inputs, **kw, use_cache=True), model.generate(**inputs, **kw, use_cache=False))
