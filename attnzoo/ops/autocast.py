"""``torch.autocast`` for attnzoo's ops: the inputs are cast to the autocast dtype, as torch's SDPA does.

Under ``torch.autocast(device_type, dtype)`` a Hugging Face decoder hands attention a mix of dtypes: the
projections come out in the autocast dtype, but RoPE multiplies by float32 ``cos``/``sin`` and promotes ``q`` and
``k`` back to float32 while ``v`` stays bf16. ``F.scaled_dot_product_attention`` is on autocast's lower-precision
list, so it casts all three to the autocast dtype; attnzoo's ops do the same (decision: the same rule as SDPA,
rather than an error, so a patched model trains under ``accelerate``'s mixed precision like an unpatched one).
Outside autocast nothing is cast, and inputs of different dtypes are an error that names them.
"""
from __future__ import annotations

import torch

__all__ = ["autocast_inputs", "check_same_dtype"]


def autocast_inputs(*tensors):
    """``tensors`` cast to the autocast dtype of their device when autocast is on there (floating-point ones
    only; None and integer/bool tensors pass through), else unchanged."""
    first = next((t for t in tensors if isinstance(t, torch.Tensor)), None)
    if first is None or not torch.is_autocast_enabled(first.device.type):
        return tensors
    dtype = torch.get_autocast_dtype(first.device.type)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != dtype
                 and t.dtype != torch.float64 else t for t in tensors)


def check_same_dtype(names: str, *tensors) -> None:
    """Raise ``TypeError`` naming ``names`` and their dtypes when ``tensors`` (after :func:`autocast_inputs`) are
    not of one dtype."""
    if len({t.dtype for t in tensors}) > 1:
        raise TypeError(f"{names} dtypes differ ({', '.join(str(t.dtype) for t in tensors)}): cast them to one dtype")
