"""MLA's absorbed decode step without host syncs: a static ``transformers`` cache (what CUDA graphs and
``torch.compile`` decode with), no tensor value read on the host by attnzoo's code during a decode step, and on a
GPU the step captured in a CUDA graph, replayed, and compared with eager."""
import copy
import gc
import inspect

import pytest
import torch
import transformers as tf

import attnzoo
from attnzoo.ops.mla import last_latent_decision, latent_attention, use_latent_backend
from attnzoo.patches.hf import mla as hf_mla
from attnzoo.patches.hf import wrapper

from test_mla import _deepseek_config

DEV = "cuda" if torch.cuda.is_available() else "cpu"
#: what reading a tensor's value on the host goes through (``.item()``, ``bool(t)``, ``int(t)``, ``.tolist()``)
HOST_READS = ("aten._local_scalar_dense", "aten.is_nonzero", "aten.item", "aten.equal")


def _model(impl: str = "sdpa", layers: int = 2, dtype=torch.float32, device=DEV):
    torch.manual_seed(0)
    cfg = _deepseek_config(None, layers=layers)
    cfg._attn_implementation = impl
    model = tf.DeepseekV3ForCausalLM(cfg).eval()
    for name, p in model.named_parameters():  # larger attention weights than the init: a sharper test
        if "self_attn" in name and name.endswith("weight") and "norm" not in name:
            torch.nn.init.normal_(p, std=0.2)
    return model.to(device, dtype)


def _step_kwargs(model, pos: torch.Tensor) -> dict:
    """Positions of a step as this transformers version takes them (``cache_position`` where it still exists)."""
    kw = {"position_ids": pos[None].expand(1, -1)}
    if "cache_position" in inspect.signature(model.forward).parameters:
        kw["cache_position"] = pos
    return kw


def _static(model, batch: int, max_len: int):
    return tf.StaticCache(config=model.config, max_cache_len=max_len)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("padded", [False, True])
def test_static_cache_decode_equals_full_recomputation(impl, padded):
    """A patched DeepSeek-V3 decoding into a ``StaticCache`` (the whole buffer comes back from every update; the
    mask says what is filled) gives transformers' logits without a cache, on the split-KV kernel (Triton's
    interpreter on CPU) and on the dense fallback."""
    hf = _model(impl)
    ours = copy.deepcopy(hf)
    attnzoo.patch(ours, "mla")
    ids = torch.randint(3, 97, (2, 6), device=DEV)
    mask = torch.ones(2, 10, dtype=torch.long, device=DEV)
    if padded:
        mask[1, :2] = 0
    key = attnzoo.hf_compat.model_cache_kwarg(ours)
    for backend in ("triton", "dense"):
        cache = _static(ours, 2, 16)
        with torch.no_grad():
            seq = ids
            out = ours(input_ids=ids, attention_mask=mask[:, :6] if padded else None, use_cache=True,
                       **{key: cache}, **_step_kwargs(ours, torch.arange(6, device=DEV)))
            want = hf(input_ids=ids, attention_mask=mask[:, :6] if padded else None).logits
            torch.testing.assert_close(out.logits[1, 2:], want[1, 2:], rtol=1e-4, atol=1e-4)  # the prefill too
            for t in range(6, 10):
                nxt = out.logits[:, -1:].argmax(-1)
                seq = torch.cat([seq, nxt], 1)
                with use_latent_backend(backend):
                    out = ours(input_ids=nxt, attention_mask=mask[:, :t + 1] if padded else None, use_cache=True,
                               **{key: cache}, **_step_kwargs(ours, torch.tensor([t], device=DEV)))
                assert last_latent_decision().backend == backend
                want = hf(input_ids=seq, attention_mask=mask[:, :t + 1] if padded else None).logits[:, -1]
                rows = [1] if padded else [0, 1]  # a left-padded row's logits are compared past its padding
                torch.testing.assert_close(out.logits[rows, -1], want[rows], rtol=1e-4, atol=1e-4)
        layer = cache.layers[0]
        assert tuple(layer.keys.shape) == (2, 1, 16, 8) and tuple(layer.values.shape) == (2, 1, 16, 4)


def test_a_static_sliding_layer_is_refused_with_its_name():
    class Sliding:
        is_compileable, is_sliding, max_cache_len = True, True, 8

    class FakeCache:
        layers = [Sliding()]

    with pytest.raises(ValueError, match="static sliding-window"):
        hf_mla.HFLatentCacheView(FakeCache(), 0)


