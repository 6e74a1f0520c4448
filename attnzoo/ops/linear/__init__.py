"""The linear-attention op: ``linear_attention(qf, kf, v, ...)`` on feature rows, causal or not, optionally
hybrid with an exact-softmax window, with a recurrent state for decoding.

* :mod:`.naive`: the float64 reference (the definition);
* :mod:`.chunked`: the stabilised chunkwise form in PyTorch (CPU, and autograd);
* :mod:`.triton_kernel`: the fused causal kernels (CUDA), the window hybrid included;
* :mod:`.favor`: non-causal FAVOR+ with the feature map fused into the two GEMMs (CUDA);
* :mod:`.op`: :func:`linear_attention`, which picks between them.
"""
from .chunked import LinearState
from .naive import linear_attention_naive
from .op import BACKENDS, linear_attention

__all__ = ["linear_attention", "linear_attention_naive", "LinearState", "BACKENDS"]
