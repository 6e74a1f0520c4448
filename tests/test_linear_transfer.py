"""Attention transfer (`attnzoo uptrain --stage transfer`): only the feature maps train, the per-head MSE against
the softmax teacher falls, then LoRA trains on top and the feature maps train fully there."""
import json

import pytest
import torch

import attnzoo
from attnzoo.uptrain import UptrainOptions, uptrain
from attnzoo.uptrain.transfer import start_transfer, transfer_modules

from tinylm import pretrained_tiny, weights

SMALL = dict(batch_size=2, seq_len=32, progress=False, cpu=True)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("lin")
    init = pretrained_tiny(root, steps=15)
    model = attnzoo.from_pretrained(str(init))
    attnzoo.patch(model, "linear", feature_map="hedgehog", window=4)
    model.save_pretrained(str(root / "conv"))
    (root / "conv" / "tokenizer.json").write_bytes((init / "tokenizer.json").read_bytes())
    (root / "conv" / "tokenizer_config.json").write_bytes((init / "tokenizer_config.json").read_bytes())
    return root / "conv"


def test_transfer_trains_only_the_feature_maps_and_lowers_the_mse(converted, tmp_path):
    r = uptrain(UptrainOptions(model=str(converted), out=str(tmp_path / "t"), tokens=30 * 2 * 32, lr=2e-2,
                               stage="transfer", **SMALL))
    ids = torch.randint(3, 500, (4, 32), generator=torch.Generator().manual_seed(0))
    assert _mse(tmp_path / "t", ids) < 0.8 * _mse(converted, ids)
    before, after = weights(converted), weights(tmp_path / "t")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("feature_map" in k for k in changed), sorted(changed)[:5]
    rec = json.loads((tmp_path / "t" / "config.json").read_text())["attnzoo"]
    assert rec["uptrain"][-1]["tokens"] == r.tokens and rec["variant"] == "linear"
    lora = uptrain(UptrainOptions(model=str(tmp_path / "t"), out=str(tmp_path / "l"), tokens=2 * 2 * 32, lora_rank=2,
                                  lr=1e-3, **SMALL))
    assert "trained fully: k_feature_map, q_feature_map" in lora.trainable.describe()
    again = attnzoo.from_pretrained(str(tmp_path / "l"))
    assert not any(m.transfer for m in transfer_modules(again))


def _mse(path, ids) -> float:
    from attnzoo.uptrain.transfer import transfer_objective

    model = attnzoo.from_pretrained(str(path)).eval()
    start_transfer(model)
    with torch.no_grad():
        return float(transfer_objective(model, model(input_ids=ids).logits, ids)[0])


def test_transfer_forwards_the_teacher(converted):
    """Teacher-forced: in transfer mode each layer passes on its softmax heads, so the logits are the original
    model's, and transfer_loss is set on every layer."""
    model = attnzoo.from_pretrained(str(converted)).eval()
    ids = torch.randint(3, 100, (1, 12))
    start_transfer(model)
    with torch.no_grad():
        forced = model(input_ids=ids).logits
    assert all(m.transfer_loss is not None for m in transfer_modules(model))
    src = attnzoo.from_pretrained(str(converted.parent / "tiny-pretrained")).eval()
    with torch.no_grad():
        torch.testing.assert_close(forced, src(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_transfer_refuses_what_it_cannot_do(tmp_path, converted):
    init = converted.parent / "tiny-pretrained"
    with pytest.raises(ValueError, match="convert it first"):
        uptrain(UptrainOptions(model=str(init), out=str(tmp_path / "x"), tokens=64, stage="transfer", **SMALL))
    with pytest.raises(ValueError, match="no --lora-rank"):
        UptrainOptions(model="m", out="o", tokens=64, stage="transfer", lora_rank=2).validate()