class _HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every op that reads a tensor's value on the host."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(name in str(func) for name in HOST_READS):
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
def test_a_decode_step_of_the_patched_attention_reads_no_tensor_on_the_host(cache_kind, monkeypatch):
    """Every ``HFMLAAttention`` call of a decode step (the HF glue, the latent cache update, the masks, the
    dispatcher, the split plan, the kernel launch) runs without reading a tensor value on the host, as inside a
    CUDA-graph capture (simulated: attnzoo's capture check answers True). transformers' own code around the
    attention (its mask building) is not attnzoo's and is left out: the mode wraps the attention modules only."""
    model = _model("eager")  # float additive masks: the mask check that reads the GPU in eager mode
    attnzoo.patch(model, "mla")
    key = attnzoo.hf_compat.model_cache_kwarg(model)
    ids = torch.randint(3, 97, (2, 6), device=DEV)
    mask = torch.ones(2, 7, dtype=torch.long, device=DEV)
    mask[1, :2] = 0
    cache = _static(model, 2, 12) if cache_kind == "static" else None
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask[:, :6], use_cache=True, **({key: cache} if cache else {}),
                    **_step_kwargs(model, torch.arange(6, device=DEV)))
        cache = attnzoo.hf_compat.output_cache(out)
        spy = _HostReads()
        original = hf_mla.HFMLAAttention.forward

        def watched(self, *args, **kwargs):
            with spy:
                return original(self, *args, **kwargs)
        monkeypatch.setattr(hf_mla.HFMLAAttention, "forward", watched)
        monkeypatch.setattr(wrapper, "_capturing_or_compiling", lambda: True)
        with use_latent_backend("triton"):
            model(input_ids=ids[:, -1:], attention_mask=mask, use_cache=True, **{key: cache},
                  **_step_kwargs(model, torch.tensor([6], device=DEV)))
    assert last_latent_decision().backend == "triton"
    assert spy.seen == []


# ------------------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype,s", [(torch.bfloat16, 8192), (torch.float32, 4096)])
def test_latent_attention_decode_is_captured_in_a_cuda_graph(dtype, s):
    """One ``latent_attention`` decode call (DeepSeek widths; bf16 at 4 x 8k cached tokens: large enough for the
    first eager call to tune, float32 on the heuristic) captured after that eager call, replayed on new input
    values, equals eager on those values and the float64 reference."""
    from attnzoo.ops.mla import latent_attention_reference

    b, h, r, dr = 4, 32, 512, 64
    g = torch.Generator(device="cuda").manual_seed(0)

    def fresh():
        return (torch.randn(b, h, 1, r, device="cuda", generator=g, dtype=dtype) / 4,
                torch.randn(b, h, 1, dr, device="cuda", generator=g, dtype=dtype),
                torch.randn(b, s, r, device="cuda", generator=g, dtype=dtype),
                torch.randn(b, s, 1, dr, device="cuda", generator=g, dtype=dtype))
    static = fresh()
    kpm = torch.ones(b, s, dtype=torch.bool, device="cuda")
    kpm[1, : s // 3] = False
    scale = 192 ** -0.5
    with torch.no_grad():
        latent_attention(*static, scale=scale, key_padding_mask=kpm)  # eager first: the tuner runs here
        assert last_latent_decision().backend == "triton"
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = latent_attention(*static, scale=scale, key_padding_mask=kpm)
        new = fresh()
        for dst, src in zip(static, new):
            dst.copy_(src)
        graph.replay()
        torch.cuda.synchronize()
        eager = latent_attention(*new, scale=scale, key_padding_mask=kpm)
        assert torch.equal(out, eager)
        ref = latent_attention_reference(*(t.double() for t in new), scale=scale, key_padding_mask=kpm)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())


def _snapshot(cache):
    return [{k: v.clone() for k, v in vars(layer).items() if isinstance(v, torch.Tensor)} for layer in cache.layers]


def _restore(cache, snap):
    for layer, saved in zip(cache.layers, snap):
        for k, v in saved.items():
            getattr(layer, k).copy_(v)


def _capture_step(model, cache, tok, pos):
    """Warm up one eager decode step (side stream, as torch's docs do), then capture one."""
    key = attnzoo.hf_compat.model_cache_kwarg(model)
    snap = _snapshot(cache)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        model(input_ids=tok, use_cache=True, **{key: cache}, **_step_kwargs(model, pos))
    torch.cuda.current_stream().wait_stream(side)
    _restore(cache, snap)
    torch.cuda.synchronize()
    gc.collect()  # not inside the capture (see attnzoo.bench.timing.gpu_ms)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        logits = model(input_ids=tok, use_cache=True, **{key: cache}, **_step_kwargs(model, pos)).logits
    _restore(cache, snap)
    return graph, logits


