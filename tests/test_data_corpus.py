"""The built-in corpus, its tokenizer and --data parsing."""
import pytest
import torch

from attnzoo.data import BuiltinCorpus, answer_mask, builtin_tokenizer, generate_sequence, load_tokenizer, open_data
from attnzoo.data import vocab as V


def test_corpus_is_deterministic_per_seed():
    a, b = BuiltinCorpus(3), BuiltinCorpus(3)
    assert torch.equal(a.batch(range(5)), b.batch(range(5)))
    assert torch.equal(a[7], torch.from_numpy(generate_sequence(3, 7)))
    assert not torch.equal(BuiltinCorpus(4)[0], a[0])
    assert not torch.equal(a[0], a[1])
    assert a[0].shape == (256,) and BuiltinCorpus(0, seq_len=64)[0].shape == (64,)


def test_corpus_tokens_are_in_vocab_and_start_with_bos():
    ids = BuiltinCorpus(0).batch(range(20))
    assert int(ids.min()) >= 0 and int(ids.max()) < V.VOCAB_SIZE == 512
    assert (ids[:, 0] == V.BOS).all()
    assert V.PAD not in ids and V.UNK not in ids


def test_answer_mask_marks_values_after_queried_keys():
    k, v = V.KEY_IDS, V.VALUE_IDS
    word = V.CLASS_IDS["noun_sg"][0]
    ids = torch.tensor([V.BOS, V.KV, k[1], v[5], k[2], v[6], word, V.PERIOD, V.Q, k[2], v[6], k[1], v[5], word])
    assert answer_mask(ids).nonzero().flatten().tolist() == [10, 12]
    seqs = BuiltinCorpus(0).batch(range(50))
    m = answer_mask(seqs)
    assert m.shape == seqs.shape and m.sum() > 50 * 3  # at least one episode of >= 3 pairs per sequence
    # every answer is a value whose key was bound earlier in the sequence to that value
    for row, mask in zip(seqs.tolist(), m.tolist()):
        for t in [i for i, x in enumerate(mask) if x][:5]:
            key, val = row[t - 1], row[t]
            first = row.index(key)
            assert row[first + 1] == val and first < t - 1


def test_tokenizer_round_trip_and_files(tmp_path):
    tok = builtin_tokenizer()
    corpus = BuiltinCorpus(0)
    text = corpus.text(2)
    assert tok(text, add_special_tokens=False)["input_ids"] == corpus[2].tolist()
    assert tok.decode(corpus[2][:6].tolist()) == " ".join(text.split()[:6])
    tok.save_pretrained(str(tmp_path))
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(str(tmp_path))
    assert again(text, add_special_tokens=False)["input_ids"] == corpus[2].tolist()
    assert load_tokenizer(tmp_path).get_vocab() == tok.get_vocab()
    assert load_tokenizer(tmp_path / "nothing") is None


def test_open_data_builtin_and_files(tmp_path):
    from safetensors.torch import save_file

    d = open_data("builtin:2", 64)
    assert torch.equal(d.batch([0]), BuiltinCorpus(2, 64).batch([0])) and d.has_answers
    ids = BuiltinCorpus(1, 64).batch(range(4))
    (tmp_path / "x.ids").write_text(" ".join(map(str, ids.flatten().tolist())))
    f = open_data(str(tmp_path / "x.ids"), 64)
    assert f.num_sequences == 4 and torch.equal(f.batch(range(4)), ids)
    assert f.answers([0]) is None  # no tokenizer: recall positions unknown
    f2 = open_data(str(tmp_path / "x.ids"), 64, tokenizer=builtin_tokenizer())
    assert torch.equal(f2.answers([1]), answer_mask(ids[1:2]))
    save_file({"input_ids": ids, "answer_mask": answer_mask(ids).long()}, str(tmp_path / "x.safetensors"))
    s = open_data(str(tmp_path / "x.safetensors"), 64)
    assert torch.equal(s.answers([2]), answer_mask(ids[2:3]))
    (tmp_path / "x.txt").write_text(BuiltinCorpus(1, 64).text(0))
    t = open_data(str(tmp_path / "x.txt"), 64, tokenizer=builtin_tokenizer())
    assert torch.equal(t.batch([0]), ids[:1])
    assert t.batch([1]).shape == (1, 64)  # wraps around into a new epoch


@pytest.mark.parametrize("content, match", [("", "holds 0 token"), ("1 2 x", "whitespace-separated integers"),
                                            ("1 2 900", r"range over \[1, 900\].*vocab_size is 512")])
def test_open_data_bad_files(tmp_path, content, match):
    (tmp_path / "bad.ids").write_text(content)
    with pytest.raises(ValueError, match="--data=.*bad.ids.*" + match):
        open_data(str(tmp_path / "bad.ids"), 64, vocab_size=512)


def test_open_data_errors_name_the_option(tmp_path):
    with pytest.raises(FileNotFoundError, match="--data='missing.txt': no such file"):
        open_data("missing.txt", 64)
    with pytest.raises(ValueError, match="--data='builtin:x'"):
        open_data("builtin:x", 64)
    (tmp_path / "t.txt").write_text("hello")
    with pytest.raises(ValueError, match="text file, but the model has no tokenizer"):
        open_data(str(tmp_path / "t.txt"), 64)
    with pytest.raises(ValueError, match="vocab_size is 100"):
        open_data("builtin", 64, vocab_size=100)


def test_write_corpus_files(tmp_path):
    from attnzoo.data.__main__ import main

    for name in ("c.ids", "c.safetensors", "c.txt"):
        main(["--out", str(tmp_path / name), "--sequences", "3", "--seq-len", "32"])
        d = open_data(str(tmp_path / name), 32, tokenizer=builtin_tokenizer())
        assert torch.equal(d.batch(range(3)), BuiltinCorpus(1, 32).batch(range(3)))
