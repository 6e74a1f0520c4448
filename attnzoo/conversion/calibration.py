"""Calibration: activation statistics of a live model's attention layers, for data-aware converters.

A weight-only conversion (``method="mean"``, ``"svd"``) assumes every input direction matters equally. Real
activations are far from isotropic (a few directions of the residual stream carry most of the energy), so the
data-aware methods first run the model on a little text and measure, at every attention site, the second
moments of what the projections produce. This module is the one place that does it; the KV-head methods
(:mod:`attnzoo.conversion.kv_pca`) and any other converter (MLA, linear attention, ...) read the same
:class:`LayerStatistics`.

**Data** (:func:`calibration_ids`, the ``calib`` option of the converters that use it): the same
specifications as ``--data`` of ``attnzoo eval`` / ``uptrain`` (:func:`attnzoo.data.sources.open_data`):

* ``None`` / ``"builtin"`` / ``"builtin:SEED"``: the built-in corpus (synthetic; right for models trained on
  the built-in vocabulary, a poor stand-in for real text on a real model: pass a file there);
* ``FILE.safetensors`` (a tensor ``input_ids``, 1-D stream or 2-D rows) or ``FILE.ids`` (whitespace-separated
  integers): token ids, used as they are;
* any other file: UTF-8 text, tokenized with the model's tokenizer.

The stream is cut into ``sequences`` rows of ``seq_len`` tokens (fewer when the file is shorter). Every token
of every row counts: calibration rows have no padding.

**What is gathered** per attention site, in one streaming pass with forward hooks (:func:`gather_statistics`).
A pre-hook on the module that reads the attention input (``q_proj``, or the fused ``qkv``) takes the input
``x`` of every token and computes the site's own projections from its weights
(:meth:`~attnzoo.patches.sites.Site.read`, so fused and interleaved layouts look like separate ones); a pre-hook
on the output projection takes what feeds it. Sums, in float64, on the model's device:

=========  ==================================  =============================================================
field      shape                               the sum over tokens of
=========  ==================================  =============================================================
``q``      ``[heads, head_dim, head_dim]``     ``q_h q_hᵀ`` per query head (pre-RoPE, bias included)
``k``      ``[kv*head_dim, kv*head_dim]``      ``k kᵀ``, every KV head together (pre-RoPE, bias included)
``v``      ``[kv*head_dim, kv*head_dim]``      ``v vᵀ``, every KV head together
``o_in``   ``[heads, head_dim, head_dim]``     ``a_h a_hᵀ``, ``a_h``: head ``h``'s attention output (o_proj input)
``x``      ``[dim+1, dim+1]`` (``inputs=True``)  ``[x; 1][x; 1]ᵀ`` (any linear map's moments follow)
``v_mix``  ``[kv, kv*hd, kv*hd]``              ``ṽ_h ṽ_hᵀ`` summed over the query heads ``h`` reading each KV head
           (``mixed_values=True``)             ``i``; ``ṽ_h = Σ_t α_{h,t} v_t``: every KV head's values, mixed
                                               by head ``h``'s attention (what o_proj would see if ``h`` read them)
=========  ==================================  =============================================================

plus ``count`` (tokens). ``v_mix`` recomputes the attention probabilities in the hook (causal as the site says,
RoPE from the ``position_embeddings`` the model hands its attention modules, the module's ``scaling``; no sliding
window, no soft-capping): about a fifth more compute for the pass. Memory per layer is that table: ``2·(kv·hd)² + 2·heads·hd²`` floats (for SmolLM2-135M
about 1 MB per layer; for a Llama-3-8B layer 10 MB), the optional ``x`` adds ``(dim+1)²``. Sums of float64
products do not depend on the order of the batches beyond rounding, and two passes merge by addition
(:meth:`LayerStatistics.merge`).

**RoPE.** Keys are measured before RoPE. The methods that need RoPE-commuting maps work per frequency pair on the
complex numbers ``z = k[a] + i k[b]``; RoPE multiplies the pair of every head by the same ``e^{imθ}``, so the
cross-head covariance ``E[z_i conj(z_j)]`` of a pair is the same before and after RoPE
(:meth:`LayerStatistics.key_pair_covariance`): nothing is lost by measuring pre-RoPE, and no RoPE convention is
needed here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import check_choice, check_positive_int, check_type
from ..options import option

__all__ = ["CalibrationOptions", "LayerStatistics", "Calibration", "calibration_ids", "gather_statistics", "calibrate",
           "DEFAULT_SEQUENCES", "DEFAULT_SEQ_LEN", "CALIB_ORDERS", "model_tokenizer", "convert_sequentially"]

DEFAULT_SEQUENCES = 128
DEFAULT_SEQ_LEN = 512
CALIB_ORDERS = ("parallel", "sequential")


@dataclass(frozen=True, kw_only=True)
class CalibrationOptions:
    """The calibration options of a converter with data-aware methods (a mixin of its typed patch config; the
    flags of ``attnzoo convert`` follow). Unused by the methods that need no data."""

    calib: str | None = option(None, help="calibration data of the data-aware methods: a text file (tokenized "
                               "with the model's tokenizer), token ids (.safetensors with input_ids, or .ids), "
                               "'builtin' or 'builtin:SEED'; None: the built-in corpus", metavar="FILE")
    calib_sequences: int = option(DEFAULT_SEQUENCES, help="calibration sequences (fewer when the data is shorter)")
    calib_seq_len: int = option(DEFAULT_SEQ_LEN, help="tokens per calibration sequence")
    calib_order: str = option("parallel", help="'parallel': every layer's statistics from the unconverted model "
                              "in one pass; 'sequential': layer by layer, each measured on the model whose earlier "
                              "layers are already converted (GPTQ's order: later layers see and correct the earlier "
                              "layers' error; about layers/2 passes instead of 2)")

    def validate(self) -> None:
        if self.calib is not None:
            check_type("calib", self.calib, str, "a file path (str), 'builtin', 'builtin:SEED' or None")
        check_positive_int("calib_sequences", self.calib_sequences)
        check_positive_int("calib_seq_len", self.calib_seq_len, minimum=2)
        check_choice("calib_order", self.calib_order, CALIB_ORDERS)


@dataclass
class LayerStatistics:
    """Second moments at one attention site (sums over ``count`` tokens, float64). See the module docstring.

    The ``*_moment`` / ``*_covariance`` accessors divide by ``count`` (the uncentred second moment: the mean is
    part of the signal a conversion must keep)."""

    site: str
    layer: int
    heads: int
    kv_heads: int
    head_dim: int
    count: int = 0
    q: torch.Tensor | None = None
    k: torch.Tensor | None = None
    v: torch.Tensor | None = None
    o_in: torch.Tensor | None = None
    x: torch.Tensor | None = None
    v_mix: torch.Tensor | None = None

    _FIELDS = ("q", "k", "v", "o_in", "x", "v_mix")

    def merge(self, other: LayerStatistics) -> LayerStatistics:
        """The statistics of both passes (sums add)."""
        if (other.site, other.heads, other.kv_heads, other.head_dim) != (self.site, self.heads, self.kv_heads,
                                                                          self.head_dim):
            raise ValueError(f"cannot merge statistics of {other.site!r} into {self.site!r}: different sites")
        out = LayerStatistics(self.site, self.layer, self.heads, self.kv_heads, self.head_dim,
                              self.count + other.count)
        for name in self._FIELDS:
            a, b = getattr(self, name), getattr(other, name)
            setattr(out, name, None if a is None or b is None else a + b)
        return out

    def _mean(self, t: torch.Tensor | None, what: str) -> torch.Tensor:
        if t is None:
            raise ValueError(f"{self.site}: the calibration pass did not gather {what} (gather_statistics(..., "
                             f"inputs=True) gathers the input moments)")
        if self.count == 0:
            raise ValueError(f"{self.site}: the calibration pass saw no token")
        return t / self.count

    def key_moment(self) -> torch.Tensor:
        """``E[k kᵀ]`` over all KV heads, ``[kv*hd, kv*hd]`` (pre-RoPE)."""
        return self._mean(self.k, "keys")

    def value_moment(self) -> torch.Tensor:
        """``E[v vᵀ]`` over all KV heads, ``[kv*hd, kv*hd]``."""
        return self._mean(self.v, "values")

    def query_moment(self) -> torch.Tensor:
        """``E[q_h q_hᵀ]`` per query head, ``[heads, hd, hd]`` (pre-RoPE)."""
        return self._mean(self.q, "queries")

    def output_moment(self) -> torch.Tensor:
        """``E[a_h a_hᵀ]`` per query head of the attention output that feeds o_proj, ``[heads, hd, hd]``."""
        return self._mean(self.o_in, "attention outputs")

    def mixed_value_moment(self) -> torch.Tensor | None:
        """``E[ṽ ṽᵀ]`` per KV head of the attention-mixed values of every KV head, ``[kv, kv*hd, kv*hd]``, or None
        when not gathered (``mixed_values=False``)."""
        return None if self.v_mix is None else self._mean(self.v_mix, "mixed values")

    def input_moment(self) -> torch.Tensor:
        """``E[[x;1][x;1]ᵀ]`` of the attention input, ``[dim+1, dim+1]`` (only with ``inputs=True``)."""
        return self._mean(self.x, "inputs")

    def moment_of(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``E[y yᵀ]`` of any linear map ``y = W x + b`` of the attention input (needs ``inputs=True``)."""
        m = self.input_moment()
        w = weight.to(m)
        w = torch.cat([w, (torch.zeros(w.shape[0], dtype=m.dtype, device=m.device) if bias is None
                           else bias.to(m))[:, None]], 1)
        return w @ m @ w.T

    def key_pair_covariance(self, a: list[int], b: list[int]) -> torch.Tensor:
        """``C[p, i, j] = E[z_{i,p} conj(z_{j,p})]`` with ``z_{i,p} = k_i[a_p] + i·k_i[b_p]``, KV heads ``i, j``, the
        rotated pairs ``(a_p, b_p)`` of one head (:meth:`~attnzoo.conversion.heads.RopeSpec.pairs`); complex
        ``[P, kv, kv]``, Hermitian. Invariant under RoPE (see the module docstring)."""
        m = self.key_moment().reshape(self.kv_heads, self.head_dim, self.kv_heads, self.head_dim)
        ia, ib = torch.tensor(a, device=m.device), torch.tensor(b, device=m.device)
        aa = m[:, ia][:, :, :, ia].diagonal(dim1=1, dim2=3)  # [kv, kv, P]: E[k_i[a_p] k_j[a_p]]
        bb = m[:, ib][:, :, :, ib].diagonal(dim1=1, dim2=3)
        ba = m[:, ib][:, :, :, ia].diagonal(dim1=1, dim2=3)  # E[k_i[b_p] k_j[a_p]]
        ab = m[:, ia][:, :, :, ib].diagonal(dim1=1, dim2=3)
        return torch.complex(aa + bb, ba - ab).permute(2, 0, 1).contiguous()


