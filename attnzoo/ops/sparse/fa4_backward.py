"""The backward of band patterns through FlashAttention-4's local-attention kernel, when it is installed.

``sliding_window`` (and ``longformer`` without global tokens) is FlashAttention's *local* attention:
query ``i`` keeps key ``j`` when ``i - left <= j <= i + right``. FlashAttention-4 (the ``flash-attn-4``
package, imported as ``flash_attn.cute``) has a warp-specialised Hopper backward for it (one kernel that
writes dK/dV and adds dQ in float32 with atomics, FlashAttention-3's design). On an H200 at N=16384,
±256, 12 heads, head_dim 64 it takes 237 µs (its kernel 187 µs plus 47 µs of pre/post-processing),
against 288-298 µs for attnzoo's dQ and dK/dV kernels (``benchmarks/results/sparse-h200.md``). Its forward
is no faster than attnzoo's (98.5 against 98.6 µs; causal 82 against 67), so the forward stays attnzoo's
and only the backward is handed over: it reads the forward's output and log-sum-exp.

Used by the ``triton`` sparse backend's backward when :func:`fa4_backward_reason` returns None at the forward
(which then writes the natural-log LSE this backward reads; the choice holds for that call's backward):

* a band pattern with no global tokens and no key padding;
* float16/bfloat16 on a Hopper GPU (compute capability 9.x, where it was measured), head_dim a multiple
  of 8 up to 256;
* ``torch.are_deterministic_algorithms_enabled()`` is off (the float32 atomics that add dQ make its
  result vary in the last bits from run to run; attnzoo's kernels are deterministic);
* ``ATTNZOO_SPARSE_FA4`` is not ``0`` in the environment;
* ``flash_attn.cute`` imports and has not failed before in this process.

It calls ``flash_attn.cute.interface._flash_attn_bwd``, the function behind FlashAttention-4's own
autograd backward (there is no public backward-only entry point), and was measured with
flash-attn-4 4.0.0b36. If the call raises (another version with another signature, an unsupported
shape), attnzoo warns once, computes this backward with its own kernels and does not try again in
this process. Memory: FlashAttention's backward holds a float32 copy of dQ (twice the bytes of q) on
top of what attnzoo's kernels use. Time: the first backward of each shape signature compiles FlashAttention's
kernels (about 3-6 s on the H200; ``FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1`` keeps them on disk), and its
Python wrapper adds about 0.08 ms of host time per call. Where flash-attn-4 is installed but does not import, one
warning says why.

**Direct calls.** The wrapper's host time (argument checks, compile-key hashing, buffer set-up) is spent again on
every call although nothing changes between calls of one shape. So the first call per *signature* (shapes,
strides, dtype, device, scale, window) goes through the wrapper with its three compile caches watched
(:class:`_Recorder`): that gives the three compiled kernels it ran (preprocess, the backward, the dQ
postprocess) and the arguments it passed them. Later calls of that signature call the same compiled kernels with
the same arguments, the caller's tensors and three fresh float32 buffers (dQ accumulator, ``rowsum(dO * O)``,
base-2 log-sum-exp) in place of the first call's. This is used only with the FlashAttention-4 versions it was
checked against (``_DIRECT_VERSIONS``), without grouped KV heads (their dK/dV take two more postprocess kernels),
and only where the first call's replay reproduced the wrapper's gradients (dK, dV exactly, dQ to bf16 rounding:
its atomics add in any order). ``DIRECT = False`` (or ``ATTNZOO_SPARSE_FA4_DIRECT=0``) always calls the wrapper.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import warnings

import torch

__all__ = ["band_backward_reason", "fa4_backward_reason", "fa4_band_backward", "which_band_backward"]

_state: dict = {}  # "module": the imported interface, or "failed": why it cannot be used in this process
#: Replay FlashAttention-4's compiled kernels after the first call per signature (module docstring).
DIRECT = True
#: flash-attn-4 versions whose wrapper the replay was checked against (on an H200).
_DIRECT_VERSIONS = frozenset({"4.0.0b36"})
_direct: dict = {}  # signature -> _Replay, or a string: why this signature goes through the wrapper
_MAX_DIRECT = 256  # signatures kept; cleared when full


_capabilities: dict = {}


def capability(device: torch.device) -> tuple[int, int]:
    """``torch.cuda.get_device_capability(device)``, cached (it is asked on every call of the op)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    cap = _capabilities.get(index)
    if cap is None:
        cap = _capabilities[index] = torch.cuda.get_device_capability(index)
    return cap


