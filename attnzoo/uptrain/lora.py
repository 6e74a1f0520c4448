"""Optional LoRA (peft) on the original weights while the modules a conversion created train fully."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

__all__ = ["TrainableSummary", "apply_lora", "summarize_trainable", "merge_lora"]


@dataclass
class TrainableSummary:
    full: list[str]  # modules trained fully (short names)
    lora: list[str]  # modules with LoRA adapters (short names)
    full_params: int
    lora_params: int
    frozen_params: int

    def describe(self) -> str:
        if not self.lora:
            return f"all weights train fully ({self.full_params:,} parameters)"
        full = ", ".join(self.full) if self.full else "none"
        return (f"LoRA on {', '.join(self.lora)} ({self.lora_params:,} adapter parameters); "
                f"trained fully: {full} ({self.full_params:,}); frozen: {self.frozen_params:,}")


def _short(names) -> list[str]:
    return sorted({n.rsplit(".", 1)[-1] for n in names})


def _module_names(model: nn.Module, patterns) -> list[str]:
    """Full names of the modules matching any pattern (a short name like ``k_proj`` or a full name)."""
    out = []
    for name, _ in model.named_modules():
        if any(name == p or name.endswith("." + p) for p in patterns):
            out.append(name)
    return out


def apply_lora(model: nn.Module, rank: int, alpha: float | None, targets, train_fully) -> nn.Module:
    """Wrap ``model`` in peft LoRA: adapters on ``targets`` except the modules named in ``train_fully``,
    which are trained fully (peft ``modules_to_save``). Raises when a name matches nothing."""
    from peft import LoraConfig, get_peft_model

    from .options import DEFAULT_LORA_TARGETS

    if tuple(targets) == DEFAULT_LORA_TARGETS:  # the defaults name several families' modules: keep those present
        targets = [p for p in targets if _module_names(model, [p])]
    for option, names in (("--lora-targets", targets), ("--train-fully", train_fully)):
        for p in names:
            if not _module_names(model, [p]):
                leaves = _short(n for n, m in model.named_modules() if isinstance(m, nn.Linear))
                raise ValueError(f"{option}: {p!r} matches no module of the model; its linear layers are "
                                 f"named {', '.join(leaves)}")
    full = set(_module_names(model, train_fully))
    lora_targets = [n for n in _module_names(model, targets) if n not in full]
    if not lora_targets:
        raise ValueError(f"--lora-targets={','.join(targets)}: every matching module is also in --train-fully; "
                         "nothing is left for LoRA")
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else 2 * rank, lora_dropout=0.0,
                        target_modules=lora_targets, modules_to_save=sorted(full) or None, bias="none")
    return get_peft_model(model, config)


def summarize_trainable(model: nn.Module) -> TrainableSummary:
    full_mods, lora_mods, full_p, lora_p, frozen_p = set(), set(), 0, 0, 0
    for name, p in model.named_parameters():
        if not p.requires_grad:
            frozen_p += p.numel()
        elif ".lora_" in name:
            lora_p += p.numel()
            lora_mods.add(name.split(".lora_")[0])
        else:
            full_p += p.numel()
            full_mods.add(name.rsplit(".", 1)[0].replace(".modules_to_save.default", ""))
    return TrainableSummary(_short(full_mods) if lora_mods else [], _short(lora_mods), full_p, lora_p, frozen_p)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold adapters into the base weights; return the plain model (a no-op without LoRA)."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model
