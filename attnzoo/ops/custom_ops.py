"""One way to register a fused kernel as a ``torch.library`` custom op (``attnzoo::<name>``): what
``torch.compile`` traces as one opaque node, with a fake implementation for its shapes and, where the op takes
gradients, the autograd formula, so CUDA graphs capture the launch and no host code around it breaks the graph.
Used by the sparse, LSH and MLA-decode kernels."""
from __future__ import annotations

from typing import Callable

import torch

__all__ = ["kernel_op"]


def kernel_op(name: str, impl: Callable, fake: Callable, *, backward: Callable | None = None,
              setup_context: Callable | None = None):
    """Register ``impl`` as ``attnzoo::<name>`` with ``fake`` (and ``backward``/``setup_context`` through
    ``torch.library.register_autograd``); the op, or None where this torch has no ``torch.library.custom_op``."""
    if not hasattr(torch.library, "custom_op"):
        return None
    op = torch.library.custom_op(f"attnzoo::{name}", impl, mutates_args=())
    op.register_fake(fake)
    if backward is not None:
        torch.library.register_autograd(f"attnzoo::{name}", backward, setup_context=setup_context)
    return op
