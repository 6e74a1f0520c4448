"""Experiment (round 6): hardware counters of the sliding-window kernels, and two follow-ups they suggested.

Not library code: a record of what ran for round 6 of ``benchmarks/results/sparse-band-experiments-h200.md``.
Case as in rounds 1-5: sliding window +-256, N=16384, batch 1, 12 heads, head_dim 64, bf16, bidirectional.

Subcommands (on an H200, from the repo root, ``ATTNZOO_SPARSE_AUTOTUNE=0``):

``target prod``
    ncu target: after three warm-up steps, one profiled forward + backward (dO given) of the production Triton
    kernels and of compiled FlexAttention (plain ``mask_mod``)::

        ncu --clock-control none --profile-from-start off --kernel-name-base function \\
            -k 'regex:_fwd_kernel|_dq_kernel|_dkdv_kernel|triton_tem' --set full --import-source no \\
            -o $OUT/band python benchmarks/experiments/sparse_band_profile.py target prod
        ncu -i $OUT/band.ncu-rep --page details --print-units base > $OUT/details.txt
        ncu -i $OUT/band.ncu-rep --page source --csv --print-source sass > $OUT/source.csv

``target gluon``
    the same for round 5's Gluon kernels (forward, forward with ``DIAG=7``, dQ, dK/dV).

``summary DETAILS SOURCE``
    the tables of round 6 from those two exports: per kernel the launch and occupancy figures, then its SASS
    split by how often each instruction ran (once per program, once per masked edge block, once per
    unmasked block, ...) with that part's share of the stall samples and of the executed instructions.

``occupancy``
    times forward + backward (dO given, CUDA-graph replay) with the dQ and dK/dV kernels recompiled at other
    ``num_stages`` / ``maxnreg`` settings, so that 4 programs fit on an SM instead of 3.

``sass``
    (CPU; Triton's wheel carries ptxas and cuobjdump) compiles the three band kernels for sm_90a with the
    launch's divisibility hints and the configs above, and prints registers, SASS instruction counts and a few
    opcode counts. The round's mask rewrites were edits of ``_keep`` / ``_keep_t`` in
    ``attnzoo/ops/sparse/triton_kernel.py`` (MASK == 1) run through this: ``dd = (n - m - LO)`` bitcast to
    uint32 and compared with ``HI - LO``; and the same two compares without the ``m >= 0`` term.

The third experiment of the round, a forward that takes each row's self-score as a fixed softmax reference
(no running max), was a change to ``attnzoo/ops/sparse/triton_kernel.py``; it is kept as
``sparse_band_fixed_reference.patch`` (against commit 0e8a420) with its timing in the results file.
"""
from __future__ import annotations

import collections
import csv
import os
import re
import sys

N, W = 16384, 256


def _inputs(grad: bool):
    import torch
    return tuple(torch.randn(1, 12, N, 64, device="cuda", dtype=torch.bfloat16, requires_grad=grad)
                 for _ in range(4))


def target(which: str) -> None:
    import torch
    sys.path.insert(0, os.getcwd())
    if which == "prod":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        from attnzoo.ops import sparse_attention
        from attnzoo.ops.sparse import SlidingWindow
        q, k, v, do = _inputs(True)
        pat = SlidingWindow(window=W)
        flex = torch.compile(flex_attention, dynamic=False)
        bm = create_block_mask(lambda b, h, qi, ki: (qi - ki).abs() <= W, None, None, N, N, device="cuda")

        def step():
            torch.autograd.grad(sparse_attention(q, k, v, pat, backend="triton"), (q, k, v), do)
            torch.autograd.grad(flex(q, k, v, block_mask=bm), (q, k, v), do)
    else:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import sparse_band_gluon as g
        q, k, v, do = _inputs(False)
        fwd, dq_cfg, dkdv_cfg = (64, 64, 4, 4, 1), (64, 64, 3, 4, 0), (64, 64, 3, 4, 1)

        def step():
            o, lse = g.run_fwd(q, k, v, -W, W, 0.125, fwd)
            g.run_fwd(q, k, v, -W, W, 0.125, fwd, 7)
            _, delta = g.run_dq(q, k, v, o, lse, do, -W, W, 0.125, dq_cfg)
            g.run_dkdv(q, k, v, do, lse, delta, -W, W, 0.125, dkdv_cfg)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    step()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


