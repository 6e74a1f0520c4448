"""The ``reformer`` variant: exactness with one bucket, agreement with Hugging Face's LSHSelfAttention given the same
buckets, causality, recall of the true top keys against num_hashes, odd lengths and padding, decoding with the
cache, options; and the conversion of Hugging Face models (llama family, bert/roberta): patch, reload, generate."""
import copy
import math

import pytest
import torch
import transformers as tf
from hf_tiny import TINY, VOCAB, run

import attnzoo
from attnzoo.ops import attention_reference
from attnzoo.ops.lsh import hash_keys, hash_queries, hash_vectors, lsh_attention
from attnzoo.ops.lsh.naive import round_keep
from attnzoo.variants.reformer import LSHCache, shared_keys

from oracle import naive_attention


def _module(**kw):
    opts = dict(dim=32, heads=2, num_hashes=2, bucket_size=8)
    opts.update(kw)
    return attnzoo.create("reformer", **opts).double()


@pytest.mark.parametrize("shared_qk", [True, False])
@pytest.mark.parametrize("causal", [False, True])
def test_one_bucket_is_exact_attention(shared_qk, causal):
    """bucket_size >= n: one bucket, one chunk, every round reads every key: exact softmax attention (shared QK:
    keys = normalised queries, unscaled, a token reads itself only when nothing else is there)."""
    m = _module(shared_qk=shared_qk, causal=causal, num_hashes=3, bucket_size=16)
    x = torch.randn(2, 13, 32, dtype=torch.float64)
    kpm = torch.ones(2, 13, dtype=torch.bool)
    kpm[1, 10:] = False
    q = m.q_proj(x).view(2, 13, 2, 16).transpose(1, 2)
    v = m.v_proj(x).view(2, 13, 2, 16).transpose(1, 2)
    got = m.attend(q, None if shared_qk else m.k_proj(x).view(2, 13, 2, 16).transpose(1, 2), v,
                   key_padding_mask=kpm)
    if shared_qk:
        n = 13
        eye = torch.eye(n, dtype=torch.bool)
        keep = kpm[:, None, None, :] & ~eye
        if causal:
            keep = keep & torch.ones(n, n, dtype=torch.bool).tril()
        alone = ~keep.any(-1, keepdim=True)  # nothing else there: the token reads itself
        want = naive_attention(q, shared_keys(q), v, mask=keep | (alone & eye), scale=1.0)
    else:
        k = m.k_proj(x).view(2, 13, 2, 16).transpose(1, 2)
        want = naive_attention(q, k, v, causal=causal, key_padding_mask=kpm)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("causal", [False, True])
def test_agrees_with_hugging_face_lsh_self_attention_given_the_same_buckets(causal):
    """transformers' LSHSelfAttention (shared QK, one round, chunks of 8 looking one back) with our buckets:
    the same output (its query_key/value weights as our q_proj/v_proj). One round: with several, Hugging Face's
    first chunk of a round looks back into the previous round (attnzoo's stays in its round: docs/reformer.md)."""
    torch.manual_seed(0)
    n, c, heads, hd = 24, 8, 2, 8
    cfg = tf.ReformerConfig(attn_layers=["lsh"], hidden_size=16, num_attention_heads=heads, attention_head_size=hd,
                            lsh_attn_chunk_length=c, num_hashes=1, num_buckets=4, lsh_num_chunks_before=1,
                            lsh_num_chunks_after=0, is_decoder=causal, lsh_attention_probs_dropout_prob=0.0)
    hf = tf.models.reformer.modeling_reformer.LSHSelfAttention(cfg).eval()
    m = attnzoo.create("reformer", dim=16, heads=heads, head_dim=hd, num_hashes=1, bucket_size=c, num_buckets=4,
                       causal=causal)
    with torch.no_grad():
        m.q_proj.weight.copy_(hf.query_key.weight)
        m.v_proj.weight.copy_(hf.value.weight)
    x = torch.randn(2, n, 16)
    mask = torch.ones(2, n, dtype=torch.long)
    mask[1, 20:] = 0
    q = m.q_proj(x).view(2, n, heads, hd).transpose(1, 2)
    v = m.v_proj(x).view(2, n, heads, hd).transpose(1, 2)
    qb, _ = m.buckets(q, None, 4)
    assert len(qb.unique()) > 1
    hf_buckets = torch.where(mask.bool()[:, None, None, :], qb, 4)  # attnzoo sorts padding after every bucket
    with torch.no_grad():
        want = hf(x, attention_mask=mask, buckets=hf_buckets.flatten(2)).hidden_states
        got = m.attend(q, None, v, key_padding_mask=mask.bool()).transpose(1, 2).reshape(2, n, heads * hd)
    rows = mask.bool()  # padded queries: HF's -1e9 mask value vs attnzoo's nothing-to-read
    torch.testing.assert_close(got[rows], want[rows], rtol=1e-5, atol=1e-5)


