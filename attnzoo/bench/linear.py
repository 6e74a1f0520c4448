"""Group ``linear``: the linear family (Performer causal and not, Linformer) against dense cuDNN attention and the
peers (lucidrains' performer and linformer, fla's ``chunk_linear_attn``), with the crossover length.

Shapes follow the peers (``peers_bench.py``, docs/linear.md): hidden 768, 12 heads (head_dim 64), batch 1, bf16,
256 features (Performer) / 256 slots (Linformer). Module rows take ``x [1, N, 768]`` to the output (projections
and feature maps included, as the peers' modules do); the "op" rows time the linear-attention op alone on feature
rows of width 256 (``elu(q) + 1``, ``elu(k) + 1`` inside the timed call, as the fla peer is timed), the comparison
at equal feature width with fla's raw kernel.

Sections:

* ``performer``: N=16384, causal and not: the ``performer`` module, the op (causal), dense cuDNN + qkv; causal
  also the window hybrid (``linear``, hedgehog features, ``window=64``) and where its time goes: the module with
  and without the window, the op alone at the hedgehog width (2 x head_dim = 128) with the window fused, without
  the window, and with the window part in PyTorch beside the linear kernels (the path before the fused window);
  non-causal also FAVOR+ after the projections with the feature map fused into the two GEMMs and the unfused
  way (the ``[b, h, n, m]`` feature rows written and read: what the fusion removes);
* ``linformer``: N=16384: the ``linformer`` module (k=256) against dense cuDNN + qkv (non-causal);
* ``crossover``: N = 4k, 16k, 64k: performer (causal and not) and linformer against dense cuDNN + qkv; the summary
  reports where each becomes faster (the crossover length, interpolated on log N).

The summary checks the issue's targets where the peers ran in the same call: Performer causal >= 50x lucidrains
and within 1.2x of fla's raw kernel at equal feature width, non-causal >= 3x lucidrains, Linformer fwd+bwd >= 2x
lucidrains.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import attnzoo
from attnzoo.ops.linear import linear_attention

from .measure import Case, Options, measure
from .record import Row

TITLE = "Performer (causal, non-causal) and Linformer vs dense cuDNN and the peers; crossover length"
SECTIONS = {
    "performer": "N=16384, causal and not: performer module, linear op at K=256, dense cuDNN + qkv",
    "linformer": "N=16384, k=256: linformer module vs dense cuDNN + qkv",
    "crossover": "N = 4k, 16k, 64k: performer and linformer vs dense cuDNN + qkv, crossover length",
}
PEERS = ("performer", "linformer")
EXTRA_COLUMNS = ("vs_dense",)

__all__ = ["run", "summary", "TITLE", "SECTIONS", "PEERS"]

HID, NH, FEATS, SLOTS = 768, 12, 256, 256
WINDOW = 64


def _dims(o: Options):
    return (64, 2, 16, 16) if o.smoke else (HID, NH, FEATS, SLOTS)


def _module(o: Options, name: str, n: int, causal: bool):
    hid, nh, feats, slots = _dims(o)
    if name == "performer":
        m = attnzoo.create("performer", dim=hid, heads=nh, features=feats, causal=causal)
    elif name == "linformer":
        m = attnzoo.create("linformer", dim=hid, heads=nh, k=min(slots, n), max_len=n)
    else:
        m = attnzoo.create("mha", dim=hid, heads=nh, causal=causal)
    return m.to(device=o.device, dtype=o.dtype)


def _module_case(o: Options, label: str, name: str, n: int, causal: bool) -> Case:
    def make():
        m = _module(o, name, n, causal)
        x = torch.randn(1, n, _dims(o)[0], device=o.device, dtype=o.dtype, requires_grad=True)
        return lambda: m(x)
    return Case(label, make, backend="triton" if o.cuda and name == "performer" else "torch")


def _op_case(o: Options, n: int) -> Case:
    hid, nh, feats, _ = _dims(o)
    hd = hid // nh

    def make():
        q, k = (torch.randn(1, nh, n, feats, device=o.device, dtype=o.dtype, requires_grad=True) for _ in range(2))
        v = torch.randn(1, nh, n, hd, device=o.device, dtype=o.dtype, requires_grad=True)
        return lambda: linear_attention(F.elu(q) + 1, F.elu(k) + 1, v, causal=True)
    return Case(f"attnzoo-linear-op(K{feats},causal)", make, backend="triton" if o.cuda else "torch")


def _favor_cases(o: Options, n: int) -> list[Case]:
    """Non-causal FAVOR+ on ``q, k, v`` (after the projections): the feature map fused into the two GEMMs
    (``favor_attention``; CUDA) and the unfused way (``favor_features`` materialising ``[b, h, n, m]`` rows, then
    the op), the difference being the bytes of the feature rows."""
    from attnzoo.ops.linear.favor import favor_attention
    from attnzoo.variants.feature_maps import favor_features, orthogonal_gaussian

    hid, nh, feats, _ = _dims(o)
    hd = hid // nh

    def make_inputs():
        proj = orthogonal_gaussian(feats, hd, 0).to(device=o.device, dtype=o.dtype)
        return proj, [torch.randn(1, nh, n, hd, device=o.device, dtype=o.dtype, requires_grad=True) for _ in range(3)]

    def fused():
        proj, (q, k, v) = make_inputs()
        return lambda: favor_attention(q, k, v, proj, scale=hd**-0.5)

    def unfused():
        proj, (q, k, v) = make_inputs()

        def fwd():
            qf, ql = favor_features(q, proj, hd**-0.5)
            kf, kl = favor_features(k, proj, hd**-0.5)
            return linear_attention(qf, kf, v, q_log=ql, k_log=kl)
        return fwd

    cases = [Case(f"attnzoo-favor-op(m{feats},features-materialised)", unfused, backend="torch")]
    if o.cuda:
        cases.insert(0, Case(f"attnzoo-favor-op(m{feats},fused)", fused, backend="triton"))
    return cases


def _hybrid_cases(o: Options, n: int) -> list[Case]:
    """The window hybrid (causal): modules ``linear`` (hedgehog) with and without the window, and the op alone at
    the hedgehog width (elu features inside the timed call, as the other op row): fused, without the window, and
    (CUDA) the window part in PyTorch beside the linear kernels. Module minus op: projections and feature maps;
    op with minus op without the window: the window's cost."""
    from attnzoo.ops.linear import triton_kernel
    from attnzoo.ops.linear.chunked import linear_attention_chunked

    hid, nh, _, _ = _dims(o)
    hd = hid // nh
    f = 2 * hd

    def module(window: int) -> Case:
        def make():
            m = attnzoo.create("linear", dim=hid, heads=nh, causal=True, feature_map="hedgehog", window=window)
            m = m.to(device=o.device, dtype=o.dtype)
            x = torch.randn(1, n, hid, device=o.device, dtype=o.dtype, requires_grad=True)
            return lambda: m(x)
        tag = f",window{window}" if window else ""
        return Case(f"attnzoo-linear(hedgehog{tag},causal)", make, backend="triton" if o.cuda else "torch")

    def op(window: int, unfused: bool = False) -> Case:
        def make():
            qx, kx = (torch.randn(1, nh, n, f, device=o.device, dtype=o.dtype, requires_grad=True) for _ in range(2))
            q, k, v = (torch.randn(1, nh, n, hd, device=o.device, dtype=o.dtype, requires_grad=True) for _ in range(3))
            if unfused:
                return lambda: linear_attention_chunked(F.elu(qx) + 1, F.elu(kx) + 1, v, causal=True, window=window,
                                                        q=q, k=k, causal_fn=triton_kernel.causal_parts_fused)
            return lambda: linear_attention(F.elu(qx) + 1, F.elu(kx) + 1, v, causal=True, window=window, q=q, k=k)
        tag = f",window{window}" if window else ""
        return Case(f"attnzoo-linear-op(K{f}{tag},causal{',window-in-torch' if unfused else ''})", make,
                     backend="triton" if o.cuda else "torch")

    cases = [module(WINDOW), module(0), op(WINDOW), op(0)]
    if o.cuda:
        cases.append(op(WINDOW, unfused=True))
    return cases