@dataclass
class Calibration:
    """The result of a calibration pass: :class:`LayerStatistics` by site name, and where the data came from."""

    layers: dict[str, LayerStatistics]
    source: str
    ids: torch.Tensor  # [sequences, seq_len]: the token ids of the pass (a second pass over the same data reuses them)
    tokens: int = field(init=False)

    def __post_init__(self):
        self.tokens = self.ids.numel()

    @property
    def sequences(self) -> int:
        return self.ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.ids.shape[1]

    def of(self, site: str) -> LayerStatistics:
        """The statistics of the attention module named ``site`` (its qualified name)."""
        try:
            return self.layers[site]
        except KeyError:
            raise KeyError(f"no calibration statistics for {site!r}; gathered: {', '.join(self.layers)}") from None


def model_tokenizer(model):
    """The tokenizer saved where ``model`` was loaded from (``config._name_or_path``), or None."""
    from ..data.tokenizer import load_tokenizer

    where = getattr(model.config, "_name_or_path", None) or getattr(model, "name_or_path", None)
    if not where or not Path(where).is_dir():
        return None
    return load_tokenizer(where)


def calibration_ids(spec: str | None, sequences: int = DEFAULT_SEQUENCES, seq_len: int = DEFAULT_SEQ_LEN, *,
                    tokenizer=None, vocab_size: int | None = None, option: str = "calib") -> torch.Tensor:
    """Token ids ``[n, seq_len]`` (``n <= sequences``) for a calibration pass from ``spec`` (module docstring)."""
    from ..data.sources import open_data

    check_positive_int(f"{option}_sequences", sequences)
    check_positive_int(f"{option}_seq_len", seq_len, minimum=2)
    data = open_data("builtin" if spec is None else str(spec), seq_len, tokenizer=tokenizer, vocab_size=vocab_size,
                     num_sequences=sequences, option=option)
    return data.batch(range(data.num_sequences))


