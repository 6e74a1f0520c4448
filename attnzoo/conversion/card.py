"""KV-cache tables and the model card (README.md) written next to a converted checkpoint."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..kv import KVLayout, describe_layouts, element_size
from ..table import markdown_table

__all__ = ["format_bytes", "kv_change", "kv_table", "CONTEXTS", "model_card", "split_front_matter"]

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


def kv_table(models: Sequence[tuple[str, Sequence[KVLayout]]], dtype, contexts: Sequence[int] = CONTEXTS,
             batch: int = 1) -> list[dict[str, Any]]:
    """Rows ``{layout, per token, @8k, @32k, @128k}`` for ``(label, one KVLayout per layer)`` pairs: what the
    caches hold after that many tokens (windows and states counted as :class:`~attnzoo.kv.KVLayout` says)."""
    elem = element_size(dtype)
    rows = []
    for label, layouts in models:
        row = {"layout": label, "per token": format_bytes(sum(lay.per_token for lay in layouts) * elem)}
        for c in contexts:
            row[f"@{c // 1024}k" if c % 1024 == 0 else f"@{c}"] = format_bytes(
                sum(lay.elements(c) for lay in layouts) * elem * batch)
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


def _layouts_label(layouts) -> str:
    return f"{len(layouts)} layers, {describe_layouts(layouts)}"


def model_card(result, *, version: str, source_card: str | None = None) -> str:
    """The README.md of a converted checkpoint (``result``: a :class:`~attnzoo.conversion.result.ConversionResult`):
    what was done, what it costs in quality, the KV cache before and after, how to load it."""
    r = result
    front, body = _front(source_card, r.variant)
    kv = markdown_table(kv_table([(f"before ({_layouts_label(r.layouts_before)})", r.layouts_before),
                                  (f"after ({_layouts_label(r.layouts_after)})", r.layouts_after)], r.dtype))
    lines = [
        front + f"# {r.dst.name}",
        "",
        f"Converted with attnzoo {version} from `{r.src}` ({r.model_type}): **{r.summary}**, weights in {r.dtype}.",
        "",
        "The conversion is exact: the converted model computes what the source did." if r.exact else
        f"The conversion is done without training: {r.lossy_note}",
        "",
    ] + ([f"- {n}" for n in r.notes] + [""] if r.notes else []) + [
        f"## KV cache (batch 1, {r.dtype})",
        "",
        kv,
        "",
        f"Per token: {r.kv_change()}.",
        "",
    ] + _loading(r.dst.name, r.native, r.native_field, r.model_class)
    return _with_body(lines, body)