def _tag(causal: bool) -> str:
    return ",causal" if causal else ""


def performer_cases(o: Options) -> list[Row]:
    n = 256 if o.smoke else 16384
    rows: list[Row] = []
    for causal in (False, True):
        cases = [_module_case(o, f"attnzoo-performer(m{_dims(o)[2]}{_tag(causal)})", "performer", n, causal),
                 _module_case(o, f"dense-cudnn+qkv{'(causal)' if causal else ''}", "mha", n, causal)]
        if causal:
            cases.append(_op_case(o, n))
            cases += _hybrid_cases(o, n)
        else:
            cases += _favor_cases(o, n)
        rows += measure(o, "performer", n, cases)
    return rows


def linformer_cases(o: Options) -> list[Row]:
    n = 256 if o.smoke else 16384
    cases = [_module_case(o, f"attnzoo-linformer(k{_dims(o)[3]})", "linformer", n, False),
             _module_case(o, "dense-cudnn+qkv", "mha", n, False)]
    return measure(o, "linformer", n, cases)


def crossover_cases(o: Options) -> list[Row]:
    rows: list[Row] = []
    for n in [128, 512] if o.smoke else [4096, 16384, 65536]:
        cases = []
        for causal in (False, True):
            cases.append(_module_case(o, f"performer{_tag(causal)}", "performer", n, causal))
            cases.append(_module_case(o, f"dense{_tag(causal)}", "mha", n, causal))
        cases.append(_module_case(o, "linformer", "linformer", n, False))
        rows += measure(o, "crossover", n, cases)
    return rows


