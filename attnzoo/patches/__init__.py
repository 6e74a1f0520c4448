"""``attnzoo.patch``: find the attention of Hugging Face models, swap or convert it in place,
and reload what was saved.

* :mod:`.adapters`: the table of supported architectures (one row per family).
* :mod:`.sites`: the attention modules of a model and their projections.
* :mod:`.walker`: the one generic walker (:func:`patch`).
* :mod:`.config`: typed patch configs (``attnzoo.GQA(groups=8)``); :mod:`.converters`: the converter protocol.
* one folder per method: :mod:`.kv_heads` (``mha``/``gqa``/``mqa``), :mod:`.sliding_window`, :mod:`.longformer`,
  :mod:`.bigbird` (the last three on :mod:`.patterns`' base); each holds its typed config and its converter,
  which the variant's registry entry names.
* :mod:`.checkpoint`: the one ``attnzoo convert`` pipeline (streamed or in memory).
* :mod:`.hf`: attnzoo's attention behind HF's call signature (wrappers, the attention-interface kernel).
* :mod:`.position_table`: learned position tables, extended by copying (the Longformer recipe).
* :mod:`.reload`: :func:`from_pretrained` (the ``config.json`` record itself: :mod:`attnzoo.record`).
"""
from .adapters import ADAPTERS, Adapter, Tower, adapter_for, supported_model_types
from .bigbird import BigBird
from .config import PatchConfig
from .converters import Converter, converters, get_converter
from .hf import HFDenseAttention, HFSparseAttention
from .kv_heads import GQA, MHA, MQA
from .longformer import Longformer
from .patterns import PatternConverter
from .reload import from_pretrained
from .report import PatchReport
from .sliding_window import SlidingWindow
from .walker import attention_sites, patch

__all__ = ["PatchConfig", "GQA", "MQA", "MHA", "SlidingWindow", "Longformer", "BigBird", "patch", "PatchReport", "from_pretrained", "ADAPTERS", "Adapter", "Tower", "adapter_for",
           "supported_model_types", "converters", "get_converter", "Converter", "PatternConverter",
           "attention_sites", "HFDenseAttention", "HFSparseAttention"]
