"""MLA's absorbed decode: the split-KV Triton kernel (under Triton's interpreter on CPU, compiled on a GPU) and the
latent-attention op against the float64 references, expanded and absorbed."""
import os
import sys

import pytest
import torch

if not torch.cuda.is_available() and "attnzoo.ops.sparse.triton_kernel" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"  # CPU only: on a GPU the kernels compile
pytest.importorskip("triton")

from attnzoo.ops.mla import (absorb_query, absorbed_output, latent_attention, latent_attention_reference,  # noqa: E402
                             mla_absorbed_reference, mla_expanded_reference)
from attnzoo.ops.mla.triton_decode import DecodeConfig, choose_config, interpreted, latent_decode  # noqa: E402

pytestmark = pytest.mark.skipif(not interpreted() and not torch.cuda.is_available(),
                                reason="the kernel module was imported without TRITON_INTERPRET=1")
DEV = "cuda" if torch.cuda.is_available() and not interpreted() else "cpu"


def _inputs(b=2, h=4, n=1, s=37, r=16, dr=8, rh=1, dn=6, dv=5, dtype=torch.float32, strided=True):
    q_nope = torch.randn(b, h, n, dn, dtype=torch.float64)
    q_rope = torch.randn(b, h, n, dr, dtype=torch.float64)
    if strided:  # the cache as a transformers-style view: latent and rope key of one [B, S, R + Rh*Dr] buffer
        buf = torch.randn(b, s + 5, r + rh * dr, dtype=torch.float64)[:, :s]
        c, k_rope = buf[..., :r], buf[..., r:].unflatten(-1, (rh, dr))
    else:
        c, k_rope = torch.randn(b, s, r, dtype=torch.float64), torch.randn(b, s, rh, dr, dtype=torch.float64)
    w_kb, w_vb = torch.randn(h, dn, r, dtype=torch.float64) / 3, torch.randn(h, dv, r, dtype=torch.float64) / 3
    return q_nope, q_rope, c, k_rope, w_kb, w_vb


