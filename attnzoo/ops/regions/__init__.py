"""The region op: attention within the regions of a packed variable-length sequence (ARR-COC's level-of-detail
encoding). :mod:`.naive` holds the float64 reference, :mod:`.op` the fused backends and their choice."""
from .naive import region_attention_reference
from .op import (BACKENDS, GROUPED_MAX_RUNS, RegionLayout, region_attention, region_attention_tokens, region_backend,
                 region_ids)

__all__ = ["region_attention", "region_attention_tokens", "region_attention_reference", "region_backend",
           "region_ids", "BACKENDS", "RegionLayout", "GROUPED_MAX_RUNS"]