_FIGURES = ("Duration", "SM Frequency", "Registers Per Thread", "Dynamic Shared Memory Per Block",
            "Theoretical Occupancy", "Achieved Occupancy", "Issue Slots Busy", "Eligible Warps Per Scheduler",
            "Executed Instructions")


def _num(x: str) -> float:
    try:
        return float(x.replace(",", ""))
    except ValueError:
        return 0.0


def summary(details: str, source: str) -> None:
    """Print the round-6 tables from ncu's details page (text) and source page (CSV with SASS)."""
    heads, figs = [], []
    with open(details) as fh:
        lines = fh.read().splitlines()
    for line in lines:
        m = re.match(r"\s{2}(\S+) \((\d+), (\d+), 1\)x\((\d+), 1, 1\)", line)
        if m:
            heads.append(f"{m.group(1)} grid {m.group(2)}x{m.group(3)} x {m.group(4)} threads")
            figs.append({})
            continue
        for f in _FIGURES:
            if figs and re.match(rf"\s+{f}\s", line) and f not in figs[-1]:
                figs[-1][f] = line.split()[-1]
    print("| kernel | " + " | ".join(_FIGURES) + " |")
    print("|---" * (len(_FIGURES) + 1) + "|")
    for h, f in zip(heads, figs):
        print(f"| {h} | " + " | ".join(f.get(x, "") for x in _FIGURES) + " |")
    kernels, hdr = [], None
    with open(source, newline="") as fh:
        rows = list(csv.reader(fh))
    for r in rows:
        if r and r[0] == "Kernel Name":
            kernels.append((r[1], []))
            hdr = None
        elif r and r[0] == "Address":
            hdr = r
        elif kernels and hdr and r:
            kernels[-1][1].append(dict(zip(hdr, r)))
    for name, ins in kernels:
        stall_cols = [c for c in ins[0] if c.startswith("stall_") and "Not Issued" not in c]
        total_s = sum(_num(i["Warp Stall Sampling (All Samples)"]) for i in ins)
        total_e = sum(_num(i["Instructions Executed"]) for i in ins)
        stalls = collections.Counter()
        parts = collections.defaultdict(lambda: [0, 0.0, 0.0, collections.Counter()])
        for i in ins:
            e, s = _num(i["Instructions Executed"]), _num(i["Warp Stall Sampling (All Samples)"])
            tok = i["Source"].split()
            op = (tok[1] if tok and tok[0].startswith("@") else tok[0] if tok else "").split(".")[0]
            part = parts[e]
            part[0] += 1
            part[1] += s
            part[2] += e
            part[3][op] += 1
            for c in stall_cols:
                stalls[c[6:]] += _num(i[c])
        st = sum(stalls.values()) or 1.0
        print(f"\n{name}: {total_e:.0f} warp instructions, {total_s:.0f} samples; stalls: "
              + ", ".join(f"{k} {v / st:.0%}" for k, v in stalls.most_common(6)))
        print("| runs per instruction | instructions | share of samples | share of executed | most frequent opcodes |")
        print("|---|---|---|---|---|")
        for e, (n, s, ee, ops) in sorted(parts.items(), key=lambda kv: -kv[1][1])[:4]:
            print(f"| {e:.0f} | {n} | {s / total_s:.1%} | {ee / total_e:.1%} | "
                  + " ".join(f"{k} {v}" for k, v in ops.most_common(8)) + " |")


def occupancy() -> None:
    import torch
    import triton.testing as tt
    sys.path.insert(0, os.getcwd())
    from attnzoo.ops import sparse_attention
    from attnzoo.ops.sparse import SlidingWindow
    from attnzoo.ops.sparse import triton_kernel as tk
    q, k, v, do = _inputs(True)
    pat = SlidingWindow(window=W)

    def med(fn):
        fn()
        torch.cuda.synchronize()
        return round(tt.do_bench_cudagraph(fn, rep=200, return_mode="median") * 1000, 1)

    def step():
        return torch.autograd.grad(sparse_attention(q, k, v, pat, backend="triton"), (q, k, v), do)

    ref = step()
    base = {key: dict(cfg) for key, cfg in tk._tuned.items()}  # the configs ATTNZOO_SPARSE_AUTOTUNE=0 picks
    variants = {
        "base": {},
        "dq s2 r128": {"_dq_kernel": dict(num_stages=2, maxnreg=128)},
        "dq s2": {"_dq_kernel": dict(num_stages=2)},
        "dkdv r128": {"_dkdv_kernel": dict(maxnreg=128)},
        "dkdv s3 r128": {"_dkdv_kernel": dict(num_stages=3, maxnreg=128)},
        "fwd r120": {"_fwd_kernel": dict(maxnreg=120)},
        "both": {"_dq_kernel": dict(num_stages=2, maxnreg=128), "_dkdv_kernel": dict(maxnreg=128)},
    }
    for _ in range(2):
        for name, change in variants.items():
            for key in tk._tuned:
                tk._tuned[key] = {**base[key], **change.get(key[0].fn.__name__, {})}
            got = step()
            err = max((a.float() - b.float()).abs().max().item() for a, b in zip(got, ref))
            t = med(step)
            tf = med(lambda: sparse_attention(q.detach(), k.detach(), v.detach(), pat, backend="triton"))
            print(f"{name:14s} fwd+bwd {t:6.1f}  fwd {tf:6.1f}  bwd {t - tf:6.1f}  maxdiff {err:.3g}", flush=True)


