"""patch(model, "longformer" | "bigbird", ...) on the encoders (bert, roberta): float64 references, the
Longformer position extension (copies, RoBERTa's offset rows), global projections, reloads, errors."""
import copy
import json

import pytest
import torch
import transformers as tf
from hf_tiny import TINY, VOCAB, run

import attnzoo
from attnzoo.ops.sparse import BigBird, Longformer
from attnzoo.patches import HFSparseAttention, attention_sites

ENCODERS = ["bert", "roberta"]


def _enc_inputs(n, batch=2, pad=3):
    ids = torch.randint(3, VOCAB, (batch, n))
    mask = torch.ones(batch, n, dtype=torch.long)
    mask[1, n - pad:] = 0  # right padding
    ids[1, n - pad:] = 1  # roberta's pad token (its positions skip padding)
    return {"input_ids": ids, "attention_mask": mask}


def _real(out, mask):
    """The outputs of real tokens (token logits) or everything (sequence classification)."""
    return out[mask.bool()] if out.dim() == 3 else out


def _reference(model, inputs, pattern):
    n = inputs["input_ids"].shape[1]
    keep = pattern.bind(n).keep_mask()[None, None] & inputs["attention_mask"].bool()[:, None, None, :]
    with torch.no_grad():
        return model(input_ids=inputs["input_ids"], attention_mask=keep).logits  # HF's sdpa with the dense mask


CASES = [
    ("longformer", dict(window=2, global_tokens=1), Longformer(window=2, global_tokens=1)),
    ("longformer", dict(window=1, global_tokens=[0, 6], global_projections=True),
     Longformer(window=1, global_tokens=(0, 6))),
    ("bigbird", dict(block_size=2, global_blocks=2, random_blocks=1, seed=3),
     BigBird(block_size=2, global_blocks=2, random_blocks=1, seed=3)),
    ("bigbird", dict(block_size=3, window=3, global_blocks=1, random_blocks=0),
     BigBird(block_size=3, window=3, global_blocks=1, random_blocks=0)),
]


@pytest.mark.parametrize("name", ENCODERS)
@pytest.mark.parametrize("variant, options, pattern", CASES)
def test_logits_equal_a_float64_reference_with_the_pattern_mask(name, variant, options, pattern):
    model, _ = TINY[name].make()
    model = model.double()
    ref_model = copy.deepcopy(model)
    inputs = _enc_inputs(13)
    report = attnzoo.patch(model, variant, **options)
    assert not report.native and all(isinstance(s.module, HFSparseAttention) for s in attention_sites(model)[1])
    want = _reference(ref_model, inputs, pattern)  # global projections start as copies: same numbers
    with attnzoo.ops.use_sparse_backend("reference"):
        got = run(model, inputs)
    real = inputs["attention_mask"]
    torch.testing.assert_close(_real(got, real), _real(want, real), rtol=1e-9, atol=1e-9)
    out = model(**inputs).logits  # default backends, and backward
    _real(out, real).pow(2).mean().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "q_proj" in n)
    if options.get("global_projections"):
        m = attention_sites(model)[1][0].module
        assert torch.equal(m.q_global_proj.weight, m.q_proj.weight) and torch.equal(m.v_global_proj.bias, m.v_proj.bias)
        assert m.k_global_proj.weight.grad is not None  # the global rows read them


@pytest.mark.parametrize("name", ENCODERS)
@pytest.mark.parametrize("variant, options", [("longformer", dict(window=16, global_tokens=0)),
                                              ("longformer", dict(window=16, global_projections=True)),
                                              ("bigbird", dict(block_size=16, random_blocks=0))])
def test_a_pattern_covering_the_sequence_is_lossless(name, variant, options):
    model, inputs = TINY[name].make()  # 9 tokens
    ref = run(model, inputs)
    attnzoo.patch(model, variant, **options)
    torch.testing.assert_close(run(model, inputs), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name, offset", [("bert", 0), ("roberta", 2)])
def test_position_extension_copies_and_runs_past_the_old_limit(name, offset, tmp_path):
    model, _ = TINY[name].make()
    old = model.base_model.embeddings.position_embeddings.weight.detach().clone()
    cap = old.shape[0] - offset  # 32 (bert) / 38 (roberta)
    report = attnzoo.patch(model, "longformer", window=4, global_tokens=1, max_positions=100)
    emb = model.base_model.embeddings
    new = emb.position_embeddings.weight.detach()
    assert new.shape[0] == 100 + offset and model.config.max_position_embeddings == 100 + offset
    assert torch.equal(new[:offset], old[:offset])
    for start in range(offset, 100 + offset, cap):
        stop = min(start + cap, 100 + offset)
        assert torch.equal(new[start:stop], old[offset:offset + stop - start])
    assert emb.position_ids.shape == (1, 100 + offset) and torch.equal(emb.position_ids[0], torch.arange(100 + offset))
    assert emb.token_type_ids.shape == (1, 100 + offset) and not emb.token_type_ids.any()
    assert report.params_after - report.params_before == (100 + offset - old.shape[0]) * old.shape[1]
    assert any("learned rows tiled to 100 positions" in n for n in report.notes)
    inputs = _enc_inputs(70)  # longer than the original limit
    want = run(model, inputs)
    assert torch.isfinite(want).all()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["max_position_embeddings"] == 100 + offset and config["attnzoo"]["options"]["max_positions"] == 100
    again = attnzoo.from_pretrained(tmp_path)
    torch.testing.assert_close(run(again, inputs), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["vit", "clip"])
def test_vision_encoders_take_the_patterns_without_positions(name):
    vision = {"filter_fn": lambda m, fqn: fqn.startswith("vision_model")} if name == "clip" else {}
    model, inputs = TINY[name].make()
    ref = run(model, inputs)
    attnzoo.patch(model, "longformer", window=40, global_tokens=1, **vision)  # 17 tokens: lossless
    torch.testing.assert_close(run(model, inputs), ref, rtol=1e-5, atol=1e-5)
    model, inputs = TINY[name].make()
    attnzoo.patch(model, "bigbird", block_size=2, random_blocks=1, **vision)
    assert torch.isfinite(run(model, inputs)).all()


def test_4096_positions_on_a_tiny_bert_take_a_long_sequence(tmp_path):
    cfg = tf.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=512)
    model = tf.BertModel(cfg).eval()
    attnzoo.patch(model, "longformer", window=8, global_tokens=1, max_positions=4096)
    assert model.embeddings.position_embeddings.num_embeddings == 4096
    ids = torch.randint(3, VOCAB, (1, 1100))
    with torch.no_grad():
        out = model(input_ids=ids).last_hidden_state
    assert out.shape == (1, 1100, 16) and torch.isfinite(out).all()