def test_absorbed_equals_expanded_in_float64():
    q_nope, q_rope, c, k_rope, w_kb, w_vb = _inputs(n=5, rh=2)
    kpm = torch.ones(2, 37, dtype=torch.bool)
    kpm[1, :4] = False
    a = mla_expanded_reference(q_nope, q_rope, c, k_rope, w_kb, w_vb, scale=0.3, causal=True, key_padding_mask=kpm)
    b = mla_absorbed_reference(q_nope, q_rope, c, k_rope, w_kb, w_vb, scale=0.3, causal=True, key_padding_mask=kpm)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", [
    dict(),  # one split chosen on the interpreter's 4 "SMs"
    dict(s=200, cfg=DecodeConfig(splits=3, block_n=16)),  # several pieces, a ragged last one
    dict(h=8, rh=2, s=70, cfg=DecodeConfig(block_h=16, splits=2)),  # per-head rope keys
    dict(h=40, s=9, r=24, dr=4, cfg=DecodeConfig(block_h=16)),  # heads over several tiles, odd widths
    dict(s=64, kpm=True, cfg=DecodeConfig(splits=4, block_n=16)),  # padding, one sequence's first pieces empty
    dict(s=200, r=32, dr=16, cfg=DecodeConfig(splits=3, block_n=16, value_split=2)),  # halves, pow2 widths
    dict(h=40, s=9, r=24, dr=4, cfg=DecodeConfig(block_h=16, value_split=2)),  # value halves of an odd width
    dict(h=8, rh=2, s=64, r=40, kpm=True, cfg=DecodeConfig(block_h=16, splits=4, block_n=16, value_split=2)),
], ids=["one-split", "splits", "per-head-rope", "head-tiles", "padding", "vsplit", "vsplit-odd", "vsplit-padding"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_kv_kernel_matches_float64(case, dtype):
    """fp32 <= 1e-5 and bf16 <= 2e-2 against the expanded float64 reference."""
    cfg = case.pop("cfg", None)
    use_kpm = case.pop("kpm", False)
    q_nope, q_rope, c, k_rope, w_kb, w_vb = _inputs(**case)
    s = c.shape[1]
    kpm = None
    if use_kpm:
        kpm = torch.ones(2, s, dtype=torch.bool)
        kpm[1, :40] = False  # left padding: the first pieces of sequence 1 see nothing
    want = mla_expanded_reference(q_nope, q_rope, c, k_rope, w_kb, w_vb, scale=0.25, key_padding_mask=kpm)
    q_lat = absorb_query(q_nope, w_kb)
    to = dict(device=DEV, dtype=dtype)
    o_lat = latent_decode(q_lat.to(**to), q_rope.to(**to), c.to(**to), k_rope.to(**to), scale=0.25,
                          key_padding_mask=None if kpm is None else kpm.to(DEV), config=cfg)
    got = absorbed_output(o_lat.double().cpu(), w_vb)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def test_a_sequence_with_nothing_to_attend_gives_zero():
    q_nope, q_rope, c, k_rope, w_kb, _ = _inputs(s=20)
    kpm = torch.ones(2, 20, dtype=torch.bool)
    kpm[0] = False
    o = latent_decode(absorb_query(q_nope, w_kb).float().to(DEV), q_rope.float().to(DEV), c.float().to(DEV),
                      k_rope.float().to(DEV), scale=0.3, key_padding_mask=kpm.to(DEV), config=DecodeConfig(splits=2))
    assert torch.equal(o[0].cpu(), torch.zeros_like(o[0].cpu()))
    ref = latent_attention_reference(absorb_query(q_nope, w_kb), q_rope, c, k_rope, scale=0.3, key_padding_mask=kpm)
    torch.testing.assert_close(o.double().cpu(), ref, rtol=1e-5, atol=1e-5)


def test_op_dispatch_and_masks():
    """latent_attention: the kernel where it serves (one token, a [B, 1, 1, S] mask as padding), the dense op for
    several tokens with causality; both equal the reference."""
    q_nope, q_rope, c, k_rope, w_kb, _ = _inputs(n=3, s=30)
    q_lat = absorb_query(q_nope, w_kb)
    f = lambda t: t.float().to(DEV)  # noqa: E731
    ref = latent_attention_reference(q_lat, q_rope, c, k_rope, scale=0.3, causal=True)
    got = latent_attention(f(q_lat), f(q_rope), f(c), f(k_rope), scale=0.3, causal=True)
    torch.testing.assert_close(got.double().cpu(), ref, rtol=1e-5, atol=1e-5)
    keep = torch.rand(2, 1, 1, 30) > 0.3
    keep[..., -1] = True
    ref = latent_attention_reference(q_lat[:, :, -1:], q_rope[:, :, -1:], c, k_rope, scale=0.3, mask=keep)
    got = latent_attention(f(q_lat[:, :, -1:]), f(q_rope[:, :, -1:]), f(c), f(k_rope), scale=0.3, mask=keep.to(DEV),
                           backend="triton")
    torch.testing.assert_close(got.double().cpu(), ref, rtol=1e-5, atol=1e-5)


def test_split_choice_aims_at_several_programs_per_sm():
    """From shapes alone: at least PROGRAMS_PER_SM programs per SM where the sequence is long enough, pieces of at
    least 256 keys, partial outputs under 1/8 of the cache bytes."""
    from attnzoo.ops.mla.triton_decode import PROGRAMS_PER_SM, choose_splits

    cpu = torch.device("cpu")  # 4 "SMs" off CUDA
    assert choose_config(1, 16, 1, 4096, 512, 64, 2, cpu).splits == 12  # 1 program -> 12 pieces for 3 per SM
    assert choose_config(8, 16, 1, 4096, 512, 64, 2, cpu).splits == 2  # 8 programs -> 2 pieces
    assert choose_config(1, 16, 1, 40, 512, 64, 2, cpu).splits == 1  # too short to split
    # DeepSeek-V3 on an H100 (132 SMs), batch 32 at 8k: 2 head tiles x 32 sequences = 64 programs; the partials'
    # cap (128 heads x 512 x 2 B written and read per piece against 8192 x 1152 B of cache) allows 4 pieces
    assert choose_splits(32, 128, 1, 8192, 512, 64, 2, 64, 32, 1, 132) == 4
    assert choose_splits(32, 128, 1, 8192, 512, 64, 2, 64, 32, 1, 132, traffic_cap=False) == 7
    assert choose_splits(32, 128, 1, 8192, 512, 64, 2, 64, 32, 2, 132, traffic_cap=False) == 4  # two value parts
    assert 64 * 7 >= PROGRAMS_PER_SM * 132
    assert choose_splits(64, 128, 1, 32768, 512, 64, 2, 64, 32, 1, 132) == 4


def test_module_decodes_on_the_kernel_as_the_full_forward():
    import attnzoo
    from attnzoo.ops.mla import use_latent_backend

    m = attnzoo.create("mla", dim=32, heads=4, kv_rank=16, rope_dim=8, nope_dim=6, v_dim=5, causal=True,
                       rope_keys="per_head", kv_heads=2).to(DEV).eval()
    x = torch.randn(2, 9, 32, device=DEV)
    with torch.no_grad():
        full = m(x)
        cache = m.make_cache()
        outs = [m(x[:, :5], cache=cache)]
        with use_latent_backend("triton"):
            outs += [m(x[:, i:i + 1], cache=cache) for i in range(5, 9)]
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-5, atol=1e-5)