def _signature(fn, consts):
    ptrs = {"KPM", "GPOS", "BITS", "FC", "FI", "PC", "PI", "IDS", "FCT", "FIT", "PCT", "PIT", "IDST", "ORDER",
            "ITEMS", "CNT"}
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in ptrs:
            sig[name] = "*i32"
        elif name in ("LSE", "DELTA", "SCR"):
            sig[name] = "*fp32"
        elif name in ("Q", "K", "V", "O", "OUT", "DO", "DQ", "DK", "DV"):
            sig[name] = "*bf16"
        else:
            sig[name] = "fp32" if name == "sm_scale" else "i32"
    # a launch at N=16384, 12 heads marks every pointer and every integer divisible by 16 except the head count
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if n not in consts and n not in ("H", "G", "sm_scale", "HK")}
    return sig, attrs


def sass() -> None:
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    sys.path.insert(0, os.getcwd())
    from attnzoo.ops.sparse import triton_kernel as tk
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    for kname, bm, bn, stages in (("_fwd_kernel", 64, 64, 2), ("_dq_kernel", 64, 64, 3), ("_dkdv_kernel", 32, 64, 2)):
        fn = getattr(tk, kname).fn
        consts = {k: v for k, v in dict(GROUPS=1, MODE=0, FMASK=0, PMASK=5, CAUSAL=False, HAS_KPM=False,
                                        HAS_GLOBAL=False, TILE=64, HEAD_DIM=64, PREC="tf32", BLOCK_M=bm,
                                        BLOCK_N=bn).items() if k in fn.arg_names}
        sig, attrs = _signature(fn, consts)
        k = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 128),
                           options={"num_warps": 4, "num_stages": stages})
        with tempfile.TemporaryDirectory() as td:
            ptx, cubin = os.path.join(td, "k.ptx"), os.path.join(td, "k.cubin")
            with open(ptx, "w") as fh:
                fh.write(k.asm["ptx"])
            r = subprocess.run([os.path.join(bindir, "ptxas"), "-v", "-arch=sm_90a", ptx, "-o", cubin],
                               capture_output=True, text=True, check=True)
            regs = re.search(r"Used (\d+) registers", r.stdout + r.stderr).group(1)
            out = subprocess.run([os.path.join(bindir, "cuobjdump"), "-sass", cubin], capture_output=True,
                                 text=True, check=True).stdout
        ins = [ln for ln in out.splitlines() if re.match(r"\s+/\*[0-9a-f]{4}\*/\s+\S", ln)]
        ops = collections.Counter(re.sub(r"^\s+/\*[0-9a-f]{4}\*/\s+(@!?U?P\w+\s+)?", "", ln).split()[0].split(".")[0]
                                  for ln in ins)
        print(f"{kname:13s} regs {regs:>3s} sass {len(ins):5d} | "
              + " ".join(f"{o} {ops[o]}" for o in ("ISETP", "FSEL", "IMAD", "LOP3", "PLOP3", "HGMMA", "MUFU")))


if __name__ == "__main__":
    cmd = sys.argv[1] if len(sys.argv) > 1 else ""
    if cmd == "target":
        target(sys.argv[2])
    elif cmd == "summary":
        summary(sys.argv[2], sys.argv[3])
    elif cmd == "occupancy":
        occupancy()
    elif cmd == "sass":
        sass()
    else:
        sys.exit(__doc__)
