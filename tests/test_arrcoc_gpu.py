"""ARR-COC on CUDA: the fused region-attention backends (varlen flash attention, block-diagonal FlexAttention)
against the float64 reference, the scorers on the GPU, and the plug-ins on a tiny LLaVA on the GPU.

Run on a GPU machine: ``python -m pytest -m gpu -q -rs tests/test_arrcoc_gpu.py``. Skipped without CUDA.
"""
import pytest
import torch

from attnzoo.ops.regions import region_attention, region_attention_reference, region_backend

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

LENGTHS = [[197], [401, 145, 65, 65, 17, 1], [1, 3, 130, 129, 64]]


@pytest.mark.parametrize("lengths", LENGTHS, ids=lambda v: f"{len(v)}regions")
@pytest.mark.parametrize("backend, dtype, causal", [
    ("varlen", torch.bfloat16, False), ("varlen", torch.float16, False), ("flex", torch.bfloat16, False),
    ("flex", torch.bfloat16, True), ("flex", torch.float32, False), ("masked", torch.bfloat16, True)])
@pytest.mark.parametrize("heads", [(16, 16), (8, 2)], ids=["mha", "gqa"])
def test_region_backends_match_float64_fwd_and_bwd(lengths, backend, dtype, causal, heads):
    torch.manual_seed(len(lengths))
    t, d = sum(lengths), 64
    q = torch.randn(1, heads[0], t, d, device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(1, heads[1], t, d, device="cuda", dtype=dtype, requires_grad=True)
    v = torch.randn(1, heads[1], t, d, device="cuda", dtype=dtype, requires_grad=True)
    out = region_attention(q, k, v, lengths, causal=causal, scale=0.11, backend=backend)
    ref = region_attention_reference(q.cpu(), k.cpu(), v.cpu(), lengths, causal=causal, scale=0.11)
    tol = 2e-2 if dtype != torch.float32 else 2e-4
    torch.testing.assert_close(out.float().cpu(), ref.float(), rtol=tol, atol=tol)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    qd, kd, vd = (x.detach().cpu().double().requires_grad_() for x in (q, k, v))
    want = torch.autograd.grad(region_attention_reference(qd, kd, vd, lengths, causal=causal, scale=0.11),
                               (qd, kd, vd), g.cpu().double())
    for a, b in zip(got, want):
        torch.testing.assert_close(a.float().cpu(), b.float(), rtol=5 * tol, atol=5 * tol)


def test_auto_picks_a_fused_backend_on_cuda():
    q = torch.empty(1, 16, 100, 64, device="cuda", dtype=torch.bfloat16)
    assert region_backend(q, q, q) in ("varlen", "flex")
    assert region_backend(q, q, q, causal=True) == "flex"


def test_scorers_and_allocator_on_cuda_match_cpu():
    from attnzoo.arrcoc import RelevanceScorer, TokenBudgetAllocator, texture_array

    torch.manual_seed(0)
    images, feats, query = torch.rand(2, 3, 336, 336), torch.randn(2, 4, 64), torch.randn(2, 64)
    scorer = RelevanceScorer()
    cpu = scorer(texture_array(images), 2, feats, query)
    gpu = scorer.cuda()(texture_array(images.cuda()), 2, feats.cuda(), query.cuda())
    for k in cpu:
        torch.testing.assert_close(gpu[k].cpu(), cpu[k], rtol=1e-4, atol=1e-4)
    alloc = TokenBudgetAllocator(192, tuple(range(16, 145, 16)))
    assert alloc(gpu["relevance"]).sum(1).tolist() == [192, 192]


def test_llava_plugins_on_cuda():
    import attnzoo
    from test_arrcoc_vlm import IMAGE_ID, LEVELS, prompt, tiny_llava

    for dtype in (torch.float32, torch.bfloat16):
        model = tiny_llava().to("cuda", dtype)
        ids, mask, pixels = (t.cuda() for t in prompt())
        pixels = pixels.to(dtype)
        with torch.no_grad():
            ref = model(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits
            attnzoo.patch(model, "arrcoc", budget=64, levels=LEVELS)
            full = model(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits
        tol = 1e-4 if dtype == torch.float32 else 5e-2
        torch.testing.assert_close(full, ref, rtol=tol, atol=tol)
        model.attnzoo_visual_tokens.remove()
        model.__dict__.pop("_attnzoo_patch", None)
        attnzoo.patch(model, "arrcoc", budget=40, levels=LEVELS)
        out = model.generate(input_ids=ids, pixel_values=pixels, attention_mask=mask, max_new_tokens=3,
                             do_sample=False)
        assert (out == IMAGE_ID).sum(1).tolist() == [40, 40]


# ---------------------------------------------------------------------------- host-sync-free paths (CUDA graphs)
def _graphed(fn, *static):
    """Warm ``fn`` up on a side stream, capture it in a CUDA graph; returns (graph, static outputs)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn(*static)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn(*static)
    return g, out


@pytest.mark.parametrize("b, size, grid", [(1, 336, 2), (3, 337, 3)])
def test_scorer_and_allocator_capture_in_a_cuda_graph_and_replay_equal_to_eager(b, size, grid):
    from attnzoo.arrcoc import RelevanceScorer, TokenBudgetAllocator, texture_array

    scorer = RelevanceScorer().cuda()
    alloc = TokenBudgetAllocator(grid * grid * 80, tuple(range(16, 145, 16)))

    def step(images, feats, query):
        s = scorer(texture_array(images, check=False), grid, feats, query)
        return s["relevance"], alloc(s["relevance"])

    images = torch.rand(b, 3, size, size, device="cuda")
    feats, query = torch.randn(b, grid * grid, 64, device="cuda"), torch.randn(b, 64, device="cuda")
    g, (rel, levels) = _graphed(step, images, feats, query)
    for seed in range(3):
        torch.manual_seed(seed)
        images.copy_(torch.rand_like(images))
        feats.copy_(torch.randn_like(feats))
        query.copy_(torch.randn_like(query))
        g.replay()
        want_rel, want_levels = step(images, feats, query)
        torch.testing.assert_close(rel, want_rel)
        assert torch.equal(levels, want_levels)
        assert torch.equal(levels.cpu(), torch.tensor([alloc.allocate(r) for r in rel.double().cpu().tolist()]))
    assert alloc._kernel_error is None, alloc._kernel_error


def test_allocator_kernel_on_cuda_equals_the_python_reference():
    import random

    from test_arrcoc_speed import _random_case

    rng = random.Random(0)
    for _ in range(300):
        alloc, rel = _random_case(rng)
        want = torch.tensor([alloc.allocate(r) for r in rel.double().tolist()])
        assert torch.equal(alloc(rel.cuda()).cpu(), want), (alloc, rel)
        assert alloc._kernel_error is None, alloc._kernel_error  # the Triton kernel ran, not the fallback


@pytest.mark.parametrize("lengths", [[401, 145, 65, 65] * 8, sorted([401, 145, 65, 65] * 8)],
                         ids=["varlen", "grouped"])
def test_region_op_with_a_layout_captures_in_a_cuda_graph(lengths):
    from attnzoo.ops.regions import RegionLayout

    layout = RegionLayout(lengths, "cuda")
    t = sum(lengths)
    q, k, v = (torch.randn(1, 16, t, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    g, out = _graphed(lambda a, b, c: region_attention(a, b, c, layout), q, k, v)
    q.copy_(torch.randn_like(q))
    g.replay()
    torch.testing.assert_close(out, region_attention(q, k, v, layout))
    ref = region_attention_reference(q.cpu(), k.cpu(), v.cpu(), lengths)
    torch.testing.assert_close(out.float().cpu(), ref.float(), rtol=2e-2, atol=2e-2)


def test_plugin_on_cuda_allocates_as_on_cpu_and_encodes_alike():
    from test_arrcoc_vlm import LEVELS, prompt, tiny_llava

    from attnzoo.arrcoc.plugin import ArrcocPlugin

    model = tiny_llava()
    ids, mask, pixels = prompt()
    cpu = ArrcocPlugin(model, budget=40, levels=LEVELS)
    want = cpu.prepare(ids, pixels, mask)
    want_levels = cpu.last["levels"]
    cpu.remove()
    model = model.cuda()
    gpu = ArrcocPlugin(model, budget=40, levels=LEVELS)
    got = gpu.prepare(ids.cuda(), pixels.cuda(), mask.cuda())
    assert torch.equal(gpu.last["levels"].cpu(), want_levels)
    assert torch.equal(got.attention_mask.cpu(), want.attention_mask)
    torch.testing.assert_close(got.inputs_embeds.cpu(), want.inputs_embeds, rtol=1e-4, atol=1e-4)