def test_bigbird_with_max_positions_reloads(tmp_path):
    model, _ = TINY["roberta"].make()
    report = attnzoo.patch(model, "bigbird", block_size=4, random_blocks=2, seed=7, max_positions=64)
    assert report.options["window"] == 4 and model.config.max_position_embeddings == 66
    inputs = _enc_inputs(50)
    want = run(model, inputs)
    model.save_pretrained(tmp_path)
    again = attnzoo.from_pretrained(tmp_path)
    torch.testing.assert_close(run(again, inputs), want, rtol=1e-5, atol=1e-5)
    assert attention_sites(again)[1][0].module.pattern == BigBird(block_size=4, random_blocks=2, seed=7)
    short, _ = TINY["bert"].make()  # sequences shorter than the blocks it was made for still run
    attnzoo.patch(short, "bigbird", block_size=4, random_blocks=1)
    for n in (3, 6, 17):  # one block (dense), two blocks (no room for random blocks), enough
        assert torch.isfinite(run(short, _enc_inputs(n, pad=1))).all()


@pytest.mark.parametrize("name, call, exc, msg", [
    ("bert", lambda m: attnzoo.patch(m, "longformer", window=0), ValueError, "window=0"),
    ("bert", lambda m: attnzoo.patch(m, "longformer", window=0), ValueError, "window=0: expected an integer >= 1"),
    ("bert", lambda m: attnzoo.patch(m, "longformer", window=2, global_projections="yes"), TypeError,
     "global_projections='yes'"),
    ("bert", lambda m: attnzoo.patch(m, "longformer", window=2, global_tokens=-1), ValueError, "global_tokens=-1"),
    ("bert", lambda m: attnzoo.patch(m, "longformer", window=2, max_positions=16), ValueError,
     r"max_positions=16: smaller than the 32 positions.*max_positions >= 32"),
    ("roberta", lambda m: attnzoo.patch(m, "longformer", window=2, max_positions=30), ValueError,
     r"smaller than the 38 positions.*40 rows, 2 reserved"),
    ("bert", lambda m: attnzoo.patch(m, "longformer", window=2, max_positions=0), ValueError, "max_positions=0"),
    ("vit", lambda m: attnzoo.patch(m, "longformer", window=2, max_positions=64), ValueError,
     "vit models.*no learned absolute position table.*bert, roberta"),
    ("llama", lambda m: attnzoo.patch(m, "longformer", window=2), ValueError,
     "is causal.*bidirectional encoders.*sliding_window"),
    ("gpt2", lambda m: attnzoo.patch(m, "bigbird", block_size=2), ValueError, "is causal"),
    ("bert", lambda m: attnzoo.patch(m, "bigbird", block_size=2, window=3), ValueError,
     "window=3: bigbird's window is counted in whole blocks; expected a multiple of block_size=2"),
    ("bert", lambda m: attnzoo.patch(m, "bigbird", block_size=64), ValueError,
     r"block_size=64 does not fit a sequence of 32 tokens.*the model's positions"),
    ("bert", lambda m: attnzoo.patch(m, "bigbird", block_size=8, random_blocks=3), ValueError,
     r"random_blocks=3: .* expected random_blocks in \[0, 0\].*model's positions = 32 tokens"),
    ("bert", lambda m: attnzoo.patch(m, "bigbird", block_size=0), ValueError, "block_size=0"),
    ("bert", lambda m: attnzoo.patch(m, "bigbird", block_size=4, globl_blocks=2), ValueError,
     "unknown option 'globl_blocks'.*'global_blocks'"),
])
def test_bad_options_raise_before_anything_changes(name, call, exc, msg):
    model, inputs = TINY[name].make()
    ref = run(model, inputs)
    rows = model.config.to_dict().get("max_position_embeddings")
    with pytest.raises(exc, match=msg):
        call(model)
    torch.testing.assert_close(run(model, inputs), ref)
    assert getattr(model.config, "attnzoo", None) is None
    assert model.config.to_dict().get("max_position_embeddings") == rows
