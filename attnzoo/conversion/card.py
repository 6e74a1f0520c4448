"""KV-cache tables and the model card (README.md) written next to a converted checkpoint."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..table import markdown_table

__all__ = ["format_bytes", "kv_change", "kv_table", "CONTEXTS", "model_card", "pattern_model_card", "split_front_matter"]

CONTEXTS = (8192, 32768, 131072)


def format_bytes(n: float) -> str:
    """``2621440`` -> ``"2.5 MiB"`` (binary units)."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" or n == int(n) else f"{n:.3g} {unit}"
        n /= 1024
    return f"{n:.3g} TiB"


def kv_change(before: float, after: float) -> str:
    """How a KV cache changed: ``"50.0% saved"``, ``"no change"`` or, when it grew (a conversion back
    to MHA), ``"4.0x larger, +300.0%"``: never a negative saving."""
    if not before or after == before:
        return "no change"
    if after < before:
        return f"{100 * (1 - after / before):.1f}% saved"
    return f"{after / before:.1f}x larger, +{100 * (after / before - 1):.1f}%"


def kv_table(layouts: Sequence[tuple[str, int]], contexts: Sequence[int] = CONTEXTS,
             batch: int = 1) -> list[dict[str, Any]]:
    """Rows ``{layout, per token, @8k, @32k, @128k}`` for ``(label, bytes_per_token)`` pairs."""
    rows = []
    for label, per in layouts:
        row = {"layout": label, "per token": format_bytes(per)}
        for c in contexts:
            row[f"@{c // 1024}k" if c % 1024 == 0 else f"@{c}"] = format_bytes(per * c * batch)
        rows.append(row)
    return rows


def split_front_matter(text: str) -> tuple[str, str]:
    """``(yaml, body)`` of a Hugging Face model card (``yaml`` without the ``---`` fences, or "")."""
    if text.startswith("---\n"):
        end = text.find("\n---", 4)
        if end != -1:
            return text[4:end].strip("\n"), text[end + 4:].lstrip("\n")
    return "", text


def _front(source_card: str | None, variant: str) -> tuple[str, str]:
    """(front matter with attnzoo's tags, the source card's body)."""
    yaml, body = split_front_matter(source_card or "")
    tags = "tags:\n- attnzoo\n- " + variant
    front = f"---\n{yaml}\n{tags}\n---\n\n" if yaml and "tags:" not in yaml else (
        f"---\n{yaml}\n---\n\n" if yaml else f"---\n{tags}\n---\n\n")
    return front, body


def _loading(name: str, native: bool, native_what: str, cls: str = "AutoModelForCausalLM") -> list[str]:
    load = (f"from transformers import {cls}\nmodel = {cls}.from_pretrained({name!r})"
            if native else f"import attnzoo\nmodel = attnzoo.from_pretrained({name!r})")
    return ["## Loading", "", "```python", load, "```", "",
            "This checkpoint is " + (f"a plain `transformers` checkpoint ({native_what} in config.json)."
                                     if native else "recorded in config.json under `attnzoo`; it needs "
                                     "`attnzoo.from_pretrained` to rebuild the attnzoo attention.")]


def _with_body(lines: list[str], body: str) -> str:
    if body.strip():
        lines += ["", "## Original model card", "", body.rstrip()]
    return "\n".join(lines) + "\n"


def model_card(*, name: str, source: str, model_type: str, variant: str, groups: int, method: str,
               heads: int, kv_before: int, dtype: str, per_token_before: int, per_token_after: int,
               native: bool, version: str, source_card: str | None = None) -> str:
    """The README.md of a converted checkpoint: what was done, the KV-cache savings, how to load it."""
    front, body = _front(source_card, variant)
    kv = markdown_table(kv_table([(f"before ({kv_before} KV heads)", per_token_before),
                                  (f"after ({groups} KV heads)", per_token_after)]))
    lines = [
        front + f"# {name}",
        "",
        (f"Converted with attnzoo {version} from `{source}` ({model_type}): "
         f"**{variant.upper()}**, {heads} query heads sharing **{groups}** KV head{'s' if groups != 1 else ''} "
         f"(was {kv_before}), initialised with `method={method!r}`, weights in {dtype}."),
        "",
        ("The conversion is done without training: expect some quality loss until the model is uptrained "
         "(a few percent of the original pre-training compute in the GQA paper)." if groups < kv_before else
         "The conversion is exact (no KV head was merged)."),
        "",
        f"## KV cache (batch 1, {dtype})",
        "",
        kv,
        "",
        f"KV cache: {kv_change(per_token_before, per_token_after)}.",
        "",
    ] + _loading(name, native, "`num_key_value_heads`")
    return _with_body(lines, body)


def pattern_model_card(*, name: str, source: str, model_type: str, variant: str, options: dict[str, Any],
                       dtype: str, native: bool, version: str, notes: Sequence[str] = (),
                       model_class: str = "AutoModel", source_card: str | None = None) -> str:
    """The README.md of a checkpoint converted to a sparse pattern (sliding window, Longformer, BigBird)."""
    front, body = _front(source_card, variant)
    opts = ", ".join(f"`{k}={v!r}`" for k, v in options.items() if v is not None)
    lines = [
        front + f"# {name}",
        "",
        f"Converted with attnzoo {version} from `{source}` ({model_type}): **{variant}** attention ({opts}), "
        f"weights in {dtype}.",
        "",
        "`window` counts the keys on each side of a query, its own position not counted (causal: keys "
        "`i - window .. i`; Hugging Face's `sliding_window` is `window + 1`).",
        "",
        "The conversion is done without training: a pattern that drops keys the model used changes its outputs "
        "until it is uptrained (the Longformer paper continues pre-training after the conversion).",
        "",
    ] + ([f"- {n}" for n in notes] + [""] if notes else []) + _loading(name, native, "`sliding_window`", model_class)
    return _with_body(lines, body)
