"""Options of an uptraining run (the ``attnzoo uptrain`` flags, one field each), checked up front."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..errors import check_choice

__all__ = ["UptrainOptions", "DEFAULT_LORA_TARGETS", "flag"]

DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                        "kv_a_proj_with_mqa", "kv_b_proj")  # the last two: MLA (DeepSeek's names)
MIXED_PRECISION = ("no", "fp16", "bf16")
STAGES = ("uptrain", "pretrain", "transfer")
TEACHER_PLACEMENTS = ("replicate", "shard")


def flag(name: str) -> str:
    """The CLI spelling of an option: ``grad_accum`` -> ``--grad-accum``."""
    return "--" + name.replace("_", "-")


@dataclass
class UptrainOptions:
    """Everything an uptraining run needs; field ``x_y`` is the CLI flag ``--x-y``.

    Token budget: exactly one of ``tokens`` and ``fraction`` (of the model's pretraining
    tokens, read from ``config.json`` ``attnzoo.pretraining_tokens``). Distillation: with
    ``teacher``, the loss is ``alpha * KL(teacher || student at temperature) * T^2 +
    (1 - alpha) * cross-entropy``. LoRA: ``lora_rank > 0`` adds adapters on ``lora_targets``
    of the original weights; modules in ``train_fully`` (default: those the conversion created,
    ``attnzoo.new_modules``) train fully. ``stage="pretrain"`` counts the tokens as pretraining;
    ``stage="transfer"`` is attention transfer (:mod:`attnzoo.uptrain.transfer`: only the linear layers' feature
    maps train, against each layer's softmax heads).

    Speed: ``loss_chunk`` positions at a time through the output head (0: full logits), ``compile``
    (``torch.compile`` of the repeated blocks and the loss chunk), ``activation_checkpointing`` (recompute
    each block in the backward), ``teacher_placement`` (``replicate``: a full frozen copy per process, bf16
    under bf16 mixed precision; ``shard``: FSDP shards it with the student). On CUDA, AdamW is the fused
    kernel (``foreach`` under FSDP).
    """

    model: str
    out: str
    data: str = "builtin"
    tokens: int | None = None
    fraction: float | None = None
    teacher: str | None = None
    alpha: float = 0.5
    temperature: float = 1.0
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup: float = 0.05
    weight_decay: float = 0.0
    batch_size: int = 8
    grad_accum: int = 1
    seq_len: int = 256
    max_grad_norm: float = 1.0
    mixed_precision: str | None = None
    lora_rank: int = 0
    lora_alpha: float | None = None
    lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS
    train_fully: tuple[str, ...] | None = None
    checkpoint_every: int = 0
    keep_checkpoints: bool = False
    resume: str | None = None
    stop_after: int | None = None
    seed: int = 0
    stage: str = "uptrain"
    log_every: int = 1
    force: bool = False
    progress: bool = True
    cpu: bool = False
    context_parallel: int = 1
    extra_metadata: dict = field(default_factory=dict)
    loss_chunk: int = 512
    compile: bool = False
    activation_checkpointing: bool = False
    teacher_placement: str = "replicate"

    def validate(self) -> None:
        def positive_int(name, minimum=1, allow_none=False):
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
                raise ValueError(f"{flag(name)}={v!r}: expected an integer >= {minimum}")

        def number(name, lo, hi, lo_open=False, hi_open=False):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError(f"{flag(name)}={v!r}: expected a number")
            if (v < lo or (lo_open and v == lo)) or (v > hi or (hi_open and v == hi)):
                lo_s, hi_s = ("(" if lo_open else "[") + f"{lo}", f"{hi}" + (")" if hi_open else "]")
                raise ValueError(f"{flag(name)}={v!r}: expected a number in {lo_s}, {hi_s}")

        if (self.tokens is None) == (self.fraction is None):
            raise ValueError("give the token budget with exactly one of --tokens N or --fraction F "
                             f"(got --tokens={self.tokens!r}, --fraction={self.fraction!r})")
        if self.tokens is not None:
            positive_int("tokens")
        if self.fraction is not None:
            number("fraction", 0.0, float("inf"), lo_open=True)
        number("alpha", 0.0, 1.0)
        number("temperature", 0.0, float("inf"), lo_open=True)
        number("lr", 0.0, float("inf"), lo_open=True)
        number("min_lr_ratio", 0.0, 1.0)
        number("warmup", 0.0, 1.0, hi_open=True)
        number("weight_decay", 0.0, float("inf"))
        number("max_grad_norm", 0.0, float("inf"))
        for name in ("batch_size", "grad_accum", "log_every", "context_parallel"):
            positive_int(name)
        positive_int("seq_len", minimum=2)
        positive_int("lora_rank", minimum=0)
        positive_int("checkpoint_every", minimum=0)
        positive_int("stop_after", allow_none=True)
        positive_int("seed", minimum=0)
        positive_int("loss_chunk", minimum=0)
        check_choice("--teacher-placement", self.teacher_placement, TEACHER_PLACEMENTS)
        if self.lora_alpha is not None:
            number("lora_alpha", 0.0, float("inf"), lo_open=True)
        if self.mixed_precision is not None:
            check_choice("--mixed-precision", self.mixed_precision, MIXED_PRECISION)
        check_choice("--stage", self.stage, STAGES)
        if self.stage == "transfer" and (self.lora_rank or self.teacher):
            raise ValueError("--stage transfer trains the feature maps against each layer's own softmax heads: it "
                             "takes no --lora-rank and no --teacher (run those in the next stage)")
        if self.lora_rank and not self.lora_targets:
            raise ValueError("--lora-targets is empty: name the modules that get LoRA adapters, e.g. q_proj,o_proj")
        if self.context_parallel > 1 and self.teacher is not None:
            raise ValueError(f"--context-parallel={self.context_parallel} with --teacher: distillation is not "
                             "context-parallel yet; train with cross-entropy (no --teacher) or --context-parallel 1")
        if self.teacher is None and self.alpha != UptrainOptions.alpha and self.alpha != 0:
            raise ValueError(f"--alpha={self.alpha}: weighs distillation against cross-entropy, which needs "
                             "--teacher DIR")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