def run(options: Options) -> list[Row]:
    rows: list[Row] = []
    if options.wants("performer"):
        rows += performer_cases(options)
    if options.wants("linformer"):
        rows += linformer_cases(options)
    if options.wants("crossover"):
        rows += crossover_cases(options)
    for r in rows:  # time against dense at the same length and mode
        dense_name = {"performer": "dense-cudnn+qkv(causal)" if "causal" in r.name else "dense-cudnn+qkv",
                      "linformer": "dense-cudnn+qkv",
                      "crossover": "dense,causal" if "causal" in r.name else "dense"}[r.group]
        d = _find(rows, r.group, dense_name, r.n, r.mode)
        if d is not None and r.ok and d.ok and d is not r:
            r.extra["vs_dense"] = round(d.ms / r.ms, 2)
    return rows


def _find(rows, group, name, n, mode):
    return next((r for r in rows if r.group == group and r.name == name and r.n == n and r.mode == mode), None)


def crossover(rows: list[Row], name: str, dense: str, mode: str) -> str:
    """Where ``name`` becomes faster than ``dense`` in the crossover section (log-linear between measured N)."""
    pts = sorted((r.n, r.ms, d.ms) for r in rows if r.group == "crossover" and r.name == name and r.mode == mode
                 and r.ok for d in [_find(rows, "crossover", dense, r.n, mode)] if d is not None and d.ok)
    if not pts:
        return "not measured"
    ratios = [(n, math.log(ms / dms)) for n, ms, dms in pts]
    if ratios[0][1] < 0:
        return f"<= {ratios[0][0]} (faster at every measured length)"
    for (n0, r0), (n1, r1) in zip(ratios, ratios[1:]):
        if r0 >= 0 > r1:
            t = r0 / (r0 - r1)
            return f"~{round(math.exp(math.log(n0) + t * (math.log(n1) - math.log(n0))))}"
    return f"> {ratios[-1][0]} (slower at every measured length)"


