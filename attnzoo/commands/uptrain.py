"""Uptrain a (converted) model to win back quality: plain cross-entropy or distillation from a teacher.

Runs plainly (one process) or under accelerate:

    attnzoo uptrain --model converted/ --out uptrained/ --fraction 0.05
    accelerate launch --num_processes 2 -m attnzoo uptrain --model converted/ --teacher original/ \\
        --out uptrained/ --fraction 0.05 --mixed-precision bf16

The token budget (--tokens or --fraction of the model's pretraining tokens) is recorded in the
output's config.json under attnzoo.uptrain. Checkpoints (every --checkpoint-every steps) go to
OUT.partial/checkpoints; --resume continues the latest exactly. The output directory holds the
model (safetensors), its tokenizer, loss_log.jsonl and loss_curve.png. See docs/uptrain.md.
"""
from __future__ import annotations

NAME = "uptrain"
HELP = "uptrain a model (cross-entropy or distillation; accelerate, LoRA, exact resume)"


def _names(text: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in text.split(",") if n.strip())


def add_arguments(p):
    from ..uptrain.options import DEFAULT_LORA_TARGETS, MIXED_PRECISION, TEACHER_PLACEMENTS, UptrainOptions as O

    g = p.add_argument_group("what")
    g.add_argument("--model", required=True, help="model directory to train, or 'builtin'")
    g.add_argument("--out", required=True, help="output directory (written through a temporary directory)")
    g.add_argument("--data", default=O.data, help="'builtin[:SEED]', a token file from `attnzoo data prepare` "
                   "(memory-mapped; what GPU runs should use), a .safetensors/.ids file of token ids, or text "
                   "(default: %(default)s)")
    g.add_argument("--force", action="store_true", help="replace an existing --out")
    b = p.add_argument_group("token budget (one of)")
    b.add_argument("--tokens", type=int, help="training tokens (all processes together)")
    b.add_argument("--fraction", type=float, help="fraction of the model's pretraining tokens, e.g. 0.05")
    d = p.add_argument_group("distillation")
    d.add_argument("--teacher", help="teacher model directory (same tokenizer), e.g. the model before conversion")
    d.add_argument("--alpha", type=float, default=O.alpha, help="weight of the KL term; 1-alpha weighs "
                   "cross-entropy (default: %(default)s)")
    d.add_argument("--temperature", type=float, default=O.temperature, help="softmax temperature (default: %(default)s)")
    o = p.add_argument_group("optimisation")
    o.add_argument("--lr", type=float, default=O.lr, help="peak learning rate (default: %(default)s)")
    o.add_argument("--min-lr-ratio", type=float, default=O.min_lr_ratio, help="cosine floor as a fraction of --lr "
                   "(default: %(default)s)")
    o.add_argument("--warmup", type=float, default=O.warmup, help="warmup fraction of the steps (default: %(default)s)")
    o.add_argument("--weight-decay", type=float, default=O.weight_decay, help="AdamW weight decay (default: %(default)s)")
    o.add_argument("--batch-size", type=int, default=O.batch_size, help="sequences per process per micro-batch "
                   "(default: %(default)s)")
    o.add_argument("--grad-accum", type=int, default=O.grad_accum, help="micro-batches per optimizer step "
                   "(default: %(default)s)")
    o.add_argument("--seq-len", type=int, default=O.seq_len, help="tokens per sequence (default: %(default)s)")
    o.add_argument("--max-grad-norm", type=float, default=O.max_grad_norm, help="gradient clipping, 0 = off "
                   "(default: %(default)s)")
    o.add_argument("--mixed-precision", choices=MIXED_PRECISION, help="default: accelerate's config (or 'no')")
    o.add_argument("--seed", type=int, default=O.seed, help="seed of init-time RNG (default: %(default)s)")
    o.add_argument("--cpu", action="store_true", help="train on CPU even when a GPU is present")
    o.add_argument("--context-parallel", type=int, default=O.context_parallel, metavar="N",
                   help="shard each sequence across N processes (ring attention; sliding windows by halo "
                   "exchange), for sequences one device cannot hold; N divides the launch's processes "
                   "(default: %(default)s)")
    sp = p.add_argument_group("speed and memory")
    sp.add_argument("--loss-chunk", type=int, default=O.loss_chunk, help="positions per chunk of the output-head "
                    "loss (logits never exist for the whole batch); 0 = full logits (default: %(default)s)")
    sp.add_argument("--compile", action="store_true", help="torch.compile the repeated blocks and the loss chunk")
    sp.add_argument("--activation-checkpointing", action="store_true", help="recompute each block's activations "
                    "in the backward (less memory, ~1/3 more compute)")
    sp.add_argument("--teacher-placement", choices=TEACHER_PLACEMENTS, default=O.teacher_placement,
                    help="'replicate': a full frozen teacher per process; 'shard': FSDP shards it with the student "
                    "(FSDP only) (default: %(default)s)")
    lo = p.add_argument_group("LoRA (peft)")
    lo.add_argument("--lora-rank", type=int, default=0, help="LoRA rank on the original weights; 0 = full "
                    "training (default)")
    lo.add_argument("--lora-alpha", type=float, help="LoRA alpha (default: 2 x rank)")
    lo.add_argument("--lora-targets", type=_names, default=DEFAULT_LORA_TARGETS,
                    help="comma-separated module names for adapters (default: %(default)s)")
    lo.add_argument("--train-fully", type=_names, help="comma-separated modules trained fully under LoRA "
                    "(default: the modules the conversion created, config.json attnzoo.new_modules)")
    c = p.add_argument_group("checkpoints and logs")
    c.add_argument("--checkpoint-every", type=int, default=0, help="checkpoint every K steps into OUT.partial/ "
                   "(0 = never; default)")
    c.add_argument("--resume", nargs="?", const="latest", help="continue from the latest checkpoint (or the one "
                   "given) exactly: weights, optimizer, scheduler, RNG and data position")
    c.add_argument("--stop-after", type=int, help="stop after this many steps (checkpoint first with "
                   "--checkpoint-every); for time-boxed jobs")
    c.add_argument("--keep-checkpoints", action="store_true", help="keep OUT.partial/ after success")
    c.add_argument("--log-every", type=int, default=1, help="log the loss every N steps (default: %(default)s)")
    c.add_argument("--stage", choices=("uptrain", "pretrain", "transfer"), default="uptrain",
                   help="'pretrain' counts the tokens as pretraining in the metadata; 'transfer': attention transfer, "
                        "only the linear layers' feature maps train, against each layer's softmax heads "
                        "(default: %(default)s)")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")


