"""attnzoo.ops.sparse.launch: Triton launches through the compiled kernel (the direct path) and its fallbacks.

The direct path needs CUDA (tests marked gpu); on CPU only when it is off is checked.
"""
import pytest
import torch

from attnzoo.ops.sparse import launch as L


def test_direct_launch_off_under_the_interpreter_and_by_switch(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not L._fast_enabled()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("ATTNZOO_TRITON_FAST_LAUNCH", "0")
    assert not L._fast_enabled()


def test_the_signature_tells_apart_what_selects_a_compiled_kernel():
    """Tensors by dtype and 16-byte alignment (not address or shape), TMA descriptors by block, shape and strides,
    scalars by value."""
    td = pytest.importorskip("triton.tools.tensor_descriptor")
    x = torch.zeros(64, 64, dtype=torch.bfloat16)
    d = td.TensorDescriptor.from_tensor
    key = L._args_key
    assert key((x, 3, 0.5)) == key((torch.ones(8, 8, dtype=torch.bfloat16), 3, 0.5))
    assert key((x, 3)) != key((x.float(), 3)) and key((x, 3)) != key((x.view(-1)[1:], 3)) != key((x, 4))
    assert key((d(x, [16, 64]),)) == key((d(x.clone(), [16, 64]),))
    assert key((d(x, [16, 64]),)) != key((d(x, [32, 64]),))
    assert key((d(x, [16, 64]),)) != key((d(x[:32], [16, 64]),))


def _band(q, k, v):
    from attnzoo.ops import sparse_attention
    from attnzoo.ops.sparse import SlidingWindow

    return sparse_attention(q, k, v, SlidingWindow(window=100), backend="triton")


def _entries():
    return {sig: e for sig, e in L._compiled.items() if e}


@pytest.mark.gpu
def test_direct_launch_runs_the_kernel_triton_compiled_for_that_signature():
    """Same signature: the second call goes through the compiled kernel and gives the same bits. A pointer that
    is not 16-byte aligned is another signature: Triton's path first (its own specialization), then direct."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    q, k, v = (torch.randn(1, 4, 1000, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    L._compiled.clear()
    first = _band(q, k, v)
    n = len(_entries())
    assert n >= 1
    again = _band(q, k, v)
    assert torch.equal(first, again) and len(_entries()) == n  # served by the entries of the first call
    buf = torch.empty(q.numel() + 1, device="cuda", dtype=q.dtype)
    q1 = buf[1:].view_as(q).copy_(q)  # 2-byte offset: not 16-byte aligned
    assert q1.data_ptr() % 16 != 0
    for _ in range(2):
        assert torch.equal(_band(q1, k, v), first)
    assert len(_entries()) > n


@pytest.mark.gpu
def test_a_failing_direct_launch_warns_once_and_falls_back(monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    q, k, v = (torch.randn(1, 4, 700, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    want = _band(q, k, v)
    _band(q, k, v)

    class Broken:
        function = packed_metadata = None

        def run(self, *a):
            raise TypeError("launcher signature changed")

    monkeypatch.setitem(L._state, "fast", True)
    for sig, (compiled, tail) in list(_entries().items()):
        monkeypatch.setitem(L._compiled, sig, (Broken(), tail))
    with pytest.warns(RuntimeWarning, match="ATTNZOO_TRITON_FAST_LAUNCH=0"):
        got = _band(q, k, v)
    assert torch.equal(got, want) and not L._state["fast"]


def test_a_triton_launch_hook_turns_the_direct_path_off(monkeypatch):
    pytest.importorskip("triton")
    from triton import knobs

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv("ATTNZOO_TRITON_FAST_LAUNCH", raising=False)
    assert L._fast_enabled()  # nothing hooked

    def hook(*a):
        return None

    knobs.runtime.launch_enter_hook.add(hook)
    try:
        assert not L._fast_enabled()
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    assert not L._hooked(None) and L._hooked(hook)
