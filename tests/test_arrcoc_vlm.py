"""ARR-COC on a tiny random LLaVA (CLIP vision config + Llama text config, no downloads): the region op, the
level-of-detail encoding, the input rewrite, patch(vlm, "arrcoc") / patch(vlm, "visual_topk") and generate()."""
import pytest
import torch
import torch.nn.functional as F
import transformers as tf

import attnzoo
from attnzoo.arrcoc import grid_shape
from attnzoo.arrcoc.lod import VisionTower, encode_regions, use_region_kernel
from attnzoo.ops.regions import region_attention, region_attention_reference
from attnzoo.errors import BackendUnavailableError

IMAGE_ID, PAD = 100, 0
LEVELS = (4, 8, 12, 16)  # 32 px images, 4 px patches: 8 x 8 = 64 tokens; 2 x 2 regions of 16 native tokens


def tiny_llava(seed=0, layers=3, tower="clip"):
    """A tiny LLaVA: CLIP tower (class token; features of layer -2 without it, as LLaVA-1.5) or SigLIP tower (no
    class token; last layer, all tokens)."""
    torch.manual_seed(seed)
    shape = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4, image_size=32,
                 patch_size=4)
    if tower == "clip":
        vision, layer, strategy = tf.CLIPVisionConfig(**shape, projection_dim=16), -2, "default"
    else:
        vision, layer, strategy = tf.SiglipVisionConfig(**shape), -1, "full"
    text = tf.LlamaConfig(vocab_size=120, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1,
                          eos_token_id=2, pad_token_id=PAD)
    cfg = tf.LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_ID, image_seq_length=64,
                         vision_feature_layer=layer, vision_feature_select_strategy=strategy)
    return tf.LlavaForConditionalGeneration(cfg).eval()


def prompt(batch=2, images_per_row=1, pad=True, seed=1):
    """Token ids as LLaVA's processor writes them (64 image tokens per image), left padding on row 1."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        parts = [torch.randint(3, 99, (3,), generator=g)]
        for _ in range(images_per_row):
            parts += [torch.full((64,), IMAGE_ID), torch.randint(3, 99, (2,), generator=g)]
        parts.append(torch.randint(3, 99, (5,), generator=g))
        rows.append(torch.cat(parts))
    ids = torch.stack(rows)
    mask = torch.ones_like(ids)
    if pad and batch > 1:
        ids[1, :2], mask[1, :2] = PAD, 0
    pixels = torch.randn(batch * images_per_row, 3, 32, 32, generator=g)
    return ids, mask, pixels


# ---------------------------------------------------------------------------- the region op
def region_case(lengths, heads, seed):
    """float64 q, k, v ``[1, heads, sum(lengths), 8]`` (``heads = (q heads, kv heads)``) that require grad."""
    torch.manual_seed(seed)
    t = sum(lengths)
    return tuple(torch.randn(1, h, t, 8, dtype=torch.float64, requires_grad=True) for h in (heads[0], heads[1], heads[1]))


def assert_fwd_bwd_close(got, want, inputs, grad_tol: dict | None = None, **tol):
    """``got`` equals ``want`` (``tol``) and so do their gradients w.r.t. ``inputs`` (``grad_tol``, default ``tol``)."""
    torch.testing.assert_close(got, want, **tol)
    g = torch.randn_like(got)
    for a, b in zip(torch.autograd.grad(got, inputs, g), torch.autograd.grad(want, inputs, g)):
        torch.testing.assert_close(a, b, **(tol if grad_tol is None else grad_tol))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lengths, heads", [([5], (2, 2)), ([3, 7, 1, 4], (4, 2)), ([1, 1, 9], (4, 1))])
def test_region_attention_matches_reference(lengths, heads, causal):
    q, k, v = region_case(lengths, heads, seed=sum(lengths))
    got = region_attention(q, k, v, lengths, causal=causal, scale=0.3)
    want = region_attention_reference(q, k, v, lengths, causal=causal, scale=0.3)
    assert_fwd_bwd_close(got, want, (q, k, v), dict(rtol=1e-9, atol=1e-9), rtol=1e-10, atol=1e-10)
    with torch.no_grad():
        flex = region_attention(q.float(), k.float(), v.float(), lengths, causal=causal, scale=0.3, backend="flex")
    torch.testing.assert_close(flex.double(), want, rtol=1e-5, atol=1e-5)


def test_region_attention_errors():
    q = torch.randn(1, 2, 6, 8)
    with pytest.raises(ValueError, match="summing to the packed length 6"):
        region_attention(q, q, q, [2, 3])
    with pytest.raises(BackendUnavailableError, match="varlen_attn runs on CUDA"):
        region_attention(q, q, q, [6], backend="varlen")
    with pytest.raises(ValueError, match="backend='nope'"):
        region_attention(q, q, q, [6], backend="nope")


def test_region_attention_module_packs_regions():
    torch.manual_seed(0)
    m = attnzoo.create("arrcoc", dim=16, heads=4, budget=256, rope=True).double()
    x = torch.randn(1, 10, 16, dtype=torch.float64)
    got = m(x, regions=[4, 6])
    # each region alone through the dense module (RoPE restarts in each region)
    want = torch.cat([m(x[:, :4]), m(x[:, 4:])], 1)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(m(x, regions=[10]), m(x))
    with pytest.raises(ValueError, match="packed"):
        m(torch.randn(2, 5, 16, dtype=torch.float64), regions=[5])


# ---------------------------------------------------------------------------- level-of-detail encoding
def _hf_region(model, crop, rows, cols):
    """The oracle: transformers' own vision tower on the region as a picture of rows x cols patches."""
    tower = model.model.vision_tower
    crop = F.interpolate(crop[None], size=(rows * 4, cols * 4), mode="bilinear", align_corners=False, antialias=True)
    out = tower(crop, interpolate_pos_encoding=True, output_hidden_states=True)
    feats = out.hidden_states[model.config.vision_feature_layer]
    if model.config.vision_feature_select_strategy == "default":
        feats = feats[:, 1:]
    return model.model.multi_modal_projector(feats)[0]


