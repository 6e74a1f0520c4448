"""Choose the backend for a dense attention call, run it, and say which ran and why.

The order below is the ranking measured by ``attnzoo bench`` on an H200
(benchmarks/results/): the first backend that can serve a call runs it. The
choice is remembered per call signature (device, dtype, heads, head_dim, masks,
causal, ...; not the lengths), so the probing cost is paid once.

Forcing: ``with attnzoo.ops.use_backend("eager"): ...`` or ``attention(..., backend="sdpa_cudnn")``.
A forced backend that cannot serve raises :class:`~attnzoo.errors.BackendUnavailableError`
with the reason; it never silently falls back. Several names form a priority list.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
from dataclasses import dataclass, field

import torch

from ..errors import BackendUnavailableError, check_choice
from .backends import BACKENDS
from .call import AttentionCall

__all__ = ["attention", "explain", "use_backend", "last_decision", "Decision", "Dispatcher", "backend_names", "ORDER"]

log = logging.getLogger("attnzoo.ops")

#: Priority per device type (fastest first).
ORDER: dict[str, tuple[str, ...]] = {
    "cuda": ("sdpa_cudnn", "flash_attn_cute", "sdpa_flash", "flash_attn", "sdpa_efficient", "flex", "sdpa_math",
             "eager"),
    "cpu": ("sdpa_flash", "sdpa_math", "eager"),
}
_DEFAULT_ORDER = ("sdpa_math", "eager")

_local = threading.local()


@dataclass(frozen=True)
class Decision:
    """Which backend ran a call, and why the others did not.

    ``rejected``: the backends tried ahead of it and why each could not serve. From :func:`explain`
    also ``order`` (the priority list that was walked) and ``skipped``: every other backend, after
    the chosen one or outside the device's order, with the reason it did not run.
    """

    backend: str
    forced: bool
    rejected: dict[str, str] = field(default_factory=dict)
    cached: bool = False
    order: tuple[str, ...] = ()
    skipped: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"backend: {self.backend}" + (" (forced)" if self.forced else "") +
                 (" (remembered for this call signature)" if self.cached else "")]
        if not self.order:
            lines += [f"  skipped {name}: {why}" for name, why in self.rejected.items()]
            return "\n".join(lines)
        reasons = {**{n: f"cannot serve: {w}" for n, w in self.rejected.items()}, **self.skipped}
        for i, name in enumerate(self.order, 1):
            why = "runs this call" if name == self.backend else reasons.get(name, "not tried")
            lines.append(f"  {i}. {name}: {why}")
        lines += [f"  -- {name}: {why}" for name, why in reasons.items() if name not in self.order]
        return "\n".join(lines)


class Dispatcher:
    """Backend choice for one op: its backends, their priority per device type, forcing, a memo.

    A call object has ``q`` (its device picks the order) and ``signature()`` (what the choice
    may depend on). Backends have ``check(call) -> reason | None`` and ``run(call)``, which may
    raise :class:`BackendUnavailableError`. The dense op and the sparse op
    (:mod:`attnzoo.ops.sparse`) each own one, with their own backend names.
    """

    def __init__(self, op: str, backends: dict, order: dict[str, tuple[str, ...]], default_order: tuple[str, ...]):
        self.op, self.backends, self.order, self.default_order = op, backends, order, default_order
        self.forced: contextvars.ContextVar[tuple[str, ...] | None] = contextvars.ContextVar(
            f"attnzoo_{op}_backend", default=None)
        self.chosen: dict[tuple, str] = {}

    def check_names(self, names) -> tuple[str, ...]:
        if isinstance(names, str):
            names = (names,)
        names = tuple(names)
        if not names:
            raise ValueError("backend: expected at least one backend name")
        for n in names:
            check_choice("backend", n, self.backends)
        return names

    @contextlib.contextmanager
    def use(self, *names: str):
        token = self.forced.set(self.check_names(names))
        try:
            yield
        finally:
            self.forced.reset(token)

    def order_for(self, call) -> tuple[str, ...]:
        """The priority list for ``call``: by its ``order_key()`` if it has one, else its device type."""
        key = call.order_key() if hasattr(call, "order_key") else call.q.device.type
        return self.order.get(key) or self.order.get(call.q.device.type, self.default_order)

    def run(self, call, backend, *, memo: bool = True) -> tuple[torch.Tensor, Decision]:
        """Run ``call`` on the forced backend(s) or the first of the device's order that serves it.
        ``memo=False`` probes the order afresh instead of reusing the remembered choice."""
        forced = self.check_names(backend) if backend is not None else self.forced.get()
        rejected: dict[str, str] = {}
        if forced is None:
            sig = call.signature()
            name = self.chosen.get(sig) if memo else None
            if name is not None:
                try:
                    return self.backends[name].run(call), Decision(name, False, {}, cached=True)
                except BackendUnavailableError as e:  # e.g. a length this kernel does not take
                    rejected[name] = str(e)
                    self.chosen.pop(sig, None)
            candidates = self.order_for(call)
        else:
            candidates = forced
        for name in candidates:
            if name in rejected:
                continue
            be = self.backends[name]
            why = be.check(call)
            if why is None:
                try:
                    out = be.run(call)
                except BackendUnavailableError as e:
                    why = str(e)
                else:
                    decision = Decision(name, forced is not None, rejected)
                    if forced is None:
                        self.chosen[call.signature()] = name
                        log.debug("attnzoo.ops.%s -> %s\n%s", self.op, name, decision)
                    return out, decision
            rejected[name] = why
        detail = "; ".join(f"{n}: {w}" for n, w in rejected.items())
        raise BackendUnavailableError(f"no {self.op} backend among {list(candidates)} can serve this call ({detail})")

    def explain(self, call, backend) -> Decision:
        """Run ``call`` (probing afresh) and give every backend's fate: the ones ahead of the chosen
        one with why they could not serve, the ones after it and those outside the order with why
        they did not run (and whether they could have)."""
        _, d = self.run(call, backend, memo=False)
        forced = d.forced
        if forced:
            order = self.check_names(backend) if backend is not None else self.forced.get()
        else:
            order = self.order_for(call)
        after = order[order.index(d.backend) + 1:]
        skipped: dict[str, str] = {}
        for name in list(after) + [n for n in self.backends if n not in order]:
            why = self.backends[name].check(call)
            if name in after:
                skipped[name] = (f"not tried: {d.backend} ranks ahead" +
                                 (" (it could serve this call)" if why is None else f" (it could not anyway: {why})"))
            else:
                where = "not in the forced list" if forced else f"not in the {call.q.device.type} order"
                skipped[name] = where + ("" if why is None else f": {why}")
        return Decision(d.backend, forced, d.rejected, False, tuple(order), skipped)


_DENSE = Dispatcher("attention", BACKENDS, ORDER, _DEFAULT_ORDER)


def backend_names() -> list[str]:
    """All backend names, fastest first on CUDA."""
    return list(BACKENDS)


def use_backend(*names: str):
    """Force dense attention inside the block onto ``names`` (tried in order; none may fall back).

    >>> with attnzoo.ops.use_backend("eager"):
    ...     y = model(x)
    """
    return _DENSE.use(*names)


def _dispatch(call: AttentionCall, backend) -> tuple[torch.Tensor, Decision]:
    return _DENSE.run(call, backend)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              mask: torch.Tensor | None = None, key_padding_mask: torch.Tensor | None = None,
              scale: float | None = None, dropout_p: float = 0.0, backend: str | tuple[str, ...] | None = None
              ) -> torch.Tensor:
    """Dense scaled dot-product attention on the fastest backend that can serve the call.

    Args:
        q: ``[batch, q_heads, q_len, head_dim]``.
        k: ``[batch, kv_heads, k_len, head_dim]``; ``q_heads % kv_heads == 0`` (grouped
            heads are read in place, never repeated in memory by the fused backends).
        v: ``[batch, kv_heads, k_len, v_dim]``.
        causal: bottom-right-aligned causal mask (see :mod:`attnzoo.ops.masks`).
        mask: bool keep mask broadcastable to ``[batch, q_heads, q_len, k_len]``.
        key_padding_mask: bool ``[batch, k_len]``, True for real tokens.
        scale: softmax scale, default ``1/sqrt(head_dim)``.
        dropout_p: attention-probability dropout (pass 0 in eval).
        backend: force one backend name (or a priority tuple); see :func:`backend_names`.

    Returns:
        ``[batch, q_heads, q_len, v_dim]`` in the inputs' dtype.
    """
    call = AttentionCall.build(q, k, v, causal=causal, mask=mask, key_padding_mask=key_padding_mask, scale=scale,
                               dropout_p=dropout_p)
    out, decision = _dispatch(call, backend)
    _local.last = decision
    return out


def explain(q, k, v, **kwargs) -> Decision:
    """Run ``attention(q, k, v, **kwargs)`` without grad and return the :class:`Decision`: which
    backend served it, and every other backend in priority order with the reason it did not
    (``print`` it for a readable list). The order is probed afresh, not taken from the memo."""
    call = AttentionCall.build(q, k, v, **{k_: v_ for k_, v_ in kwargs.items() if k_ != "backend"})
    with torch.no_grad():
        return _DENSE.explain(call, kwargs.get("backend"))


def last_decision() -> Decision | None:
    """The :class:`Decision` of the last :func:`attention` call on this thread."""
    return getattr(_local, "last", None)
