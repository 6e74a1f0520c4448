"""``attnzoo.patch``: find the attention of Hugging Face models, swap or convert it in place,
and reload what was saved.

* :mod:`.adapters`: the table of supported architectures (one row per family).
* :mod:`.sites`: the attention modules of a model and their projections.
* :mod:`.walker`: the one generic walker (:func:`patch`).
* :mod:`.converters`: the converter protocol and the dense family (``mha``/``gqa``/``mqa``);
  :mod:`.pattern_converters`: the sparse patterns (``sliding_window``/``longformer``/``bigbird``).
* :mod:`.wrapper`, :mod:`.kernel`, :mod:`.pattern_call`: attnzoo's attention behind HF's call signature.
* :mod:`.position_table`: learned position tables, extended by copying (the Longformer recipe).
* :mod:`.reload`: :func:`from_pretrained` (the ``config.json`` record itself: :mod:`attnzoo.record`).
"""
from .adapters import ADAPTERS, Adapter, Tower, adapter_for, supported_model_types
from .config import PatchConfig
from .converters import CONVERTERS, GQA, MHA, MQA, Converter, register_converter
from .pattern_converters import BigBirdPatch as BigBird
from .pattern_converters import LongformerPatch as Longformer
from .pattern_converters import PatternConverter
from .pattern_converters import SlidingWindowPatch as SlidingWindow
from .reload import from_pretrained
from .report import PatchReport
from .walker import attention_sites, patch
from .wrapper import HFDenseAttention, HFSparseAttention

__all__ = ["PatchConfig", "GQA", "MQA", "MHA", "SlidingWindow", "Longformer", "BigBird", "patch", "PatchReport", "from_pretrained", "ADAPTERS", "Adapter", "Tower", "adapter_for",
           "supported_model_types", "CONVERTERS", "Converter", "PatternConverter", "register_converter",
           "attention_sites", "HFDenseAttention", "HFSparseAttention"]
