"""Sparse attention patterns: which keys each query may attend to.

The window convention, used by every pattern and variant in attnzoo
-------------------------------------------------------------------
``window`` counts the keys on **each side** of a query, its own position not
counted: query ``i`` sees key ``j`` when ``|i - j| <= window`` (bidirectional)
or ``0 <= i - j <= window`` (causal). A query therefore sees ``2 * window + 1``
keys (``window + 1`` causal); "±256" is ``window=256``. This is FlashAttention's
``window_size=(window, window)``; Hugging Face's Longformer ``attention_window``
is ``2 * window``, and Mistral-style ``sliding_window`` is ``window + 1``.

A pattern is three things, combined the same way for every pattern:

* ``local(i, j)``: an elementwise rule on positions (a band, strides, block tables);
* global tokens (Longformer, BigBird): a set of positions that every query
  attends to (global *columns*) and whose own queries attend to every key
  (global *rows*);
* ``causal``: AND ``j <= i``.

``keep(i, j) = (local(i, j) | global[j] | global[i]) & (j <= i if causal)``.

Patterns are frozen and hashable (compiled layouts are cached per pattern and
length); :meth:`Pattern.bind` fixes a length and a device and returns a
:class:`BoundPattern` whose functions take broadcastable integer tensors, so the
same code gives the dense keep mask (the reference), the block layout
(:mod:`attnzoo.ops.sparse.layout`) and FlexAttention's ``mask_mod``.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch

from ...errors import check_positive_int, check_type

__all__ = ["Pattern", "BoundPattern", "SlidingWindow", "Longformer", "BigBird", "Strided", "Fixed", "Dense", "Rule",
           "PATTERNS", "make_pattern"]

LocalFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Pattern:
    """Base class. Subclasses define :meth:`local_fn` and, when they have global tokens,
    :meth:`global_positions`; :meth:`check` adds checks that need the sequence length."""

    causal: bool = False
    name: ClassVar[str] = "?"

    def __post_init__(self):
        check_type("causal", self.causal, bool, "True or False")
        self.validate()

    def validate(self) -> None:
        """Checks that need no sequence length (raise ValueError/TypeError naming the option)."""

    def check(self, n: int) -> None:
        """Checks that need the sequence length ``n`` (bidirectional patterns know their whole input)."""

    def local_fn(self, n: int, device) -> LocalFn | None:
        """Elementwise ``(i, j) -> bool`` for the local part, or None when there is none."""
        raise NotImplementedError  # every concrete pattern overrides this

    def global_positions(self, n: int) -> list[int]:
        """Sorted positions of the global tokens for length ``n`` (default: none)."""
        return []

    def band(self) -> tuple[int, int] | None:
        """``(lo, hi)`` when the local part is the band ``lo <= j - i <= hi`` (causality included), for kernels
        that walk one contiguous run of keys per block of queries; None otherwise (the default)."""
        return None

    def default_tile(self) -> int:
        """The layout tile the op uses when the caller gives none (128, FlexAttention's block)."""
        return 128

    def tile_exact(self, tile: int) -> bool:
        """True when, inside every tile of ``tile x tile`` that the layout visits, the kernel part keeps every
        pair except those causality removes (kernels then need no mask table); False by default."""
        return False

    def bind(self, n: int, device=None) -> "BoundPattern":
        check_positive_int("sequence length", n)
        self.check(n)
        return BoundPattern(self, n, torch.device(device) if device is not None else torch.device("cpu"))

    def describe(self) -> str:
        """One line: the name and the options (for plots and ``explain``)."""
        opts = ", ".join(f"{k}={v}" for k, v in self.__dict__.items() if k != "causal")
        return f"{self.name}({opts}{', ' if opts else ''}{'causal' if self.causal else 'bidirectional'})"


class BoundPattern:
    """A pattern at one length on one device: ``keep`` (the whole pattern) and ``kernel_keep``
    (what the block-sparse kernel computes: everything but the global rows, which the op
    computes densely, see :func:`attnzoo.ops.sparse.sparse_attention`)."""

    def __init__(self, pattern: Pattern, n: int, device: torch.device):
        self.pattern, self.n, self.device, self.causal = pattern, n, device, pattern.causal
        self._local = pattern.local_fn(n, device)
        rows = sorted(set(pattern.global_positions(n)))
        self.global_rows = torch.tensor(rows, dtype=torch.long, device=device)
        self.is_global = None
        if rows:
            self.is_global = torch.zeros(n, dtype=torch.bool, device=device)
            self.is_global[self.global_rows] = True

    def _combine(self, i, j, rows: bool) -> torch.Tensor:
        keep = self._local(i, j) if self._local is not None else torch.zeros((), dtype=torch.bool, device=self.device)
        if self.is_global is not None:
            keep = keep | self.is_global[j]
            keep = keep | self.is_global[i] if rows else keep & ~self.is_global[i]
        if self.causal:
            keep = keep & (j <= i)
        return keep

    def keep(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """Bool: may query ``i`` attend to key ``j`` (broadcastable integer tensors, values in [0, n))."""
        return self._combine(i, j, rows=True)

    def kernel_keep(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """``keep`` without the global rows (those rows keep nothing here)."""
        return self._combine(i, j, rows=False)

    def keep_mask(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Dense bool ``[len(rows), n]`` (default: all ``n`` rows): the reference mask."""
        i = torch.arange(self.n, device=self.device) if rows is None else rows.to(self.device)
        j = torch.arange(self.n, device=self.device)
        return self.keep(i[:, None], j[None, :]).expand(len(i), self.n)

    def mask_mod(self):
        """FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` for the kernel part."""
        def mask_mod(b, h, q_idx, kv_idx):
            return self.kernel_keep(q_idx, kv_idx)
        return mask_mod


# ---------------------------------------------------------------------------- option checks
def _check_window(value, option: str = "window") -> None:
    check_type(option, value, int, "a positive integer (keys on each side of a query)")
    if value < 1:
        raise ValueError(f"{option}={value!r}: expected an integer >= 1 (keys on each side of a query; "
                         f"a query sees 2*{option}+1 keys, {option}+1 when causal)")


def _normalize_global_tokens(value) -> int | tuple[int, ...]:
    """``global_tokens``: an int g (the first g tokens) or a sequence of positions (negative = from the end)."""
    if isinstance(value, bool):
        raise TypeError(f"global_tokens={value!r}: expected an int (the first N tokens) or a sequence of positions")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"global_tokens={value}: expected a count >= 0 (the first N tokens are global) "
                             "or a sequence of positions")
        return value
    if isinstance(value, (list, tuple, range)):
        out = []
        for p in value:
            if isinstance(p, bool) or not isinstance(p, int):
                raise TypeError(f"global_tokens={list(value)!r}: positions must be ints, got {p!r}")
            out.append(p)
        return tuple(out)
    raise TypeError(f"global_tokens={value!r}: expected an int (the first N tokens) or a sequence of positions")


# ---------------------------------------------------------------------------- patterns
@dataclass(frozen=True)
class Dense(Pattern):
    """Every key (causal: every earlier key); the baseline in pictures and benchmarks."""

    name: ClassVar[str] = "dense"

    def local_fn(self, n, device):
        return lambda i, j: (i >= 0) & (j >= 0)

    def tile_exact(self, tile):
        return True


@dataclass(frozen=True)
class SlidingWindow(Pattern):
    """``|i - j| <= window`` (causal: ``0 <= i - j <= window``)."""

    window: int = 256
    name: ClassVar[str] = "sliding_window"

    def validate(self):
        _check_window(self.window)

    def local_fn(self, n, device):
        w = self.window
        return lambda i, j: (i - j).abs() <= w

    def band(self):
        return (-self.window, 0 if self.causal else self.window)


@dataclass(frozen=True)
class Longformer(SlidingWindow):
    """Sliding window plus global tokens (Beltagy et al. 2020).

    ``global_tokens``: an int g (the first g tokens, e.g. a CLS token) or positions (negative
    positions count from the end; bidirectional only). Global tokens attend to every key and
    every query attends to them.
    """

    global_tokens: int | tuple[int, ...] = 1
    name: ClassVar[str] = "longformer"

    def validate(self):
        super().validate()
        object.__setattr__(self, "global_tokens", _normalize_global_tokens(self.global_tokens))
        if self.causal and isinstance(self.global_tokens, tuple) and any(p < 0 for p in self.global_tokens):
            raise ValueError(f"global_tokens={self.global_tokens}: negative positions (counted from the end) need "
                             "causal=False; a causal model does not know where its sequence ends")

    def check(self, n):
        if self.causal:
            return  # decoding: positions beyond the current length simply are not there yet
        if isinstance(self.global_tokens, int):
            if self.global_tokens > n:
                raise ValueError(f"global_tokens={self.global_tokens} does not fit a sequence of {n} tokens: "
                                 f"expected 0 <= global_tokens <= {n}")
            return
        bad = [p for p in self.global_tokens if not -n <= p < n]
        if bad:
            raise ValueError(f"global_tokens={self.global_tokens}: position(s) {bad} do not fit a sequence of {n} "
                             f"tokens: expected positions in [{-n}, {n - 1}]")

    def global_positions(self, n):
        if isinstance(self.global_tokens, int):
            return list(range(min(self.global_tokens, n)))
        return sorted({p % n for p in self.global_tokens if -n <= p < n})


@dataclass(frozen=True)
class BigBird(Pattern):
    """Block-sparse BigBird (Zaheer et al. 2020, ITC): sliding blocks + global blocks + random blocks.

    The sequence is cut into blocks of ``block_size`` tokens (the last may be shorter).
    Query block ``b`` sees key blocks ``b-w .. b+w`` with ``w = window // block_size`` (so
    every query sees at least ``window`` keys on each side; ``window`` must be a multiple of
    ``block_size``; Hugging Face's fixed 3-block window is ``window=block_size``), the
    ``global_blocks`` global blocks (bidirectional: the first ``ceil(g/2)`` and the last
    ``floor(g/2)`` blocks, Hugging Face's 2 = first and last; causal: the first ``g``), whose
    queries also see every key, and ``random_blocks`` key blocks drawn for each query block
    among those outside its window and the global blocks. The draw is seeded by ``seed`` and
    the query block's index only, so it is the same in training and evaluation, on every call
    and, causally, at every length (decoding sees the blocks the full forward saw). A causal
    query block draws among earlier blocks; when fewer remain than ``random_blocks`` it takes
    them all.
    """

    block_size: int = 64
    window: int | None = None
    global_blocks: int = 2
    random_blocks: int = 3
    seed: int = 0
    name: ClassVar[str] = "bigbird"

    def validate(self):
        check_positive_int("block_size", self.block_size)
        if self.window is None:
            object.__setattr__(self, "window", self.block_size)
        _check_window(self.window)
        if self.window % self.block_size:
            lo = max(1, self.window // self.block_size) * self.block_size
            raise ValueError(f"window={self.window}: bigbird's window is counted in whole blocks; expected a "
                             f"multiple of block_size={self.block_size} (e.g. {lo} or {lo + self.block_size})")
        check_positive_int("global_blocks", self.global_blocks, minimum=0)
        check_positive_int("random_blocks", self.random_blocks, minimum=0)
        check_type("seed", self.seed, int, "an integer")

    # -- block bookkeeping (token positions -> blocks) --------------------------------------
    def num_blocks(self, n: int) -> int:
        return -(-n // self.block_size)

    def _global_block_ids(self, nb: int) -> list[int]:
        g = min(self.global_blocks, nb)
        if self.causal:
            return list(range(g))
        first = g - g // 2
        return sorted(set(range(first)) | set(range(nb - g // 2, nb)))

    def _candidates(self, qb: int, nb: int, glob: set[int]) -> list[int]:
        w = self.window // self.block_size
        hi = qb - w if self.causal else nb  # causal: strictly before the window
        return [kb for kb in range(hi) if abs(kb - qb) > w and kb not in glob]

    def check(self, n):
        if self.causal:
            return  # the sequence grows while decoding; rows with few earlier blocks take what there is
        if self.block_size > n:
            raise ValueError(f"block_size={self.block_size} does not fit a sequence of {n} tokens: expected "
                             f"1 <= block_size <= {n}")
        nb = self.num_blocks(n)
        glob = set(self._global_block_ids(nb))
        most = max((len(self._candidates(qb, nb, glob)) for qb in range(nb) if qb not in glob), default=0)
        if self.random_blocks > most:
            raise ValueError(f"random_blocks={self.random_blocks}: a sequence of {n} tokens has {nb} blocks of "
                             f"block_size={self.block_size}, and at most {most} lie outside a query block's window "
                             f"and the {len(glob)} global block(s); expected random_blocks in [0, {most}] "
                             f"(or a longer sequence, a smaller block_size or window)")

    def random_table(self, n: int) -> torch.Tensor:
        """Bool ``[nb, nb]``: query block -> its random key blocks (seeded per query block)."""
        nb = self.num_blocks(n)
        table = torch.zeros(nb, nb, dtype=torch.bool)
        if self.random_blocks == 0:
            return table
        glob = set(self._global_block_ids(nb))
        for qb in range(nb):
            if qb in glob:
                continue
            cand = self._candidates(qb, nb, glob)
            if cand:
                table[qb, [cand[p] for p in _draw(self.seed, qb, len(cand), self.random_blocks)]] = True
        return table

    def local_fn(self, n, device):
        bs, w = self.block_size, self.window // self.block_size
        qb = torch.arange(self.num_blocks(n))
        table = ((qb[:, None] - qb[None, :]).abs() <= w) | self.random_table(n)
        table = table.to(device)
        return lambda i, j: table[i // bs, j // bs]

    def default_tile(self):
        return self.block_size if self.block_size in (32, 64, 128) else 128  # tiles = blocks: no mask tables

    def tile_exact(self, tile):
        return self.block_size % tile == 0  # tiles inside blocks: a visited tile is kept whole (causal aside)

    def global_positions(self, n):
        nb = self.num_blocks(n)
        return [p for b in self._global_block_ids(nb) for p in range(b * self.block_size,
                                                                    min(n, (b + 1) * self.block_size))]


@functools.lru_cache(maxsize=1 << 16)
def _draw(seed: int, query_block: int, candidates: int, k: int) -> tuple[int, ...]:
    """The first ``k`` of a permutation of ``range(candidates)`` seeded by (seed, query block): cached, so
    decoding (which rebuilds the table at every length) does not reseed a generator per block and step."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + query_block)
    return tuple(torch.randperm(candidates, generator=g)[:k].tolist())


@dataclass(frozen=True)
class Strided(Pattern):
    """Sparse Transformer, strided (Child et al. 2019), both heads' sets merged: the previous
    ``stride`` positions (``|i - j| < stride``, i.e. ``window = stride - 1``) and every
    ``stride``-th position (``(i - j) % stride == 0``)."""

    stride: int = 128
    name: ClassVar[str] = "sparse_strided"

    def validate(self):
        check_positive_int("stride", self.stride, minimum=2)

    def local_fn(self, n, device):
        s = self.stride
        return lambda i, j: ((i - j).abs() < s) | ((i - j) % s == 0)


@dataclass(frozen=True)
class Fixed(Pattern):
    """Sparse Transformer, fixed (Child et al. 2019), both heads' sets merged: the query's own
    block of ``stride`` positions (``i // stride == j // stride``) and the last ``summary``
    positions of every block (``j % stride >= stride - summary``, the paper's c)."""

    stride: int = 128
    summary: int = 8
    name: ClassVar[str] = "sparse_fixed"

    def validate(self):
        check_positive_int("stride", self.stride, minimum=2)
        check_positive_int("summary", self.summary)
        if self.summary > self.stride:
            raise ValueError(f"summary={self.summary}: expected 1 <= summary <= stride={self.stride} "
                             "(summary positions per block of stride positions)")

    def local_fn(self, n, device):
        s, c = self.stride, self.summary
        return lambda i, j: (i // s == j // s) | (j % s >= s - c)


@dataclass(frozen=True, eq=False)
class Rule(Pattern):
    """A keep rule computed from one call's inputs (LSH buckets, selected tokens, ...): ``keep(i, j)`` takes
    broadcastable integer position tensors and returns a bool tensor (FlexAttention's ``mask_mod`` without batch
    and head). Compared by identity and never cached by length: its layout is built per call
    (:meth:`~attnzoo.ops.sparse.layout.BlockLayout.from_rule`), not by :func:`make_pattern`. One rule serves
    every batch row and head."""

    keep: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    label: str = "rule"
    name: ClassVar[str] = "rule"

    def validate(self):
        if not callable(self.keep):
            raise TypeError(f"keep={self.keep!r}: expected a function (i, j) -> bool tensor of positions")
        check_type("label", self.label, str, "a string")

    def local_fn(self, n, device):
        return self.keep

    def describe(self) -> str:
        return f"{self.label}(per call, {'causal' if self.causal else 'bidirectional'})"


PATTERNS: dict[str, type[Pattern]] = {p.name: p for p in (Dense, SlidingWindow, Longformer, BigBird, Strided, Fixed)}


def make_pattern(name: str, **options) -> Pattern:
    """``make_pattern("sliding_window", window=256, causal=True)``; unknown names/options raise with hints."""
    from ...errors import check_choice, suggest

    check_choice("pattern", name, PATTERNS)
    cls = PATTERNS[name]
    fields = [f.name for f in dataclasses.fields(cls)]
    for key in options:
        if key not in fields:
            raise ValueError(f"unknown option {key!r} for pattern {name!r}.{suggest(key, fields)} "
                             f"Valid options: {', '.join(fields)}")
    return cls(**options)