def _interface():
    """``flash_attn.cute.interface``, or None with the reason kept in ``_state["failed"]``."""
    if "module" in _state or "failed" in _state:
        return _state.get("module")
    try:
        from flash_attn.cute import interface
        if not callable(getattr(interface, "_flash_attn_bwd", None)):
            raise ImportError("flash_attn.cute.interface has no _flash_attn_bwd")
    except Exception as e:  # noqa: BLE001 - any import failure (missing package, CUDA toolkit flavour) means "not here"
        _state["failed"] = f"flash_attn.cute does not import ({type(e).__name__}: {str(e)[:200]})"
        if _installed():  # there but broken: say so once (absent: silent, attnzoo's kernels are the default)
            warnings.warn(f"attnzoo: flash-attn-4 is installed but {_state['failed']}; the band backward runs on "
                          "attnzoo's own kernels", RuntimeWarning, stacklevel=4)
        return None
    _state["module"] = interface
    return interface


def _installed() -> bool:
    try:
        return importlib.util.find_spec("flash_attn") is not None
    except (ImportError, ValueError):
        return False


def band_backward_reason(*, band: bool, n_global: int, has_padding: bool, device_type: str,
                         capability: tuple[int, int] | None, dtype: torch.dtype, head_dim: int, lo: int, hi: int,
                         deterministic: bool, env: str | None) -> str | None:
    """Why FlashAttention-4's backward cannot take a call with these facts (None: it can). Pure, for tests."""
    if env == "0":
        return "ATTNZOO_SPARSE_FA4=0"
    if not band or n_global:
        return "not a pure band pattern (global tokens, or a listed layout)"
    if has_padding:
        return "key padding (FlashAttention's local attention takes none here)"
    if device_type != "cuda":
        return f"device {device_type} (needs CUDA)"
    if capability is None or capability[0] != 9:
        return f"compute capability {capability} (used on 9.x, where it was measured)"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {dtype} (needs float16 or bfloat16)"
    if head_dim % 8 or not 8 <= head_dim <= 256:
        return f"head_dim {head_dim} (needs a multiple of 8 in 8..256)"
    if lo > 0 or hi < 0:
        return f"band {lo}..{hi} does not hold the diagonal"
    if deterministic:
        return "torch.use_deterministic_algorithms is on (its dQ adds with float32 atomics)"
    return None


def fa4_backward_reason(q: torch.Tensor, *, band: bool, n_global: int, lo: int, hi: int,
                        has_padding: bool) -> str | None:
    """None when :func:`fa4_band_backward` serves the backward of this call (see the module docstring), else
    why not. ``band``: the kernels walk a band of keys ``lo <= j - i <= hi`` (plus ``n_global`` global keys)."""
    cuda = q.device.type == "cuda"
    why = band_backward_reason(
        band=band, n_global=n_global, has_padding=has_padding, device_type=q.device.type,
        capability=capability(q.device) if cuda else None, dtype=q.dtype,
        head_dim=q.shape[-1], lo=lo, hi=hi, deterministic=torch.are_deterministic_algorithms_enabled(),
        env=os.environ.get("ATTNZOO_SPARSE_FA4"))
    if why is None and _interface() is None:
        why = _state["failed"]
    return why


def which_band_backward(q: torch.Tensor, pattern, key_padding_mask: torch.Tensor | None = None) -> str:
    """Which backward the ``triton`` sparse backend runs for ``pattern`` on inputs like ``q`` (``[B, H, N, D]``):
    ``"flash_attn.cute"``, or ``"attnzoo (<why not FlashAttention-4>)"``.

    >>> which_band_backward(q, SlidingWindow(window=256))  # on an H200 with flash-attn-4
    'flash_attn.cute'
    """
    band = pattern.band()
    if band is None:
        return "attnzoo (not a band pattern)"
    n_global = int(pattern.bind(q.shape[2], "cpu").global_rows.numel())
    why = fa4_backward_reason(q, band=True, n_global=n_global, lo=band[0], hi=band[1],
                              has_padding=key_padding_mask is not None)
    return "flash_attn.cute" if why is None else f"attnzoo ({why})"


