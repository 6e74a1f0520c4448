"""Converters that act on the whole model instead of its attention modules (ARR-COC and its baseline).

``patch(model, name, ...)`` hands the model to the converter's ``patch_own`` hook before it looks for attention
sites (:meth:`ModelLevelConverter.patch_own`, the one way a converter takes over a whole model). These plug-ins change
no weights, so ``attnzoo convert`` has nothing to write: :meth:`stream` says so.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

from ...errors import check_type
from ..converters import Converter
from ..report import PatchReport

__all__ = ["ModelLevelConverter"]


class ModelLevelConverter(Converter, ABC):
    """A run-time plug-in on the whole model (see the module docstring); subclasses set ``name``,
    ``config_cls`` and implement :meth:`install`."""

    native_field = "(nothing: a run-time plug-in)"

    @property
    def convert_refusal(self) -> str:  # `attnzoo convert` neither lists it nor shows its flags, and says this
        return (f"{self.name} is a run-time plug-in for vision-language models: it changes no weights, so there is "
                f"nothing to convert; load the model and call attnzoo.patch(model, {self.name!r}, ...)")

    @abstractmethod
    def install(self, model, config):
        """Install the plug-in on ``model``; returns it (with ``.remove()``)."""

    def patch_own(self, model, options, *, layers=None, filter_fn=None) -> PatchReport:
        from ..config import PatchConfig

        config = options if isinstance(options, PatchConfig) else self.config_cls.from_options(**options)
        if layers is not None or filter_fn is not None:
            raise ValueError(f"patch(model, {self.name!r}): layers= and filter_fn= select attention modules; "
                             f"{self.name} acts on the whole model's visual tokens, so it takes neither")
        check_type("config", config, self.config_cls, f"a {self.config_cls.__name__}")
        params = sum(p.numel() for p in model.parameters())
        plugin = self.install(model, config)
        from ...kv import kv_bytes_per_token

        per_token = kv_bytes_per_token(model)
        full = plugin.tower.full_tokens
        return PatchReport(variant=self.name, architecture=type(model).__name__, options=config.to_dict(),
                           modules=[], params_before=params, params_after=params,
                           kv_bytes_per_token_before=per_token, kv_bytes_per_token_after=per_token, native=True,
                           notes=[self.note(config, full), "a run-time plug-in: the weights and config.json are "
                                  "unchanged (call patch again after loading)"])

    def note(self, config, full_tokens: int) -> str:
        return ""

    def stream(self, source, config, adapter, opts, dtype):
        raise ValueError(self.convert_refusal)
