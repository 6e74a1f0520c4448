"""Tiny random Hugging Face models of every architecture the adapter table serves (no downloads).

``TINY[name]`` builds ``(model, inputs)``: a 2-layer model (hidden 32-64) in eval mode and
float32, and a dict of forward inputs (with padding where the model takes an attention
mask). ``kind`` says how to read the main output and whether ``generate()`` applies.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import transformers as tf

VOCAB = 97


def _ids(batch=2, n=9, pad=True):
    ids = torch.randint(3, VOCAB, (batch, n))
    mask = torch.ones(batch, n, dtype=torch.long)
    if pad:
        mask[1, :3] = 0  # left padding on the second sequence
    return ids, mask


def _decoder_inputs():
    ids, mask = _ids()
    return {"input_ids": ids, "attention_mask": mask}


def _encoder_inputs():
    ids, mask = _ids()
    mask = mask.flip(1)  # right padding for encoders
    return {"input_ids": ids, "attention_mask": mask}


_IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
_LLAMA_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=64, **_IDS)


@dataclass(frozen=True)
class Tiny:
    name: str
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[], dict]
    decoder: bool
    heads: int
    kv_heads: int

    def make(self):
        model = self.build().eval()
        return model, self.inputs()


def _lm(config_cls, model_cls, **kw):
    return lambda: getattr(tf, model_cls)(getattr(tf, config_cls)(**kw))


def _vit():
    cfg = tf.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=64, num_labels=3)
    return tf.ViTForImageClassification(cfg)


def _clip():
    text = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=16, projection_dim=16, eos_token_id=2, bos_token_id=1, pad_token_id=0)
    vision = dict(image_size=16, patch_size=4, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, projection_dim=16)
    return tf.CLIPModel(tf.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))


def _clip_inputs():
    ids, mask = _ids(n=8)
    ids[:, -1] = 2
    mask = mask.flip(1)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.randn(2, 3, 16, 16)}


TINY: dict[str, Tiny] = {t.name: t for t in [
    Tiny("llama", _lm("LlamaConfig", "LlamaForCausalLM", **_LLAMA_COMMON, attention_bias=True,
                      tie_word_embeddings=True), _decoder_inputs, True, 8, 4),
    Tiny("mistral", _lm("MistralConfig", "MistralForCausalLM", **_LLAMA_COMMON, sliding_window=6),
         _decoder_inputs, True, 8, 4),
    Tiny("qwen2", _lm("Qwen2Config", "Qwen2ForCausalLM", **_LLAMA_COMMON), _decoder_inputs, True, 8, 4),
    Tiny("qwen3", _lm("Qwen3Config", "Qwen3ForCausalLM", **{**_LLAMA_COMMON, "head_dim": 16}), _decoder_inputs,
         True, 8, 4),
    Tiny("gemma", _lm("GemmaConfig", "GemmaForCausalLM", **{**_LLAMA_COMMON, "head_dim": 8}), _decoder_inputs,
         True, 8, 4),
    Tiny("gemma2", _lm("Gemma2Config", "Gemma2ForCausalLM", **{**_LLAMA_COMMON, "head_dim": 8,
                                                                 "query_pre_attn_scalar": 8, "sliding_window": 6}),
         _decoder_inputs, True, 8, 4),
    Tiny("olmo", _lm("OlmoConfig", "OlmoForCausalLM", **{**_LLAMA_COMMON, "num_key_value_heads": 8}),
         _decoder_inputs, True, 8, 8),
    Tiny("phi3", _lm("Phi3Config", "Phi3ForCausalLM", **_LLAMA_COMMON), _decoder_inputs,
         True, 8, 4),
    Tiny("gpt_neox", _lm("GPTNeoXConfig", "GPTNeoXForCausalLM", vocab_size=VOCAB, hidden_size=64,
                         intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, rotary_pct=0.25,
                         max_position_embeddings=64, **_IDS), _decoder_inputs, True, 4, 4),
    Tiny("gpt2", _lm("GPT2Config", "GPT2LMHeadModel", vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                     n_positions=64, **_IDS), _decoder_inputs, True, 4, 4),
    Tiny("bert", _lm("BertConfig", "BertForSequenceClassification", vocab_size=VOCAB, hidden_size=32,
                     num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_position_embeddings=32,
                     num_labels=3), _encoder_inputs, False, 4, 4),
    Tiny("roberta", _lm("RobertaConfig", "RobertaForMaskedLM", vocab_size=VOCAB, hidden_size=32,
                        num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                        max_position_embeddings=40, pad_token_id=1), _encoder_inputs, False, 4, 4),
    Tiny("vit", _vit, lambda: {"pixel_values": torch.randn(2, 3, 16, 16)}, False, 4, 4),
    Tiny("clip", _clip, _clip_inputs, False, 4, 4),
]}


def main_output(out) -> torch.Tensor:
    """The tensor to compare: logits, or CLIP's image-text logits and embeddings."""
    if getattr(out, "logits_per_image", None) is not None:
        return torch.cat([out.logits_per_image.flatten(), out.text_embeds.flatten(), out.image_embeds.flatten()])
    return out.logits


def run(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return main_output(model(**inputs))