def test_causal_receptive_field():
    """Causal: no output depends on a later token (gradients), whatever the buckets."""
    m = _module(causal=True, shared_qk=False, bucket_size=4)
    x = torch.randn(1, 21, 32, dtype=torch.float64, requires_grad=True)
    y = m(x)
    for i in (0, 7, 20):
        g = torch.autograd.grad(y[0, i].sum(), x, retain_graph=True)[0]
        assert bool((g[0, i + 1:] == 0).all()) and bool(g[0, i].abs().sum() > 0)


def _recall(qb, kb, top, c):
    n = qb.shape[-1]
    read = torch.zeros(n, n, dtype=torch.bool)
    for r in range(qb.shape[2]):
        read |= round_keep(qb[0, 0, r], kb[0, 0, r], c)
    return read.gather(1, top).float().mean().item()


def test_recall_of_the_true_top_keys_rises_with_num_hashes():
    """The share of each query's 4 best keys that its rounds read (512 tokens, chunks of 32: two chunks are 1/8 of
    the keys). Shared QK on clustered queries (angular LSH's case): well above chance from one round. Separate QK
    (SMYRF's transforms) on keys of unequal norms: rising with the rounds (the transform pushes small keys towards
    one axis, so its buckets are uneven: docs/reformer.md)."""
    torch.manual_seed(0)
    n, d, c = 512, 16, 32
    centers = torch.randn(32, d)
    q = (centers[torch.randint(0, 32, (n,))] + torch.randn(n, d))[None, None]
    s = q[0, 0] @ shared_keys(q)[0, 0].T
    top = s.fill_diagonal_(float("-inf")).topk(4, dim=-1).indices
    shared = [_recall(hash_vectors(q, r, n // c, seed=1), hash_vectors(q, r, n // c, seed=1), top, c)
              for r in (1, 2, 4, 8)]
    assert shared == sorted(shared) and shared[0] > 2 * (2 * c / n) and shared[-1] > 0.85, shared
    k = torch.randn(1, 1, n, d) * torch.rand(1, 1, n, 1).add(0.5)
    top = (q[0, 0] @ k[0, 0].T).topk(4, dim=-1).indices
    separate = [_recall(hash_queries(q, r, n // c, seed=1), hash_keys(k, r, n // c, seed=1, causal=False), top, c)
                for r in (1, 2, 4, 8)]
    assert separate == sorted(separate) and separate[-1] > separate[0] + 0.3, separate


@pytest.mark.parametrize("n", [1, 7, 31])
def test_odd_lengths_and_padding_forward_backward(n):
    m = _module(causal=False, shared_qk=False, bucket_size=4, groups=1)
    x = torch.randn(2, n, 32, dtype=torch.float64, requires_grad=True)
    kpm = torch.ones(2, n, dtype=torch.bool)
    kpm[1, n // 2 + 1:] = False
    y = m(x, key_padding_mask=kpm)
    assert y.shape == x.shape and bool(torch.isfinite(y).all())
    # padded keys are never read: changing them changes no real row
    x2 = x.detach().clone()
    x2[1, n // 2 + 1:] += 5
    torch.testing.assert_close(m(x2, key_padding_mask=kpm)[1, : n // 2 + 1], y[1, : n // 2 + 1].detach())
    y.sum().backward()
    assert bool(torch.isfinite(x.grad).all())


@pytest.mark.parametrize("shared_qk", [True, False])
def test_decoding_with_the_cache_equals_the_full_forward_over_the_tokens_so_far(shared_qk):
    """Each decoded token's output = the last row of the full forward over the tokens so far (num_buckets fixed,
    as the cache fixes it); the cache keeps K/V and the buckets (KVLayout says how much)."""
    m = _module(causal=True, shared_qk=shared_qk, bucket_size=4, num_buckets=4, rope=True)
    x = torch.randn(1, 19, 32, dtype=torch.float64)
    cache = m.make_cache()
    assert isinstance(cache, LSHCache)
    outs = [m(x[:, :11], cache=cache)]
    for t in range(11, 19):
        outs.append(m(x[:, t:t + 1], cache=cache))
    for t in range(11, 19):
        torch.testing.assert_close(outs[t - 10][:, -1], m(x[:, :t + 1])[:, -1], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(outs[0], m(x[:, :11]))
    assert cache.layout() == m.config.kv_layout() and cache.seq_len == 19
    per_token = 2 * 2 * 16 * 8 + 2 * 2 * (1 if shared_qk else 2) * 2  # K/V float64 + int16 ids
    assert per_token * 19 <= cache.nbytes() <= 2 * cache.layout().nbytes(19, torch.float64)  # the cache protocol


def test_options_are_checked():
    with pytest.raises(ValueError, match="num_buckets=5"):
        _module(num_buckets=5)
    with pytest.raises(ValueError, match="bucket_size=0"):
        _module(bucket_size=0)
    with pytest.raises(ValueError, match="groups=1: with shared_qk=True"):
        _module(groups=1)
    with pytest.raises(ValueError, match="causal=True"):
        _module()(torch.randn(1, 3, 32, dtype=torch.float64), cache=LSHCache())
    with pytest.raises(ValueError, match="attn_mask"):
        _module()(torch.randn(1, 3, 32, dtype=torch.float64), attn_mask=torch.ones(3, 3, dtype=torch.bool))
    assert not hasattr(_module(), "k_proj") and hasattr(_module(shared_qk=False), "k_proj")
    assert attnzoo.create("reformer", dim=32, heads=2).config.kv_layout().describe() == "K/V 2 x 16 + latent 8"


# ---------------------------------------------------------------------------- Hugging Face conversion
@pytest.mark.parametrize("name", ["llama", "qwen2", "bert", "roberta"])
def test_patch_with_one_bucket_is_lossless_and_with_buckets_changes_the_model(name):
    model, inputs = TINY[name].make()
    before = run(model, inputs)
    lsh = copy.deepcopy(model)
    report = attnzoo.patch(model, attnzoo.Reformer(num_hashes=2, bucket_size=64))
    assert len(report.modules) == 2 and not report.native and report.params_after == report.params_before
    torch.testing.assert_close(run(model, inputs), before, rtol=1e-4, atol=1e-5)
    attnzoo.patch(lsh, "reformer", num_hashes=2, bucket_size=2)
    assert not torch.allclose(run(lsh, inputs), before, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_a_converted_model_reloads(name, tmp_path):
    model, inputs = TINY[name].make()
    attnzoo.patch(model, "reformer", num_hashes=2, bucket_size=4, seed=3)
    want = run(model, inputs)
    model.save_pretrained(tmp_path)
    again = attnzoo.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(run(again, inputs), want)


def _one_layer_llama():
    cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=64,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return tf.LlamaForCausalLM(cfg).eval()


def test_generate_decodes_with_the_bucket_state_as_the_full_forward_does():
    """One layer (the exact statement; see docs/reformer.md for deeper models): each cached decode step's logits
    equal the full forward's last row over the tokens so far; the bucket state follows the cache."""
    torch.manual_seed(0)
    model = _one_layer_llama()
    attnzoo.patch(model, "reformer", num_hashes=2, bucket_size=4, num_buckets=4)
    ids = torch.randint(3, VOCAB, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :2] = 0
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0,
                             output_scores=True, return_dict_in_generate=True)
        seq = out.sequences
        for step, scores in enumerate(out.scores):
            t = 9 + step
            m = torch.cat([mask, torch.ones(2, step, dtype=torch.long)], 1)
            pos = (m.cumsum(1) - 1).clamp_min(0)  # generate()'s positions under left padding
            full = model(input_ids=seq[:, :t], attention_mask=m, position_ids=pos).logits[:, -1]
            torch.testing.assert_close(scores, full, rtol=1e-4, atol=1e-4)
    layer = model.model.layers[0].self_attn  # a decode call with no prompt before it is refused
    del layer.attnzoo_lsh_state
    with pytest.raises(ValueError, match="bucket state holds 0 tokens"):
        attnzoo.patches.hf.kernel.hf_attention(layer, torch.randn(2, 8, 1, 8), torch.randn(2, 4, 5, 8),
                                               torch.randn(2, 4, 5, 8), None)


def test_bad_conversions_are_refused():
    model, _ = TINY["gpt2"].make()
    with pytest.raises(attnzoo.UnsupportedArchitectureError, match="llama family"):
        attnzoo.patch(model, "reformer")
    model, _ = TINY["llama"].make()
    with pytest.raises(ValueError, match="num_buckets=3"):
        attnzoo.patch(model, "reformer", num_buckets=3)
    with pytest.raises(ValueError, match="unknown option 'num_hash'"):
        attnzoo.patch(model, "reformer", num_hash=2)


def test_reading_every_key_costs_its_softmax_not_more():
    """A sanity check of the scale of the separate-QK scores: 1/sqrt(head_dim), as the model's own attention."""
    q, k, v = torch.randn(1, 1, 6, 4), torch.randn(1, 1, 6, 4), torch.randn(1, 1, 6, 4)
    qb = torch.zeros(1, 1, 1, 6, dtype=torch.long)
    got = lsh_attention(q, k, v, qb, qb, bucket_size=8)
    torch.testing.assert_close(got, attention_reference(q, k, v).float(), rtol=1e-5, atol=1e-6)
    assert math.isclose(1 / math.sqrt(4), 0.5)


@pytest.mark.parametrize("name", ["llama", "roberta"])
def test_convert_cli_to_reformer_matches_patch_and_reloads(name, tmp_path, capsys):
    from attnzoo.cli import main

    src, dst = tmp_path / "src", tmp_path / "dst"
    model, inputs = TINY[name].make()
    model.save_pretrained(src)
    assert main(["convert", str(src), str(dst), "--to", "reformer", "--num-hashes", "2", "--bucket-size", "4",
                 "--num-buckets", "4", "--seed", "5", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "reformer" in out and "num_hashes=2" in out
    record = __import__("json").loads((dst / "config.json").read_text())["attnzoo"]
    assert record["options"]["bucket_size"] == 4 and record["options"]["seed"] == 5
    attnzoo.patch(model, "reformer", num_hashes=2, bucket_size=4, num_buckets=4, seed=5)
    torch.testing.assert_close(run(attnzoo.from_pretrained(dst).eval(), inputs), run(model, inputs))


def test_a_converted_checkpoint_uptrains_and_reloads_as_reformer(tmp_path):
    """The usual uptraining after the conversion: `attnzoo uptrain` on a reformer checkpoint trains through the LSH
    op and writes a checkpoint that still reloads as reformer."""
    from tinylm import pretrained_tiny

    from attnzoo.uptrain import UptrainOptions, uptrain

    tiny = pretrained_tiny(tmp_path / "tiny", steps=2)
    src = tf.AutoModelForCausalLM.from_pretrained(str(tiny))
    attnzoo.patch(src, "reformer", num_hashes=2, bucket_size=8)
    src.save_pretrained(tmp_path / "conv")
    r = uptrain(UptrainOptions(model=str(tmp_path / "conv"), out=str(tmp_path / "up"), tokens=3 * 2 * 32,
                               batch_size=2, seq_len=32, lr=3e-3, progress=False, cpu=True))
    assert r.steps == 3 and all(math.isfinite(e["loss"]) for e in r.log)
    again = attnzoo.from_pretrained(tmp_path / "up")
    spec = again.model.layers[0].self_attn.attnzoo_pattern
    assert (spec.num_hashes, spec.bucket_size, spec.causal) == (2, 8, True)


@pytest.mark.parametrize("causal", [False, True])
def test_local_round_adds_a_round_of_consecutive_chunks(causal):
    """local_round=True: one more round where every token shares one bucket (chunks of consecutive positions),
    against the float64 reference; with num_hashes rounds of one bucket too, the whole is exact attention."""
    from oracle import reformer_reference

    m = _module(causal=causal, shared_qk=False, bucket_size=4, local_round=True)
    x = torch.randn(2, 13, 32, dtype=torch.float64)
    kpm = torch.ones(2, 13, dtype=torch.bool)
    kpm[1, 11:] = False
    q = m.q_proj(x).view(2, 13, 2, 16).transpose(1, 2)
    qb, _ = m.buckets(q, m.k_proj(x).view(2, 13, 2, 16).transpose(1, 2), 4)
    assert qb.shape[2] == 3 and bool((qb[:, :, 2] == 0).all())
    torch.testing.assert_close(m(x, key_padding_mask=kpm), reformer_reference(m, x, key_padding_mask=kpm))
    assert m.config.kv_layout().latent == 2 * 3 * 2
