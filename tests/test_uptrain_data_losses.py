"""Uptraining's data path (token files: prepared once, memory-mapped, packed, seeded order) and its chunked
output-head losses (same values and gradients as the full-logits loss)."""
import json

import numpy as np
import pytest
import torch

from attnzoo.cli import main
from attnzoo.data.sources import open_data
from attnzoo.data.token_file import TokenFileWriter, WindowOrder, open_token_file, sidecar_path
from attnzoo.uptrain import UptrainOptions, uptrain
from attnzoo.uptrain.losses import chunked_head_loss, mixed_loss

from tinylm import save_init, weights


def test_prepare_builtin_writes_uint16_memmap_with_sidecar(tmp_path, capsys):
    from attnzoo.data.corpus import generate_sequence

    out = tmp_path / "b.tokens"
    assert main(["data", "prepare", "builtin:3", "--tokens", "300", "--seq-len", "64", "--out", str(out),
                 "--no-progress"]) == 0
    assert "300" in capsys.readouterr().out
    meta = json.loads(sidecar_path(out).read_text())
    assert meta["dtype"] == "uint16" and meta["count"] == 300 and meta["tokenizer"] == "builtin"
    assert out.stat().st_size == 600
    tf = open_token_file(out)
    assert isinstance(tf.ids, np.memmap)
    stream = np.concatenate([generate_sequence(3, i, 64) for i in range(5)])[:300]
    assert np.array_equal(np.asarray(tf.ids), stream)
    data = open_data(str(out), 64)  # no seed: file order, 4 whole windows
    assert data.num_sequences == 4 and torch.equal(data.batch([1])[0], torch.from_numpy(stream[64:128]))
    assert main(["data", "prepare", "builtin:3", "--tokens", "10", "--out", str(out)]) == 2  # exists: --force


def test_prepare_text_packs_documents_with_eos_and_checks_tokenizer(tmp_path):
    from attnzoo.data import vocab as V

    words = V.TOKENS[200:210]
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text(" ".join(words[:4]))
    (tmp_path / "docs" / "b.txt").write_text(" ".join(words[4:]))
    model = save_init(tmp_path / "m")
    out = tmp_path / "t.tokens"
    assert main(["data", "prepare", str(tmp_path / "docs"), "--tokenizer", str(model), "--out", str(out),
                 "--no-progress"]) == 0
    ids = np.asarray(open_token_file(out).ids).tolist()
    assert ids == list(range(200, 204)) + [V.EOS] + list(range(204, 210)) + [V.EOS]
    # a file tokenized with another vocabulary is refused by name
    meta = json.loads(sidecar_path(out).read_text())
    sidecar_path(out).write_text(json.dumps({**meta, "tokenizer_sha256": "0" * 64}))
    from attnzoo.data.tokenizer import load_tokenizer

    with pytest.raises(ValueError, match="--data=.*vocabulary differs"):
        open_data(str(out), 4, tokenizer=load_tokenizer(model))
    with pytest.raises(ValueError, match="vocab_size is 100"):
        open_data(str(out), 4, vocab_size=100)


def test_large_vocabulary_uses_int32_and_bad_ids_are_refused(tmp_path):
    with TokenFileWriter(tmp_path / "w.tokens", vocab_size=70000, eos_id=69999) as w:
        w.add([65536, 1, 2])
    tf = open_token_file(tmp_path / "w.tokens")
    assert tf.meta["dtype"] == "int32" and np.asarray(tf.ids).tolist() == [65536, 1, 2, 69999]
    with pytest.raises(ValueError, match="range over"):
        with TokenFileWriter(tmp_path / "x.tokens", vocab_size=10, eos_id=None) as w:
            w.add([3, 10])
    assert not (tmp_path / "x.tokens").exists() and not list(tmp_path.glob(".x.tokens*"))


def test_window_order_is_a_seeded_permutation_per_epoch():
    a, b, c = WindowOrder(7, 1), WindowOrder(7, 1), WindowOrder(7, 2)
    first = [a(i) for i in range(14)]
    assert sorted(first[:7]) == list(range(7)) and sorted(first[7:]) == list(range(7))
    assert first[:7] != first[7:]  # a new order each epoch
    assert [b(i) for i in reversed(range(14))] == first[::-1]  # random access: any index, any order
    assert [c(i) for i in range(7)] != first[:7]