def options_from_args(args):
    from ..uptrain.options import UptrainOptions

    return UptrainOptions(
        model=args.model, out=args.out, data=args.data, tokens=args.tokens, fraction=args.fraction,
        teacher=args.teacher, alpha=args.alpha, temperature=args.temperature, lr=args.lr,
        min_lr_ratio=args.min_lr_ratio, warmup=args.warmup, weight_decay=args.weight_decay,
        batch_size=args.batch_size, grad_accum=args.grad_accum, seq_len=args.seq_len,
        max_grad_norm=args.max_grad_norm, mixed_precision=args.mixed_precision, lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha, lora_targets=args.lora_targets, train_fully=args.train_fully,
        checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep_checkpoints, resume=args.resume,
        stop_after=args.stop_after, seed=args.seed, stage=args.stage, log_every=args.log_every, force=args.force,
        progress=not args.no_progress, cpu=args.cpu, loss_chunk=args.loss_chunk, compile=args.compile,
        activation_checkpointing=args.activation_checkpointing, teacher_placement=args.teacher_placement,
        context_parallel=args.context_parallel)


def run(args) -> int:
    from ..table import format_table
    from ..uptrain import uptrain

    result = uptrain(options_from_args(args))
    from accelerate.state import PartialState

    if PartialState().is_main_process:
        print(format_table(result.rows(), title="uptrain summary"))
    return 0