def _input_module(site):
    """The module whose input is the attention input ``x`` (q_proj, or the fused projection)."""
    a, m = site.adapter, site.module
    if site.swapped:
        return m.q_proj
    return getattr(m, a.q if a.layout == "separate" else a.qkv)


def _gram(y: torch.Tensor) -> torch.Tensor:
    y = y.reshape(-1, y.shape[-1]).double()
    return y.T @ y


def _head_gram(y: torch.Tensor, heads: int, hd: int) -> torch.Tensor:
    y = y.reshape(-1, heads, hd).double().transpose(0, 1)  # [heads, N, hd]
    return y.transpose(1, 2) @ y


class _Accumulator:
    """Hooks of one site adding into its :class:`LayerStatistics`."""

    def __init__(self, site, inputs: bool, mixed_values: bool):
        self.site, self.inputs, self.mixed = site, inputs, mixed_values
        w = site.read()
        self.w, self.rope, self.rope_tables = w, site.rope(), None
        self.stats = LayerStatistics(site.fqn, site.layer, w.heads, w.kv_heads, w.head_dim)
        self.handles = [_input_module(site).register_forward_pre_hook(self._on_input),
                        site.root.get_submodule(site.o_path()).register_forward_pre_hook(self._on_output)]
        if mixed_values:
            self.handles.append(site.module.register_forward_pre_hook(self._on_attention, with_kwargs=True))

    def _on_attention(self, module, args, kwargs):
        pe = kwargs.get("position_embeddings", args[1] if len(args) > 1 else None)
        self.rope_tables = pe if isinstance(pe, tuple) else None

    def _probabilities(self, w, q, k, shape):
        """Attention probabilities ``[b, heads, t, t]`` of layer ``w`` from its pre-RoPE ``q``, ``k``."""
        from ..ops.rope import apply_rope

        hd = w.head_dim
        b, t = shape
        q = q.reshape(b, t, w.heads, hd).transpose(1, 2)
        k = k.reshape(b, t, w.kv_heads, hd).transpose(1, 2)
        if self.rope.rotary_dim:
            if self.rope_tables is None:
                raise ValueError(f"{self.site.fqn}: recomputing attention needs the RoPE tables, but the attention "
                                 "module was not called with position_embeddings; gather with mixed_values=False")
            cos, sin = (c[..., : self.rope.rotary_dim] for c in self.rope_tables)
            q, k = apply_rope(q, cos, sin, self.rope.style), apply_rope(k, cos, sin, self.rope.style)
        qpk = w.heads // w.kv_heads
        scale = getattr(self.site.module, "scaling", None) or hd**-0.5
        s = (q.float() @ k.float().repeat_interleave(qpk, 1).transpose(-1, -2)) * scale  # [b, heads, t, t]
        if self.site.causal:
            s = s.masked_fill(torch.ones(t, t, dtype=torch.bool, device=s.device).triu(1), float("-inf"))
        return s.softmax(-1)

    def _mixed_values(self, q, k, v, shape):
        """Σ over tokens and the query heads of each KV head of ``ṽ ṽᵀ`` (see the module docstring)."""
        w = self.w
        b, t = shape
        qpk = w.heads // w.kv_heads
        mixed = self._probabilities(w, q, k, shape) @ v.reshape(b, 1, t, -1).float()  # [b, heads, t, kv*hd]
        mixed = mixed.reshape(b, w.kv_heads, qpk, t, -1).transpose(0, 1).reshape(w.kv_heads, -1, mixed.shape[-1])
        mixed = mixed.double()
        return mixed.transpose(1, 2) @ mixed

    @staticmethod
    def _add(stats, name, value):
        old = getattr(stats, name)
        setattr(stats, name, value if old is None else old.add_(value))

    def _on_input(self, module, args):
        x = args[0].detach()
        w, s = self.w, self.stats
        shape = x.shape[:2]
        x = x.reshape(-1, x.shape[-1]).to(w.q.dtype)
        with torch.no_grad():
            q = torch.nn.functional.linear(x, w.q, w.q_bias)
            k = torch.nn.functional.linear(x, w.k, w.k_bias)
            v = torch.nn.functional.linear(x, w.v, w.v_bias)
            self._add(s, "q", _head_gram(q, w.heads, w.head_dim))
            self._add(s, "k", _gram(k))
            self._add(s, "v", _gram(v))
            if self.inputs:
                self._add(s, "x", _gram(torch.cat([x, torch.ones_like(x[:, :1])], 1)))
            if self.mixed:
                self._add(s, "v_mix", self._mixed_values(q, k, v, shape))
        s.count += x.shape[0]

    def _on_output(self, module, args):
        a = args[0].detach()
        with torch.no_grad():
            self._add(self.stats, "o_in", _head_gram(a, self.w.heads, self.w.head_dim))

    def remove(self):
        for h in self.handles:
            h.remove()