def summary(rows: list[Row], peers: list[Row], out_dir: str | None = None, stem: str = "linear") -> list[str]:
    from ..table import markdown_table

    out: list[str] = []
    cross = [{"variant": name, "mode": mode, "crossover N vs dense cuDNN + qkv": crossover(rows, name, dense, mode)}
             for name, dense in (("performer", "dense"), ("performer,causal", "dense,causal"), ("linformer", "dense"))
             for mode in ("fwd", "fwd+bwd")]
    if any(r.group == "crossover" for r in rows):
        out += ["## crossover length", "", markdown_table(cross), ""]
    out += ["## targets", ""]

    def peer(name, n, mode):
        return next((p for p in peers if p.name == name and p.n == n and p.mode == mode and p.ok), None)

    def check(what, ok, detail):
        out.append(f"- {'PASS' if ok else 'FAIL'} {what}: {detail}")

    n = 16384
    for mode in ("fwd", "fwd+bwd"):
        for causal, need in ((True, 50), (False, 3)):
            mine = _find(rows, "performer", f"attnzoo-performer(m{FEATS}{_tag(causal)})", n, mode)
            lr = peer(f"lucidrains-performer(m256{_tag(causal)})", n, mode)
            if mine and mine.ok and lr:
                check(f"performer{_tag(causal)} N={n} {mode} >= {need}x lucidrains", lr.ms / mine.ms >= need,
                      f"{lr.ms:.3f} / {mine.ms:.3f} ms = {lr.ms / mine.ms:.1f}x")
        op = _find(rows, "performer", f"attnzoo-linear-op(K{FEATS},causal)", n, mode)
        fla = peer("fla-chunk_linear_attn(K256,causal)", n, mode)
        if op and op.ok and fla:
            check(f"linear op (K=256, causal) N={n} {mode} within 1.2x of fla chunk_linear_attn", op.ms <= 1.2 * fla.ms,
                  f"{op.ms:.3f} vs {fla.ms:.3f} ms = {op.ms / fla.ms:.2f}x its time")
    out += _hybrid_breakdown(rows)
    for mode in ("fwd", "fwd+bwd"):
        fused = [r for r in rows if r.name.startswith("attnzoo-favor-op(") and r.name.endswith(",fused)")
                 and r.mode == mode and r.ok]
        for r in fused:
            un = _find(rows, r.group, r.name.replace(",fused)", ",features-materialised)"), r.n, mode)
            if un is not None and un.ok:
                out.append(f"- FAVOR+ non-causal N={r.n} {mode}: feature map fused {r.ms:.3f} ms vs the feature rows "
                           f"materialised {un.ms:.3f} ms ({un.ms / r.ms:.2f}x)")
    mine = _find(rows, "linformer", f"attnzoo-linformer(k{SLOTS})", n, "fwd+bwd")
    lr = peer("lucidrains-linformer(k256)", n, "fwd+bwd")
    if mine and mine.ok and lr:
        check(f"linformer N={n} fwd+bwd >= 2x lucidrains", lr.ms / mine.ms >= 2,
              f"{lr.ms:.3f} / {mine.ms:.3f} ms = {lr.ms / mine.ms:.1f}x")
    if not peers:
        out.append("- (no peers in this run: the peer ratios are not checked; pass `--peers PATH/peers_bench.py`)")
    return out


def _hybrid_breakdown(rows: list[Row]) -> list[str]:
    """Where the window hybrid's time goes (ms, from the performer section's rows)."""
    from ..table import markdown_table

    widths = {r.name[len("attnzoo-linear-op(K"):].split(",")[0] for r in rows
              if r.name.startswith("attnzoo-linear-op(K") and f",window{WINDOW}," in r.name}
    if len(widths) != 1:
        return []
    f = widths.pop()
    names = {"module": f"attnzoo-linear(hedgehog,window{WINDOW},causal)",
             "module, no window": "attnzoo-linear(hedgehog,causal)",
             "op": f"attnzoo-linear-op(K{f},window{WINDOW},causal)",
             "op, no window": f"attnzoo-linear-op(K{f},causal)",
             "op, window in PyTorch": f"attnzoo-linear-op(K{f},window{WINDOW},causal,window-in-torch)"}
    table = []
    for n, mode in sorted({(r.n, r.mode) for r in rows if r.group == "performer" and r.name == names["module"]}):
        ms = {k: r.ms for k, name in names.items() for r in [_find(rows, "performer", name, n, mode)] if r and r.ok}
        if "module" not in ms or "op" not in ms:
            continue

        def diff(a, b):
            return f"{ms[a] - ms[b]:.3f}" if a in ms and b in ms else "-"
        table.append({"n": n, "mode": mode, "module ms": f"{ms['module']:.3f}",
                      "projections + feature maps": diff("module", "op"), "op ms": f"{ms['op']:.3f}",
                      "the window (op - op without)": diff("op", "op, no window"),
                      "window in PyTorch / fused": f"{ms['op, window in PyTorch'] / ms['op']:.2f}x"
                      if "op, window in PyTorch" in ms else "-"})
    if not table:
        return []
    return ["", f"## where the window hybrid's time goes (hedgehog features, window {WINDOW}, ms)", "",
            markdown_table(table), ""]