def test_tuner_candidates_keep_head_tiles_within_the_group():
    from attnzoo.ops.mla import triton_decode as td

    kept = td.candidates(8, 1, 512)
    assert kept and all(c.block_h == 16 for c in kept) and len({c.kernel_dict().values().__repr__() for c in kept})
    assert td.candidates(128, 1, 512)[0] == td.DecodeConfig(block_h=64, block_n=32, num_warps=8, num_stages=2,
                                                           value_split=1)  # the heuristic's first
    assert {c.value_split for c in td.candidates(128, 1, 512)} == {1, 2}


def test_the_custom_op_and_torch_compile_give_the_kernel_s_result():
    """``attnzoo::mla_decode``: the op in eager, and ``torch.compile(fullgraph=True)`` of a function around
    :func:`latent_decode` (traced as one opaque node), both equal the direct call."""
    q_nope, q_rope, c, k_rope, w_kb, _ = _inputs(s=50)
    f = lambda t: t.float().to(DEV)  # noqa: E731
    args = (f(absorb_query(q_nope, w_kb)), f(q_rope), f(c), f(k_rope))
    kpm = (torch.rand(2, 50) > 0.2).to(DEV)
    want = latent_decode(*args, scale=0.3, key_padding_mask=kpm)
    got = latent_decode(*args, scale=0.3, key_padding_mask=kpm, compiled=True)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    compiled = torch.compile(lambda a, b, cc, d, m: latent_decode(a, b, cc, d, scale=0.3, key_padding_mask=m),
                             backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(*args, kpm), want, rtol=0, atol=0)


def test_the_table_picks_the_nearest_measured_winner_and_its_occupancy():
    from attnzoo.ops.mla import triton_decode as td

    cpu = torch.device("cpu")
    win = dict(block_h=64, block_n=16, num_warps=4, num_stages=3, value_split=2, splits=6)
    entries = [dict(device="cpu", arch="cpu", group=128, kv_rank=512, rope_dim=64, dtype="bfloat16", batch=32,
                    k_len=8192, config=win),
               dict(device="cpu", arch="cpu", group=128, kv_rank=512, rope_dim=64, dtype="bfloat16", batch=64,
                    k_len=32768, config={**win, "value_split": 1, "splits": 1}),
               dict(device="other", arch="sm90", group=128, kv_rank=512, rope_dim=64, dtype="bfloat16", batch=32,
                    k_len=8192, config=win)]
    e = td.table_entry(cpu, 128, 512, 64, torch.bfloat16, 32, 16384, entries)
    assert e is entries[0]
    assert td.table_entry(cpu, 128, 512, 64, torch.bfloat16, 64, 65536, entries) is entries[1]
    assert td.table_entry(cpu, 128, 512, 64, torch.float16, 32, 8192, entries) is None  # no fp16 entry
    assert td.table_entry(cpu, 16, 512, 64, torch.bfloat16, 32, 8192, entries) is None  # another group
    same = td._from_entry(entries[0], 32, 128, 1, 8192, 512, 64, 2, 4)
    assert same.splits == 6 and same.value_split == 2 and same.block_n == 16  # the measured shape: as measured
    # half the batch: twice the pieces for the same programs per SM (12: 32 x 2 tiles x 2 parts x 6 / 4 SMs)
    assert td._from_entry(entries[0], 16, 128, 1, 8192, 512, 64, 2, 4).splits == 12
    assert td._from_entry(entries[0], 16, 128, 1, 1024, 512, 64, 2, 4).splits == 4  # pieces of >= 256 keys