class _OutputPairs(_Accumulator):
    """Attention outputs of the original layer and of converted weights ``new`` on the same inputs: sums of
    ``a_old a_newᵀ`` and ``a_new a_newᵀ`` (``[heads*hd]²`` each), for a least-squares refit of ``o_proj``."""

    def __init__(self, site, new, targets: list | None = None):
        super().__init__(site, False, True)
        self.new, self.cross, self.gram = new, None, None
        self.targets, self.batch = targets, 0  # targets: a_old per batch, given (the reference model's)

    def _outputs(self, w, x, shape):
        b, t = shape
        q = torch.nn.functional.linear(x, w.q, w.q_bias)
        k = torch.nn.functional.linear(x, w.k, w.k_bias)
        v = torch.nn.functional.linear(x, w.v, w.v_bias).reshape(b, t, w.kv_heads, w.head_dim).transpose(1, 2)
        v = v.float().repeat_interleave(w.heads // w.kv_heads, 1)
        out = self._probabilities(w, q, k, shape) @ v  # [b, heads, t, hd]
        return out.transpose(1, 2).reshape(b * t, -1).double()

    def _on_input(self, module, args):
        x = args[0].detach()
        shape = x.shape[:2]
        x = x.reshape(-1, x.shape[-1]).to(self.w.q.dtype)
        with torch.no_grad():
            new = self._outputs(self.new, x.to(self.new.q.dtype), shape)
            if self.targets is None:
                old = self._outputs(self.w, x, shape)
            else:
                old, self.batch = self.targets[self.batch], self.batch + 1
            self.cross = old.T @ new if self.cross is None else self.cross.add_(old.T @ new)
            self.gram = new.T @ new if self.gram is None else self.gram.add_(new.T @ new)

    def _on_output(self, module, args):
        pass


class _Targets:
    """The o_proj inputs (attention outputs ``[tokens, heads*hd]``, float64) of one site, batch by batch."""

    def __init__(self, site):
        self.site, self.values = site, []
        self.handles = [site.root.get_submodule(site.o_path()).register_forward_pre_hook(self._on_output)]

    def _on_output(self, module, args):
        a = args[0].detach()
        self.values.append(a.reshape(-1, a.shape[-1]).double())

    def remove(self):
        for h in self.handles:
            h.remove()


def gather_output_moments(model, sites, ids: torch.Tensor, new: dict, *, batch_size: int = 4,
                          progress: bool = True, stop_after=None, targets: dict | None = None
                          ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """For each site, ``(Σ a_old a_newᵀ, Σ a_new a_newᵀ)``: the attention outputs (the o_proj inputs, ``[heads*hd]``)
    of the unconverted layer and of its converted weights ``new[site.fqn]``
    (:class:`~attnzoo.conversion.heads.AttnWeights`), both on the inputs the unconverted model gives the layer
    (the attention recomputed as for ``mixed_values``). What :func:`attnzoo.conversion.kv_pca.refit_output`
    reads. ``targets``: per site, ``a_old`` batch by batch given instead (another model's outputs on the same
    ``ids``: :func:`convert_sequentially`'s error-correcting refit)."""
    return {fqn: (acc.cross, acc.gram) for fqn, acc in
            _run(model, [_OutputPairs(s, new[s.fqn], (targets or {}).get(s.fqn)) for s in sites], ids, batch_size,
                 progress, "output refit", stop_after).items()}


class _StopForward(Exception):
    """Raised by the hook after the last site a pass needs: the rest of the model is not run."""


def _stop_after(module):
    def hook(mod, args, output):
        raise _StopForward

    return module.register_forward_hook(hook)


def _run(model, accs, ids, batch_size, progress, desc, stop_after=None):
    from tqdm.auto import tqdm

    check_positive_int("batch_size", batch_size)
    stop = _stop_after(stop_after.module) if stop_after is not None else None
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    extra = {"use_cache": False} if getattr(model.config, "use_cache", None) is not None else {}
    try:
        with torch.no_grad():
            for start in tqdm(range(0, ids.shape[0], batch_size), desc=desc, unit="batch", disable=not progress,
                              leave=False):
                try:
                    model(input_ids=ids[start:start + batch_size].to(device), **extra)
                except _StopForward:
                    pass
                except (TypeError, ValueError, AttributeError) as e:
                    raise ValueError(f"calibration runs model(input_ids=...) on token ids alone, and "
                                     f"{type(model).__name__} failed on it ({type(e).__name__}: {e}); a calibrated "
                                     "method needs a model that runs on token ids alone: use method='mean' or "
                                     "'svd'") from e
    finally:
        for acc in accs:
            acc.remove()
        if stop is not None:
            stop.remove()
        model.train(was_training)
    return {acc.site.fqn: acc for acc in accs}


def gather_statistics(model, sites, ids: torch.Tensor, *, batch_size: int = 4, inputs: bool = False,
                      mixed_values: bool = False, progress: bool = True, stop_after=None
                      ) -> dict[str, LayerStatistics]:
    """Run ``model`` on ``ids`` ``[n, seq_len]`` (``batch_size`` rows at a time, no gradients, hooks removed
    afterwards even on error) and return the :class:`LayerStatistics` of every site in ``sites``
    (:func:`attnzoo.patches.walker.attention_sites`), by qualified name. ``inputs``: also the input moments;
    ``mixed_values``: also the attention-mixed value moments (``v_mix``); ``stop_after``: a site after which the
    forward stops (a pass that needs nothing deeper)."""
    accs = [_Accumulator(s, inputs, mixed_values) for s in sites]
    return {fqn: acc.stats for fqn, acc in
            _run(model, accs, ids, batch_size, progress, "calibration", stop_after).items()}


def calibrate(model, sites, spec: str | None = None, sequences: int = DEFAULT_SEQUENCES,
              seq_len: int = DEFAULT_SEQ_LEN, *, tokenizer=None, inputs: bool = False, mixed_values: bool = False,
              batch_size: int = 4, progress: bool = True) -> Calibration:
    """One calibration pass of ``model`` over the data ``spec`` (:func:`calibration_ids`; text is tokenized with
    ``tokenizer``, by default the one saved where the model was loaded from, :func:`model_tokenizer`)."""
    ids = _model_ids(model, spec, sequences, seq_len, tokenizer)
    layers = gather_statistics(model, sites, ids, batch_size=batch_size, inputs=inputs, mixed_values=mixed_values,
                               progress=progress)
    return Calibration(layers, "builtin" if spec is None else str(spec), ids)


def _model_ids(model, spec, sequences, seq_len, tokenizer=None) -> torch.Tensor:
    if tokenizer is None and spec is not None and not str(spec).startswith("builtin"):
        tokenizer = model_tokenizer(model)
    return calibration_ids(spec, sequences, seq_len, tokenizer=tokenizer,
                           vocab_size=getattr(model.config, "vocab_size", None))


def convert_sequentially(model, sites, spec: str | None, sequences: int, seq_len: int, *, convert, write,
                         refit=None, reference_sites: dict | None = None, mixed_values: bool = False,
                         batch_size: int = 4, progress: bool = True) -> dict:
    """``calib_order='sequential'``: the sites from the first layer to the last, each measured on the model whose
    earlier sites are already converted, then converted and written into the model at once, so the next site's
    statistics see the converted layers' outputs (GPTQ's order). Each pass stops after its site.

    With ``refit``, the output projection is then refitted by least squares. Its target is, with
    ``reference_sites`` (the same sites, by name, in an unconverted copy of the model), the *original model's*
    attention outputs on the same tokens: the converted layer is asked to give what the original gives on the
    original inputs, so each layer also repairs the error of the converted layers below it (error-correcting; the
    better on SmolLM2-135M MQA, docs/calibration.md). Without, the target is the unconverted layer on the converted
    prefix's inputs (GPTQ's own target).

    ``convert(site, stats) -> weights``; ``refit(site, weights, cross, gram) -> weights`` (or None);
    ``write(site, weights)`` puts them into the model. Returns the written weights by site name. ``sites`` must be in
    forward order; the model is changed in place (the caller converts a model it owns)."""
    from tqdm.auto import tqdm

    ids = _model_ids(model, spec, sequences, seq_len)
    out = {}
    for site in tqdm(sites, desc="sequential calibration", unit="layer", disable=not progress, leave=False):
        stats = gather_statistics(model, [site], ids, batch_size=batch_size, mixed_values=mixed_values,
                                  progress=False, stop_after=site)[site.fqn]
        w = convert(site, stats)
        if refit is not None:
            targets = None
            if reference_sites is not None:  # the original's attention outputs at this site, batch by batch
                ref = reference_sites[site.fqn]
                targets = {site.fqn: _run(ref.root, [_Targets(ref)], ids, batch_size, False, "targets",
                                          ref)[ref.fqn].values}
            cross, gram = gather_output_moments(model, [site], ids, {site.fqn: w}, batch_size=batch_size,
                                                progress=False, stop_after=site, targets=targets)[site.fqn]
            w = refit(site, w, cross, gram)
        write(site, w)
        out[site.fqn] = w
    return out