@pytest.mark.parametrize("levels", [[[16, 12, 8, 4], [4, 4, 16, 16]], [[8, 8, 8, 8], [8, 8, 8, 8]]],
                         ids=["mixed", "all-alike"])
@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_encode_regions_matches_each_region_through_transformers(kind, levels):
    model = tiny_llava(tower=kind)
    tower = VisionTower(model)
    _, _, pixels = prompt()
    levels = torch.tensor(levels)
    with torch.no_grad():
        want = [[_hf_region(model, pixels[n, :, (r // 2) * 16:(r // 2 + 1) * 16, (r % 2) * 16:(r % 2 + 1) * 16],
                            *grid_shape(int(levels[n, r]))) for r in range(4)] for n in range(2)]
        use_region_kernel(model.model.vision_tower)
        got = encode_regions(tower, pixels, levels, 2)
    for n in range(2):
        assert got[n].shape == (int(levels[n].sum()), 64)
        torch.testing.assert_close(got[n], torch.cat(want[n]), rtol=1e-4, atol=1e-5)


def test_encode_regions_all_native_is_the_unpatched_encoding():
    model = tiny_llava()
    tower = VisionTower(model)
    _, _, pixels = prompt()
    with torch.no_grad():
        ref = tower.whole(pixels)
        use_region_kernel(model.model.vision_tower)
        got = encode_regions(tower, pixels, torch.full((2, 4), 16), 2)
        separate = encode_regions(tower, pixels, torch.full((2, 4), 16), 2, allow_whole=False)
    torch.testing.assert_close(torch.stack(got), ref)
    assert separate[0].shape == ref[0].shape and not torch.allclose(separate[0], ref[0])


# ---------------------------------------------------------------------------- the plug-ins
@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_full_budget_reproduces_the_unpatched_logits(kind):
    model = tiny_llava(tower=kind)
    ids, mask, pixels = prompt()
    with torch.no_grad():
        ref = model(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits
        report = attnzoo.patch(model, "arrcoc", budget=64, levels=LEVELS)
        got = model(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert report.variant == "arrcoc" and report.params_after == report.params_before
    assert "64 -> 64" in str(report)


@pytest.mark.parametrize("budget", [16, 40, 56])
def test_generate_sees_exactly_the_allocated_visual_tokens(budget):
    model = tiny_llava()
    ids, mask, pixels = prompt()
    attnzoo.patch(model, "arrcoc", budget=budget, levels=LEVELS)
    plugin = model.attnzoo_visual_tokens
    out = model.generate(input_ids=ids, pixel_values=pixels, attention_mask=mask, max_new_tokens=4, do_sample=False)
    levels = plugin.last["levels"]
    assert levels.sum(1).tolist() == [budget, budget]
    prompt_len = out.shape[1] - 4
    assert (out[:, :prompt_len] == IMAGE_ID).sum(1).tolist() == [budget, budget]
    assert prompt_len == ids.shape[1] - 64 + budget
    # the generated tokens are those of a plain forward over the rewritten prompt (the cache and masks line up)
    with torch.no_grad():
        step = model(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits[:, -1].argmax(-1)
    assert out[:, prompt_len].tolist() == step.tolist()


def test_square_levels_pad_rows_of_different_totals_and_rewrite_labels():
    model = tiny_llava()
    ids, mask, pixels = prompt(batch=2, images_per_row=2, pad=False)
    attnzoo.patch(model, "arrcoc", budget=44, levels=(4, 9, 16))  # totals of 4 levels from {4, 9, 16}: not all 44
    labels = ids.clone()
    out = model(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids), labels=labels)
    levels = model.attnzoo_visual_tokens.last["levels"]
    assert levels.shape == (4, 4) and bool((levels.sum(1) <= 44).all())
    assert out.loss is not None and torch.isfinite(out.loss)
    n_img = levels.sum(1).view(2, 2).sum(1)
    assert out.logits.shape[1] == int(ids.shape[1] - 128 + n_img.max())


def test_visual_topk_keeps_k_tokens_by_text_attention():
    model = tiny_llava()
    ids, mask, pixels = prompt()
    with torch.no_grad():
        full = model.model.get_image_features(pixel_values=pixels, vision_feature_layer=-2,
                                              vision_feature_select_strategy="default")
    full = torch.stack(list(getattr(full, "pooler_output", full)))
    attnzoo.patch(model, "visual_topk", k=24, layer=1)
    out = model.generate(input_ids=ids, pixel_values=pixels, attention_mask=mask, max_new_tokens=3, do_sample=False)
    assert (out == IMAGE_ID).sum(1).tolist() == [24, 24]
    kept = model.attnzoo_visual_tokens.last["kept"]
    assert kept.shape == (2, 24) and bool((kept.diff(dim=1) > 0).all())
    # the rewritten prompt holds exactly the kept tokens' features, in order
    r = model.attnzoo_visual_tokens.prepare(ids, pixels, mask)
    for n in range(2):
        torch.testing.assert_close(r.inputs_embeds[n][r.input_ids[n] == IMAGE_ID], full[n][kept[n]])


def test_visual_topk_with_all_tokens_is_the_unpatched_model():
    model = tiny_llava()
    ids, mask, pixels = prompt()
    with torch.no_grad():
        ref = model(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits
        attnzoo.patch(model, "visual_topk", k=64)
        got = model(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_plugin_remove_restores_the_model():
    model = tiny_llava()
    ids, mask, pixels = prompt()
    with torch.no_grad():
        ref = model(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits
        attnzoo.patch(model, "arrcoc", budget=32, levels=LEVELS)
        assert model(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits.shape[1] == ids.shape[1] - 32
        model.attnzoo_visual_tokens.remove()
        torch.testing.assert_close(model(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits, ref)
    assert "generate" not in model.__dict__


@pytest.mark.parametrize("name, options, exc, msg", [
    ("arrcoc", {"budget": 42, "levels": LEVELS}, ValueError, r"budget=42: must be a multiple of 4 .* 40, 44"),
    ("arrcoc", {"budget": 72, "levels": LEVELS}, ValueError, r"infeasible for 4 regions .* from 16 to 64"),
    ("arrcoc", {"budget": 324, "levels": LEVELS, "grid": 9}, ValueError, r"grid=9: the tower.s image has only 8"),
    ("arrcoc", {"budget": 64, "levels": LEVELS, "image_std": (1, 0, 1)}, ValueError, r"image_std=.*positive"),
    ("arrcoc", {"budgte": 64}, ValueError, r"unknown option 'budgte'.*Did you mean 'budget'"),
    ("visual_topk", {"k": 65}, ValueError, r"k=65: an image has 64 visual tokens"),
    ("visual_topk", {"k": 8, "layer": 3}, ValueError, r"layer=3: the language model has 3 layers"),
])
def test_patch_errors_name_option_value_and_valid_choices(name, options, exc, msg):
    with pytest.raises(exc, match=msg):
        attnzoo.patch(tiny_llava(layers=1), name, **options)


def test_patch_refuses_non_vlm_and_second_patch():
    from attnzoo.errors import AttnzooError, UnsupportedArchitectureError

    lm = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=2))
    with pytest.raises(UnsupportedArchitectureError, match="LLaVA-style"):
        attnzoo.patch(lm, "arrcoc", budget=256)
    model = tiny_llava(layers=1)
    attnzoo.patch(model, attnzoo.Arrcoc(budget=64, levels=LEVELS))
    with pytest.raises(AttnzooError, match="already patched"):
        attnzoo.patch(model, "visual_topk", k=8)


def test_prompt_without_the_full_image_tokens_is_refused():
    model = tiny_llava(layers=1)
    ids, mask, pixels = prompt()
    attnzoo.patch(model, "arrcoc", budget=32, levels=LEVELS)
    with pytest.raises(ValueError, match="expected 64 per image"):
        model(input_ids=ids[:, 10:], pixel_values=pixels)


def test_convert_refuses_a_run_time_plugin(tmp_path, capsys):
    from attnzoo.cli import main

    from attnzoo.conversion.pipeline import targets

    assert main(["convert", "builtin", str(tmp_path / "out"), "--to", "arrcoc"]) == 2
    err = capsys.readouterr().err
    assert "arrcoc" not in targets()  # nor are its flags in convert's help
    assert "run-time plug-in" in err and "nothing to convert" in err and not (tmp_path / "out").exists()
