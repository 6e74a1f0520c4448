"""One cache protocol for every kind of layer state: full K/V, rolling window, latent (MLA), recurrent state
(linear attention). Each holds what its KVLayout says, decoding with it equals the full computation, and the
state cache does not grow with the sequence."""
import math

import pytest
import torch

from attnzoo.kv import KVLayout
from attnzoo.variants import KVCache, LatentCache, RollingKVCache, StateCache


def _held(cache, dtype=torch.float32) -> int:
    """Bytes the layout says the cache holds after cache.seq_len tokens (batch 1)."""
    return cache.layout().nbytes(cache.seq_len, dtype)


def test_kv_and_rolling_caches_hold_their_layout():
    kv, roll = KVCache(min_capacity=4), RollingKVCache(window=5)
    for n in (3, 1, 1, 7, 1):
        k, v = torch.randn(1, 2, n, 8), torch.randn(1, 2, n, 8)
        kv.update(k, v)
        roll.update(k, v)
    assert kv.layout() == KVLayout(2, 8) and roll.layout() == KVLayout(2, 8, window=5)
    assert _held(kv) == 13 * 2 * 2 * 8 * 4 <= kv.nbytes() <= 2 * _held(kv)
    assert _held(roll) == 5 * 2 * 2 * 8 * 4 <= roll.nbytes() <= 2 * _held(roll)


def test_latent_cache_decoding_equals_full_attention():
    """A toy MLA layer: K and V are expanded from the cached latent, K's rope part is the cached shared key.
    Decoding token by token over the LatentCache gives the full causal attention's outputs."""
    torch.manual_seed(0)
    b, n, heads, rank, rope, nope, dv = 2, 9, 3, 6, 4, 5, 7
    c, kr = torch.randn(b, n, rank, dtype=torch.float64), torch.randn(b, n, rope, dtype=torch.float64)
    q = torch.randn(b, heads, n, nope + rope, dtype=torch.float64)
    w_k, w_v = torch.randn(heads, rank, nope, dtype=torch.float64), torch.randn(heads, rank, dv, dtype=torch.float64)

    def attend(qi, latents, rope_keys):
        k = torch.cat([torch.einsum("bsr,hrd->bhsd", latents, w_k), rope_keys[:, None].expand(-1, heads, -1, -1)], -1)
        v = torch.einsum("bsr,hrd->bhsd", latents, w_v)
        return torch.softmax(qi @ k.transpose(-1, -2) / math.sqrt(nope + rope), -1) @ v

    full = torch.cat([attend(q[:, :, i:i + 1], c[:, :i + 1], kr[:, :i + 1]) for i in range(n)], 2)
    cache = LatentCache(min_capacity=2)
    steps = [attend(q[:, :, i:i + 1], *cache.update(c[:, i:i + 1], kr[:, i:i + 1])) for i in range(n)]
    torch.testing.assert_close(torch.cat(steps, 2), full, rtol=1e-12, atol=1e-12)
    assert cache.seq_len == n and cache.layout() == KVLayout(latent=rank + rope)
    assert cache.layout().nbytes(n, torch.float64) * b == (rank + rope) * n * 8 * b <= cache.nbytes()
    with pytest.raises(ValueError, match="latent \\[batch, seq, kv_rank\\]"):
        cache.update(c[:, :1, None], kr[:, :1])


def test_state_cache_linear_attention_decoding_and_constant_size():
    """Causal linear attention with phi = elu + 1: the recurrent state after each token gives the same outputs
    as the quadratic form; the state's bytes are the same at 1k and 8k tokens."""
    torch.manual_seed(0)
    b, h, d = 1, 2, 4

    def phi(x):
        return torch.nn.functional.elu(x) + 1

    def run(n):
        q, k, v = (torch.randn(b, h, n, d, dtype=torch.float64) for _ in range(3))
        a = torch.tril(phi(q) @ phi(k).transpose(-1, -2))
        full = (a @ v) / a.sum(-1, keepdim=True)
        cache, outs = StateCache(), []
        for i in range(n):
            s, z = cache.state() or (torch.zeros(b, h, d, d, dtype=torch.float64),
                                     torch.zeros(b, h, d, dtype=torch.float64))
            fk = phi(k[:, :, i])
            s, z = s + fk[..., :, None] * v[:, :, i, None, :], z + fk
            fq = phi(q[:, :, i])
            outs.append(torch.einsum("bhf,bhfd->bhd", fq, s) / torch.einsum("bhf,bhf->bh", fq, z)[..., None])
            cache.advance((s, z), 1)
        return torch.stack(outs, 2), full, cache

    got, want, _ = run(33)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    sizes = []
    for n in (1024, 8192):
        cache = StateCache()
        s, z = torch.zeros(b, h, d, d), torch.zeros(b, h, d)
        for _ in range(n // 512):
            cache.advance((s, z), 512)
        assert cache.seq_len == n and cache.layout() == KVLayout(state=h * d * d + h * d)
        sizes.append((cache.nbytes(), cache.layout().nbytes(n, torch.float32)))
    assert sizes[0] == sizes[1]
    with pytest.raises(ValueError, match="StateCache holds states of shapes"):
        cache.advance((torch.zeros(b, h, d, 3), z), 1)


def test_reset_and_shape_checks():
    kv = KVCache()
    kv.update(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4))
    with pytest.raises(ValueError, match="call reset"):
        kv.update(torch.randn(2, 2, 1, 4), torch.randn(2, 2, 1, 4))
    kv.reset()
    assert kv.seq_len == 0 and kv.nbytes() == 0 and kv.layout() == KVLayout()
    kv.update(torch.randn(2, 2, 1, 4), torch.randn(2, 2, 1, 4))
    assert kv.seq_len == 1


def test_kv_cache_keeps_gradients_under_autograd():
    kv = KVCache()
    k = torch.randn(1, 1, 2, 3, requires_grad=True)
    keys, _ = kv.update(k, torch.randn(1, 1, 2, 3))
    keys2, _ = kv.update(torch.randn(1, 1, 1, 3), torch.randn(1, 1, 1, 3))
    keys2.sum().backward()
    assert k.grad is not None and torch.equal(k.grad, torch.ones_like(k))
