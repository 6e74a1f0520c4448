"""Host syncs and time of ``generate()`` with a sliding-window patch, with and without the mask memo.

A 16-layer llama (hidden 256, bf16, random weights) patched with ``sliding_window`` (window 128) generates 64
tokens after a 256-token prompt (batch 2, one left-padded); ``torch.cuda.set_sync_debug_mode("warn")`` counts the
host syncs of one run; the timings are medians of five. "no memo" swaps :func:`attnzoo.patches.hf.mask_memo.memoized`
for a plain call, as before the memo. GPU only: ``python benchmarks/hf_mask_syncs.py``.
"""
import os, sys, time, warnings
sys.path.insert(0, os.getcwd())
import torch, transformers as tf
import attnzoo
from attnzoo.patches.hf import mask_memo, pattern_call, wrapper
torch.manual_seed(0)
cfg = tf.LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=16, num_attention_heads=8,
                     num_key_value_heads=4, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0)
model = tf.LlamaForCausalLM(cfg).cuda().to(torch.bfloat16).eval()
attnzoo.patch(model, "sliding_window", window=128)
ids = torch.randint(3, 1000, (2, 256), device="cuda")
mask = torch.ones_like(ids); mask[1, :17] = 0
def gen():
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=64, min_new_tokens=64, do_sample=False)
def timed(label):
    out = gen(); torch.cuda.synchronize()
    ts = []
    for _ in range(5):
        t0 = time.perf_counter(); out2 = gen(); torch.cuda.synchronize(); ts.append(time.perf_counter() - t0)
    torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        gen(); torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode(0)
    ts.sort()
    print(f"{label:10s} generate 256+64 tokens x2: median {ts[2]*1000:.1f} ms ({ts[2]/64*1000:.2f} ms/token), syncs {len(w)}", flush=True)
    return out2
a = timed("memo")
real = mask_memo.memoized
off = lambda tensors, key, compute: compute()
wrapper.memoized = off; pattern_call.memoized = off
b = timed("no memo")
wrapper.memoized = real; pattern_call.memoized = real
c = timed("memo")
print("same tokens", torch.equal(a, b), torch.equal(a, c))
