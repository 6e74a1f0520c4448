"""``attnzoo.patch``: find the attention of Hugging Face models, swap or convert it in place,
and reload what was saved.

* :mod:`.adapters`: the table of supported architectures (one row per family).
* :mod:`.sites`: the attention modules of a model and their projections.
* :mod:`.walker`: the one generic walker (:func:`patch`).
* :mod:`.converters`: one converter per variant (``mha``/``gqa``/``mqa`` today).
* :mod:`.wrapper`, :mod:`.kernel`: attnzoo's attention behind HF's call signature.
* :mod:`.record`, :mod:`.reload`: the ``config.json`` record and :func:`from_pretrained`.
"""
from .adapters import ADAPTERS, Adapter, Tower, adapter_for, supported_model_types
from .converters import CONVERTERS, Converter, register_converter
from .record import install_kv_resolver
from .reload import from_pretrained
from .report import PatchReport
from .walker import attention_sites, patch
from .wrapper import HFDenseAttention

install_kv_resolver()

__all__ = ["patch", "PatchReport", "from_pretrained", "ADAPTERS", "Adapter", "Tower", "adapter_for",
           "supported_model_types", "CONVERTERS", "Converter", "register_converter", "attention_sites",
           "HFDenseAttention"]
