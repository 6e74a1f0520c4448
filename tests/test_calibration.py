"""The calibration pass (attnzoo.conversion.calibration): statistics equal a direct computation, do not depend on
the order of the batches, and merge by addition."""
from __future__ import annotations

import pytest
import torch

from attnzoo.conversion.calibration import Calibration, calibrate, calibration_ids, gather_statistics
from attnzoo.patches.walker import attention_sites

from hf_tiny import TINY


def _direct(model, site, ids):
    """q/k/v/o-input second moments from the projection modules' own inputs and outputs (no attnzoo code)."""
    got = {}
    m = site.module
    hooks = [getattr(m, n).register_forward_hook(lambda mod, a, out, n=n: got.setdefault(n, []).append(out))
             for n in ("q_proj", "k_proj", "v_proj")]
    hooks.append(m.o_proj.register_forward_hook(lambda mod, a, out: got.setdefault("o", []).append(a[0])))
    hooks.append(m.q_proj.register_forward_hook(lambda mod, a, out: got.setdefault("x", []).append(a[0])))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()
    hd = site.head_dim

    def cat(n):
        return torch.cat([t.reshape(-1, t.shape[-1]) for t in got[n]]).double()

    def per_head(t):
        t = t.reshape(t.shape[0], -1, hd).transpose(0, 1)
        return t.transpose(1, 2) @ t

    k, v = cat("k_proj"), cat("v_proj")
    x = torch.cat([cat("x"), torch.ones(k.shape[0], 1, dtype=torch.float64)], 1)
    return {"q": per_head(cat("q_proj")), "k": k.T @ k, "v": v.T @ v, "o_in": per_head(cat("o")), "x": x.T @ x,
            "count": k.shape[0]}


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_statistics_equal_a_direct_computation(name):
    torch.manual_seed(0)
    model, _ = TINY[name].make()
    _, sites = attention_sites(model)
    ids = torch.randint(3, 97, (5, 11))
    stats = gather_statistics(model, sites, ids, batch_size=2, inputs=True, progress=False)
    for site in sites:
        want, got = _direct(model, site, ids), stats[site.fqn]
        assert got.count == want["count"] == 55
        for field in ("q", "k", "v", "o_in", "x"):
            torch.testing.assert_close(getattr(got, field), want[field], rtol=1e-5, atol=1e-6)
        # moments of any linear map follow from the input moments
        w = site.read()
        torch.testing.assert_close(got.moment_of(w.k, w.k_bias), got.key_moment(), rtol=1e-5, atol=1e-6)
    assert not any(m._forward_pre_hooks for m in model.modules())  # hooks removed


def test_order_of_batches_and_merging():
    torch.manual_seed(1)
    model, _ = TINY["llama"].make()
    _, sites = attention_sites(model)
    ids = torch.randint(3, 97, (6, 9))
    a = gather_statistics(model, sites, ids, batch_size=2, progress=False)
    b = gather_statistics(model, sites, ids.flip(0), batch_size=3, progress=False)
    first = gather_statistics(model, sites, ids[:4], batch_size=4, progress=False)
    rest = gather_statistics(model, sites, ids[4:], batch_size=1, progress=False)
    for s in sites:
        merged = rest[s.fqn].merge(first[s.fqn])
        for other in (b[s.fqn], merged):
            assert other.count == a[s.fqn].count
            for field in ("q", "k", "v", "o_in"):
                torch.testing.assert_close(getattr(other, field), getattr(a[s.fqn], field), rtol=1e-10, atol=1e-10)


def test_key_pair_covariance_is_rope_invariant():
    """E[z_i conj(z_j)] per frequency pair equals the same moment of the keys after any RoPE rotation."""
    torch.manual_seed(2)
    model, _ = TINY["llama"].make()
    _, sites = attention_sites(model)
    ids = torch.randint(3, 97, (2, 7))
    st = gather_statistics(model, sites[:1], ids, progress=False)[sites[0].fqn]
    hd, kv = st.head_dim, st.kv_heads
    a, b = list(range(hd // 2)), list(range(hd // 2, hd))
    c = st.key_pair_covariance(a, b)
    # direct: keys of the first layer, rotated by a random angle per token and pair (same for every head)
    keys = []
    h = sites[0].module.k_proj.register_forward_hook(lambda m, i, o: keys.append(o))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    h.remove()
    k = keys[0].reshape(-1, kv, hd).double()
    z = torch.complex(k[..., a], k[..., b]) * torch.exp(1j * torch.rand(k.shape[0], 1, hd // 2, dtype=torch.float64)
                                                        * 6.28)
    want = torch.einsum("nip,njp->pij", z, z.conj()) / z.shape[0]
    torch.testing.assert_close(c, want, rtol=1e-6, atol=1e-8)


def test_calibration_data_and_errors(tmp_path):
    ids = calibration_ids(None, 3, 16)
    assert ids.shape == (3, 16)
    f = tmp_path / "c.ids"
    f.write_text(" ".join(str(i % 50 + 3) for i in range(100)))
    assert calibration_ids(str(f), 10, 30).shape == (3, 30)  # the file holds 3 rows of 30
    with pytest.raises(FileNotFoundError, match="calib="):
        calibration_ids(str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="calib_sequences"):
        calibration_ids(None, 0, 16)
    model, _ = TINY["llama"].make()
    _, sites = attention_sites(model)
    cal = calibrate(model, sites, str(f), 2, 20, progress=False)
    assert isinstance(cal, Calibration) and cal.tokens == 40 and cal.of(sites[0].fqn).count == 40
    with pytest.raises(KeyError, match="no calibration statistics"):
        cal.of("nowhere")


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_mixed_values_equal_eager_attention(name):
    """v_mix: every KV head's values mixed by each query head's attention probabilities (from transformers' eager
    attention), summed per KV head."""
    torch.manual_seed(3)
    model, _ = TINY[name].make()
    model.config._attn_implementation = "eager"
    _, sites = attention_sites(model)
    ids = torch.randint(3, 97, (2, 10))
    stats = gather_statistics(model, sites, ids, mixed_values=True, progress=False)
    values = []
    hooks = [s.module.v_proj.register_forward_hook(lambda m, i, o: values.append(o)) for s in sites]
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=False, output_attentions=True)
    for h in hooks:
        h.remove()
    for site, probs, v in zip(sites, out.attentions, values):
        st = stats[site.fqn]
        mixed = (probs.double() @ v.double().unsqueeze(1))  # [b, heads, t, kv*hd]
        qpk = st.heads // st.kv_heads
        mixed = mixed.reshape(2, st.kv_heads, qpk, 10, -1).transpose(0, 1).reshape(st.kv_heads, -1, mixed.shape[-1])
        torch.testing.assert_close(st.v_mix, mixed.transpose(1, 2) @ mixed, rtol=1e-4, atol=1e-5)