@pytest.mark.parametrize("teacher,temperature,bias", [(False, 1.0, False), (True, 1.0, False), (True, 2.0, True)])
def test_chunked_loss_matches_full_logits_values_and_gradients(teacher, temperature, bias):
    torch.manual_seed(0)
    b, t, h, v = 3, 11, 16, 37
    hidden = torch.randn(b, t, h, requires_grad=True)
    head = torch.nn.Linear(h, v, bias=bias)
    t_hidden, t_head = (torch.randn(b, t, 12), torch.nn.Linear(12, v)) if teacher else (None, None)
    ids = torch.randint(0, v, (b, t))
    ref, ref_parts = mixed_loss(head(hidden), ids, t_head(t_hidden) if teacher else None, 0.3, temperature)
    wrt = [hidden, head.weight] + ([head.bias] if bias else [])
    ref_grads = torch.autograd.grad(ref * 1.7, wrt)
    for chunk in (1, 7, 1000):  # one row, a chunk that does not divide 30 rows, one chunk
        loss, parts = chunked_head_loss(hidden, head, ids, t_hidden, t_head, 0.3, temperature, chunk)
        torch.testing.assert_close(loss, ref)
        assert parts.keys() == ref_parts.keys()
        for k in parts:
            torch.testing.assert_close(parts[k], ref_parts[k])
        for g, r in zip(torch.autograd.grad(loss * 1.7, wrt), ref_grads):
            torch.testing.assert_close(g, r)


def test_uptrain_on_a_token_file_chunked_loss_matches_full_logits_and_checkpointing_changes_nothing(tmp_path):
    model = save_init(tmp_path / "m")
    teacher = save_init(tmp_path / "t", seed=1)
    data = tmp_path / "d.tokens"
    assert main(["data", "prepare", "builtin:0", "--tokens", "2000", "--seq-len", "32", "--out", str(data),
                 "--no-progress"]) == 0
    common = dict(model=str(model), data=str(data), teacher=str(teacher), alpha=0.4, temperature=2.0,
                  tokens=3 * 2 * 32, batch_size=2, seq_len=32, lr=3e-3, progress=False, cpu=True)
    a = uptrain(UptrainOptions(out=str(tmp_path / "a"), loss_chunk=16, **common))
    b = uptrain(UptrainOptions(out=str(tmp_path / "b"), loss_chunk=0, **common))
    c = uptrain(UptrainOptions(out=str(tmp_path / "c"), loss_chunk=16, activation_checkpointing=True, **common))
    for key in ("loss", "ce", "kl"):
        assert [e[key] for e in a.log] == pytest.approx([e[key] for e in b.log], rel=1e-5)
        assert [e[key] for e in c.log] == [e[key] for e in a.log]  # recomputation changes nothing
    wa, wb = weights(tmp_path / "a"), weights(tmp_path / "b")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-3, atol=1e-4)  # Adam divides tiny differences by tiny moments


def test_prepare_takes_token_id_files_as_documents(tmp_path):
    from safetensors.torch import save_file

    save_file({"input_ids": torch.tensor([[9, 8], [7, 6]], dtype=torch.int32)}, str(tmp_path / "a.safetensors"))
    (tmp_path / "b.ids").write_text("5 4\n3\n")
    model = save_init(tmp_path / "m")
    out = tmp_path / "t.tokens"
    assert main(["data", "prepare", str(tmp_path / "a.safetensors"), str(tmp_path / "b.ids"), "--tokenizer",
                 str(model), "--out", str(out), "--no-progress"]) == 0
    assert np.asarray(open_token_file(out).ids).tolist() == [9, 8, 7, 6, 2, 5, 4, 3, 2]  # 2: <eos>


def test_bad_input_names_the_option(tmp_path, capsys):
    assert main(["data", "prepare", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "x.tokens")]) == 2
    assert "INPUT=" in capsys.readouterr().err
    assert main(["data", "prepare", "builtin", "--out", str(tmp_path / "x.tokens")]) == 2
    assert "give --tokens N" in capsys.readouterr().err
    model = save_init(tmp_path / "m")
    with pytest.raises(ValueError, match="--teacher-placement=shard: .* a single process"):
        uptrain(UptrainOptions(model=str(model), out=str(tmp_path / "o"), tokens=64, teacher=str(model),
                               teacher_placement="shard", progress=False, cpu=True))
    with pytest.raises(ValueError, match="--loss-chunk=-1"):
        UptrainOptions(model="m", out="o", tokens=64, loss_chunk=-1).validate()