class _Recorder:
    """Stands in for one of FlashAttention's compile caches during one wrapper call: passes every lookup through
    and logs which compiled function ran with which arguments (into a log shared by the three caches, in call
    order)."""

    def __init__(self, cache, log: list):
        self.cache, self.log = cache, log

    def __contains__(self, key):
        return key in self.cache

    def __setitem__(self, key, fn):
        self.cache[key] = fn

    def __getitem__(self, key):
        fn = self.cache[key]

        def call(*args):
            self.log.append((fn, args))
            return fn(*args)
        return call

    def __getattr__(self, name):
        return getattr(self.cache, name)


_CACHED = ("_bwd_preprocess", "_flash_attn_bwd", "_bwd_postprocess_convert")  # the wrapper's compiled pieces


class _Replay:
    """The compiled kernels one wrapper call ran, as slots: ``("in", name)`` one of the caller's tensors,
    ``("buf", i)`` a float32 buffer the wrapper allocated (fresh per call, shape ``shapes[i]``), ``("arg", x)``
    any other argument as it was."""

    def __init__(self, calls, shapes):
        self.calls, self.shapes = calls, shapes

    @classmethod
    def from_log(cls, log, given: dict):
        """From a recorded call; a string (why not) when it cannot be replayed."""
        if len(log) != 3:
            return f"the wrapper ran {len(log)} compiled kernels (replayed: 3)"
        found: dict = {}
        calls = []
        for fn, args in log:
            slots = []
            for a in args:
                if not isinstance(a, torch.Tensor):
                    slots.append(("arg", a))
                    continue
                name = next((n for n, t in given.items() if a.data_ptr() == t.data_ptr() and a.shape == t.shape
                             and a.stride() == t.stride() and a.dtype == t.dtype), None)
                if name is not None:
                    slots.append(("in", name))
                    continue
                if a.dtype != torch.float32 or not a.is_contiguous():
                    return f"an argument that is neither the caller's nor a float32 buffer ({a.dtype}, {a.shape})"
                idx = found.setdefault(a.data_ptr(), (len(found), tuple(a.shape)))[0]
                slots.append(("buf", idx))
            calls.append((fn, tuple(slots)))
        return cls(calls, [shape for _, shape in sorted(found.values())])

    def __call__(self, given: dict) -> None:
        dev = given["dq"].device
        bufs = [torch.empty(shape, device=dev, dtype=torch.float32) for shape in self.shapes]
        for fn, slots in self.calls:
            fn(*[given[x] if kind == "in" else bufs[x] if kind == "buf" else x for kind, x in slots])


def _signature(q, k, v, o, do, scale, lo, hi):
    return (q.shape, k.shape, q.dtype, q.device, q.stride(), k.stride(), v.stride(), o.stride(), do.stride(),
            float(scale), lo, hi)


def _direct_allowed(fa, q, k) -> str | None:
    """Why a signature cannot be replayed before trying (None: it can)."""
    if not DIRECT or os.environ.get("ATTNZOO_SPARSE_FA4_DIRECT", "1") == "0":
        return "switched off"
    if q.shape[1] != k.shape[1]:
        return "grouped KV heads"
    if not all(hasattr(getattr(fa, name, None), "compile_cache") for name in _CACHED):
        return "flash_attn.cute.interface has other internals"
    version = _version()
    if version not in _DIRECT_VERSIONS:
        return f"flash-attn-4 {version} (checked: {', '.join(sorted(_DIRECT_VERSIONS))})"
    return None


def _version() -> str | None:
    try:
        return importlib.metadata.version("flash-attn-4")
    except importlib.metadata.PackageNotFoundError:
        return None


def _record(fa, run) -> list:
    """Run ``run()`` (one wrapper call) with FlashAttention's compile caches watched; the log of what ran."""
    log: list = []
    saved = {name: getattr(fa, name).compile_cache for name in _CACHED}
    try:
        for name, cache in saved.items():
            getattr(fa, name).compile_cache = _Recorder(cache, log)
        run()
        return log
    finally:
        for name, cache in saved.items():
            getattr(fa, name).compile_cache = cache


def _replay_matches(replay: _Replay, given: dict, grads) -> bool:
    """Whether the replay gives the wrapper's gradients: dK, dV exactly (one program owns each key block), dQ to
    within bf16 rounding of its float32 atomics, which add in any order."""
    mine = {name: torch.empty_like(t) for name, t in zip(("dq", "dk", "dv"), grads)}
    replay({**given, **{n: t.transpose(1, 2) for n, t in mine.items()}})
    dq, dk, dv = grads
    return (torch.equal(mine["dk"], dk) and torch.equal(mine["dv"], dv)
            and torch.allclose(mine["dq"].float(), dq.float(), rtol=2e-2, atol=2e-2 * float(dq.abs().max()) + 1e-6))


