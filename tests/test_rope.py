"""RoPE against Hugging Face's rotate-half implementation and the interleaved convention."""
import pytest
import torch

from attnzoo.ops import apply_rope, inv_frequencies, rope_cos_sin


def test_half_style_matches_transformers_llama():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    q, k = torch.randn(2, 3, 7, 16, dtype=torch.float64), torch.randn(2, 3, 7, 16, dtype=torch.float64)
    pos = torch.arange(7)
    cos, sin = rope_cos_sin(pos, inv_frequencies(16, 10000.0), "half", torch.float64)
    hq, hk = apply_rotary_pos_emb(q, k, cos[None], sin[None])
    torch.testing.assert_close(apply_rope(q, cos, sin, "half"), hq)
    torch.testing.assert_close(apply_rope(k, cos, sin, "half"), hk)


def test_interleaved_is_half_under_a_permutation():
    d = 8
    x = torch.randn(1, 2, 5, d, dtype=torch.float64)
    perm = torch.tensor([0, 2, 4, 6, 1, 3, 5, 7])  # interleaved pair (2i, 2i+1) -> half pair (i, i+4)
    cos_i, sin_i = rope_cos_sin(torch.arange(5), inv_frequencies(d), "interleaved", torch.float64)
    cos_h, sin_h = rope_cos_sin(torch.arange(5), inv_frequencies(d), "half", torch.float64)
    got = apply_rope(x, cos_i, sin_i, "interleaved")[..., perm]
    torch.testing.assert_close(got, apply_rope(x[..., perm], cos_h, sin_h, "half"))


@pytest.mark.parametrize("style", ["half", "interleaved"])
def test_partial_rotary_leaves_the_rest_and_keeps_norms(style):
    x = torch.randn(2, 2, 6, 12, dtype=torch.float64)
    cos, sin = rope_cos_sin(torch.arange(6), inv_frequencies(4), style, torch.float64)
    y = apply_rope(x, cos, sin, style)
    torch.testing.assert_close(y[..., 4:], x[..., 4:])
    torch.testing.assert_close(y[..., :4].norm(dim=-1), x[..., :4].norm(dim=-1))


def test_relative_position_property():
    """<R(m) q, R(n) k> depends only on m - n."""
    q, k = torch.randn(16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    inv = inv_frequencies(16)

    def rot(x, p):
        c, s = rope_cos_sin(torch.tensor([p]), inv, "half", torch.float64)
        return apply_rope(x.view(1, 1, 1, 16), c, s, "half").flatten()

    a = rot(q, 5) @ rot(k, 2)
    b = rot(q, 13) @ rot(k, 10)
    torch.testing.assert_close(a, b)