def test_the_shipped_table_is_well_formed():
    from attnzoo.ops.mla import triton_decode as td

    for e in td.load_table():
        assert {"device", "arch", "group", "kv_rank", "rope_dim", "dtype", "batch", "k_len"} <= set(e)
        assert td.DecodeConfig(**e["config"]).kernel_fields_set()


def test_the_sweep_s_space_and_table_round_trip(tmp_path):
    """benchmarks/mla_decode_sweep.py: 72 kernel configs (2 variants x 2 head tiles x 3 key tiles x 2 warps x 3
    stages); ``write_table`` replaces this card's entries of the swept family, keeps the rest, and the library reads
    the result back (the measured shape runs its measured config)."""
    import importlib.util
    import pathlib

    from attnzoo.ops.mla import triton_decode as td

    path = pathlib.Path(__file__).parent.parent / "benchmarks" / "mla_decode_sweep.py"
    spec = importlib.util.spec_from_file_location("mla_decode_sweep", path)
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    space = sweep.kernel_space(False)
    assert len(space) == 72 and len({sweep._name(k) for k in space}) == 72
    table = tmp_path / "decode_configs.json"
    other = dict(device="cpu", arch="cpu", group=16, kv_rank=512, rope_dim=64, dtype="bfloat16", batch=8, k_len=4096,
                 config=dict(block_h=16, block_n=32, num_warps=4, num_stages=2, value_split=1, splits=2))
    table.write_text(__import__("json").dumps({"entries": [other]}))
    win = dict(batch=32, k_len=8192, ms=0.2, gpu_ms=0.19, gbps=1500.0, pct_of_copy=50.0, block_h=64, block_n=16,
               num_warps=4, num_stages=3, value_split=2, splits=6)
    report = dict(commit="abc", date="today", torch="t", triton="tr")
    for _ in range(2):  # twice: the second replaces the first
        sweep.write_table(str(table), [win], "cpu", "cpu", report)
    entries = td.load_table(table)
    assert len(entries) == 2 and entries[0] == other
    e = td.table_entry(torch.device("cpu"), 128, 512, 64, torch.bfloat16, 32, 8192, entries)
    cfg = td._from_entry(e, 32, 128, 1, 8192, 512, 64, 2, 4)
    assert (cfg.block_h, cfg.block_n, cfg.num_warps, cfg.num_stages, cfg.value_split, cfg.splits) == (64, 16, 4, 3,
                                                                                                      2, 6)


@pytest.mark.skipif(not interpreted(), reason="--cpu-check runs the kernel under Triton's interpreter (CPU only)")
def test_the_sweep_runs_end_to_end_on_cpu(tmp_path):
    """``benchmarks/mla_decode_sweep.py --cpu-check``: the whole flow (library choice, stages A-C, the reference
    check, the table and the JSON) at toy widths under Triton's interpreter; the table it writes is read back."""
    import importlib.util
    import json
    import pathlib

    from attnzoo.ops.mla import triton_decode as td

    path = pathlib.Path(__file__).parent.parent / "benchmarks" / "mla_decode_sweep.py"
    spec = importlib.util.spec_from_file_location("mla_decode_sweep_e2e", path)
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    table = tmp_path / "decode_configs.json"
    assert sweep.main(["--cpu-check", "--out", str(tmp_path), "--write-table", "--table", str(table),
                       "--top", "2"]) == 0
    report = json.loads((tmp_path / "mla_decode_sweep.json").read_text())
    assert len(report["winners"]) == 1 and not report["truncated"]
    assert all("ms" in r for r in report["results"])  # every candidate passed the reference check
    assert {r["stage"] for r in report["results"]} >= {"A", "B"}
    (entry,) = td.load_table(table)
    assert (entry["group"], entry["kv_rank"], entry["rope_dim"], entry["batch"], entry["k_len"]) == (16, 32, 16, 2,
                                                                                                      128)
    assert td.DecodeConfig(**entry["config"]).kernel_fields_set()