def _checked_replay(log, given: dict, grads):
    """The :class:`_Replay` of a recorded wrapper call if it reproduces that call's gradients, else why not (with
    one warning where it ran but disagreed or raised)."""
    replay = _Replay.from_log(log, given)
    if not isinstance(replay, _Replay):
        return replay
    try:
        if _replay_matches(replay, given, grads):
            return replay
        why = "its replay did not reproduce the wrapper's gradients"
    except Exception as e:  # noqa: BLE001 - the replay is an optimisation: the wrapper serves this shape
        why = f"its replay raised {type(e).__name__}: {str(e)[:200]}"
    warnings.warn(f"attnzoo: replaying FlashAttention-4's compiled backward failed ({why}); calling its wrapper for "
                  "this shape (slower on the host; ATTNZOO_SPARSE_FA4_DIRECT=0 skips the replay)", RuntimeWarning,
                  stacklevel=4)
    return why


def fa4_band_backward(q, k, v, o, do, lse, scale: float, lo: int, hi: int):
    """dQ, dK, dV of band attention (keys ``lo <= j - i <= hi``) through FlashAttention-4.

    q, o, do: ``[B, H, N, D]``; k, v: ``[B, Hkv, N, D]`` (H a multiple of Hkv); ``lse``: float32 ``[B, H, N]``,
    the forward's log-sum-exp of ``scale * q·k`` in natural log (attnzoo's forward writes it so when it knows this
    backward will run; its own kernels use base 2). Returns the three gradients as contiguous tensors in the shapes
    of q, k, v. Returns None, after one warning, when FlashAttention raises; the caller then runs its own kernels.
    """
    fa = _interface()
    if fa is None:
        return None
    t = lambda x: x.transpose(1, 2)  # noqa: E731 - [B, H, N, D] <-> FlashAttention's [B, N, H, D], no copy
    # the gradients in attnzoo's layout (contiguous [B, H, N, D], as its own kernels return them), written by
    # FlashAttention through [B, N, H, D] views: no copies here, and none later where autograd reassembles them
    dq, dk, dv = (torch.empty(x.shape, device=x.device, dtype=x.dtype) for x in (q, k, v))
    given = dict(q=t(q), k=t(k), v=t(v), o=t(o), do=t(do), lse=lse, dq=t(dq), dk=t(dk), dv=t(dv))
    sig = _signature(q, k, v, o, do, scale, lo, hi)
    replay = _direct.get(sig)
    if isinstance(replay, _Replay):
        try:
            replay(given)
            return dq, dk, dv
        except Exception as e:  # noqa: BLE001 - the replay is an optimisation: back to the wrapper for this shape
            replay = _direct[sig] = f"its replay raised {type(e).__name__}: {str(e)[:200]}"
            warnings.warn(f"attnzoo: replaying FlashAttention-4's compiled backward failed ({replay}); calling its "
                          "wrapper for this shape from now on (slower on the host; ATTNZOO_SPARSE_FA4_DIRECT=0 "
                          "skips the replay)", RuntimeWarning, stacklevel=3)
    try:
        def wrapper():
            fa._flash_attn_bwd(given["q"], given["k"], given["v"], given["o"], given["do"], lse, softmax_scale=scale,
                               causal=False, window_size_left=-lo, window_size_right=hi, dq=given["dq"],
                               dk=given["dk"], dv=given["dv"])
        if replay is not None:  # known not to replay
            wrapper()
            return dq, dk, dv
        replay = _direct_allowed(fa, q, k)
        if replay is None:
            replay = _checked_replay(_record(fa, wrapper), given, (dq, dk, dv))
        else:
            wrapper()
        if len(_direct) >= _MAX_DIRECT:
            _direct.clear()
        _direct[sig] = replay
        return dq, dk, dv
    except Exception as e:  # noqa: BLE001 - any failure: fall back to attnzoo's kernels for the rest of the process
        _state.pop("module", None)
        _state["failed"] = f"flash_attn.cute's backward failed once ({type(e).__name__}: {str(e)[:200]})"
        warnings.warn(f"attnzoo: {_state['failed']}; the band backward runs on attnzoo's own kernels from now on "
                      "(set ATTNZOO_SPARSE_FA4=0 to skip it from the start)", RuntimeWarning, stacklevel=3)
        return None
