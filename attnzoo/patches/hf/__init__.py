"""The Hugging Face runtime glue: attnzoo's attention behind ``transformers``' call signatures.

* :mod:`.wrapper`: :class:`HFDenseAttention` / :class:`HFSparseAttention`, attnzoo modules in place of an HF
  attention module (masks, caches, RoPE translated);
* :mod:`.mla`: :class:`HFMLAAttention` (MLA in a decoder layer, its latent cache in ``transformers``' cache) and
  :func:`absorb_deepseek_attention` (absorbed decode for native DeepSeek-V3 models);
* :mod:`.kernel`: attnzoo's kernel through ``transformers``' attention interface (native architectures keep
  their modules);
* :mod:`.pattern_call`, :mod:`.mask_memo`: how an HF mask becomes a sparse pattern call, once per forward.
"""
from .kernel import PATTERN_ATTR, hf_sliding_window, use_attnzoo_kernel
from .mla import HFLatentCacheView, HFMLAAttention, absorb_deepseek_attention
from .wrapper import HFCacheView, HFDenseAttention, HFSparseAttention, hf_mask_to_keep

__all__ = ["HFDenseAttention", "HFSparseAttention", "HFCacheView", "hf_mask_to_keep", "use_attnzoo_kernel",
           "hf_sliding_window", "PATTERN_ATTR", "HFMLAAttention", "HFLatentCacheView", "absorb_deepseek_attention"]