@pytest.mark.gpu
def test_deepseek_v3_decode_step_with_a_static_cache_is_captured_in_a_cuda_graph():
    """One decode step of a tiny DeepSeek-V3 patched with ``attnzoo.patch(model, "mla")``, with a ``StaticCache``,
    captured in a CUDA graph and replayed: the same logits as the eager step from the same cache state, on the
    split-KV kernel. transformers' own model is captured the same way first: if its step cannot be captured on this
    transformers version, the test says so and skips."""
    hf = _model("sdpa", dtype=torch.bfloat16, device="cuda")
    ours = copy.deepcopy(hf)
    attnzoo.patch(ours, "mla")
    key = attnzoo.hf_compat.model_cache_kwarg(ours)
    ids = torch.randint(3, 97, (2, 6), device="cuda")
    tok = torch.randint(3, 97, (2, 1), device="cuda")
    pos = torch.tensor([6], device="cuda")
    with torch.no_grad():
        cache_hf = _static(hf, 2, 32)
        hf(input_ids=ids, use_cache=True, **{key: cache_hf}, **_step_kwargs(hf, torch.arange(6, device="cuda")))
        try:
            _capture_step(hf, cache_hf, tok, pos)
        except Exception as e:  # noqa: BLE001 - transformers' own step, not attnzoo's
            pytest.skip(f"transformers {tf.__version__}: its own static-cache decode step does not capture: {e}")
        cache = _static(ours, 2, 32)
        ours(input_ids=ids, use_cache=True, **{key: cache}, **_step_kwargs(ours, torch.arange(6, device="cuda")))
        graph, logits = _capture_step(ours, cache, tok, pos)
        snap = _snapshot(cache)
        eager = ours(input_ids=tok, use_cache=True, **{key: cache}, **_step_kwargs(ours, pos)).logits.clone()
        assert last_latent_decision().backend == "triton"
        _restore(cache, snap)
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(logits, eager, rtol=2e-2, atol=2e-2)
        want = hf(input_ids=torch.cat([ids, tok], 1)).logits[:, -1:]
        torch.testing.assert_close(logits.float(), want.float(), rtol=5e-2, atol=5e-2)


@pytest.mark.gpu
def test_deepseek_v3_decode_step_makes_no_host_sync():
    """``torch.cuda.set_sync_debug_mode("error")`` around eager decode steps of the patched model (dynamic cache,
    as the generate benchmark runs it): no synchronizing CUDA call. transformers' own step is checked first (its
    syncs are not attnzoo's: then the test skips)."""
    hf = _model("sdpa", dtype=torch.bfloat16, device="cuda")
    ours = copy.deepcopy(hf)
    attnzoo.patch(ours, "mla")
    key = attnzoo.hf_compat.model_cache_kwarg(ours)
    ids = torch.randint(3, 97, (4, 300), device="cuda")
    with torch.no_grad():
        for model, label in ((hf, "transformers"), (ours, "attnzoo")):
            cache = attnzoo.hf_compat.output_cache(model(input_ids=ids, use_cache=True))
            tok = ids[:, -1:]
            model(input_ids=tok, use_cache=True, **{key: cache})  # the first step of a shape tunes (it may sync)
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                model(input_ids=tok, use_cache=True, **{key: cache})
            except RuntimeError as e:
                if label == "transformers":
                    pytest.skip(f"transformers {tf.__version__}: its own decode step syncs: {e}")
                raise
            finally:
                torch.cuda.set_sync_debug_mode(0)
    assert last_latent_decision().backend == "triton"


@pytest.mark.gpu
def test_latent_attention_under_torch_compile_with_cuda_graphs():
    """``torch.compile(mode="reduce-overhead")`` (Inductor + CUDA graphs) of a function around ``latent_attention``:
    the kernel is the ``attnzoo::mla_decode`` custom op inside the graph, replays equal eager."""
    b, h, r, dr, s = 2, 16, 512, 64, 3000
    args = (torch.randn(b, h, 1, r, device="cuda", dtype=torch.bfloat16) / 4,
            torch.randn(b, h, 1, dr, device="cuda", dtype=torch.bfloat16),
            torch.randn(b, s, r, device="cuda", dtype=torch.bfloat16),
            torch.randn(b, s, 1, dr, device="cuda", dtype=torch.bfloat16))

    def fn(q, qr, c, kr):
        return latent_attention(q * 1.0, qr, c, kr, scale=0.1, backend="triton") * 2.0

    with torch.no_grad():
        want = fn(*args)
        compiled = torch.compile(fn, mode="reduce-overhead", fullgraph=True)
        for _ in range(3):  # warm-up, record, replay
            got = compiled(*args)
        torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)
