"""Backend choice shared by the ops: the :class:`Backend` contract, :class:`Decision` and :class:`Dispatcher`.

Each op (the dense op in :mod:`attnzoo.ops.dense`, the sparse op in :mod:`attnzoo.ops.sparse`) owns one
:class:`Dispatcher` with its own backend names and priority lists. The first backend of the device's list that can
serve a call runs it; the choice is remembered per call signature (what the choice may depend on: device, dtype,
heads, masks, ...; not the lengths), so the probing cost is paid once. A forced backend that cannot serve raises
:class:`~attnzoo.errors.BackendUnavailableError` with the reason; it never silently falls back.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
from dataclasses import dataclass, field

import torch

from ..errors import BackendUnavailableError, check_choice

__all__ = ["Backend", "Decision", "Dispatcher", "short_error"]

log = logging.getLogger("attnzoo.ops")


class Backend:
    """One implementation of an op. :meth:`check` answers from the call's facts alone (device, dtype, masks, ...);
    :meth:`run` may still raise :class:`~attnzoo.errors.BackendUnavailableError` when the library underneath turns
    the call down at run time. Both give a reason that ``explain`` reports."""

    name = "?"
    description = ""

    def check(self, call) -> str | None:
        """None if this backend may serve ``call``, else the reason it cannot."""
        return None

    def run(self, call) -> torch.Tensor:
        raise NotImplementedError  # every concrete backend overrides this

    def available(self) -> str | None:
        """None if usable in this process at all, else why not (missing package, no GPU)."""
        return None


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

    A call object has ``q`` (its device picks the order), ``signature()`` (what the choice may depend on) and,
    optionally, ``order_key()`` (which priority list applies, default the device type). Backends follow
    :class:`Backend`.
    """

    def __init__(self, op: str, backends: dict, order: dict[str, tuple[str, ...]], default_order: tuple[str, ...]):
        self.op, self.backends, self.order, self.default_order = op, backends, order, default_order
        self.forced: contextvars.ContextVar[tuple[str, ...] | None] = contextvars.ContextVar(
            f"attnzoo_{op}_backend", default=None)
        self.chosen: dict[tuple, tuple] = {}  # signature -> (backend, the Decision a remembered call returns)

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
            hit = self.chosen.get(sig) if memo else None
            if hit is not None:  # the common case: one dict lookup, the backend, a shared Decision
                be, decision = hit
                try:
                    return be.run(call), decision
                except BackendUnavailableError as e:  # e.g. a length this kernel does not take
                    rejected[be.name] = str(e)
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
                        self.chosen[call.signature()] = (be, Decision(name, False, {}, cached=True))
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


def short_error(msg: str) -> str:
    """The first two non-empty lines of an error message, at most 300 characters (for ``explain``)."""
    first = [ln.strip() for ln in msg.splitlines() if ln.strip()]
    return "; ".join(first[:2])[:300]
