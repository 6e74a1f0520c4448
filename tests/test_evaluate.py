"""attnzoo eval: metrics that are right on models whose answer is known."""
import json
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.modeling_outputs import CausalLMOutput

from attnzoo.cli import main
from attnzoo.data import BuiltinCorpus, answer_mask, open_data
from attnzoo.evaluate import evaluate, score

from tinylm import save_init


def _llama(vocab=512, **kw):
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, tie_word_embeddings=False, **kw)
    return LlamaForCausalLM(cfg)


def test_uniform_model_has_perplexity_equal_to_vocab_size():
    model = _llama()
    torch.nn.init.zeros_(model.lm_head.weight)  # every logit 0: uniform over 512 tokens
    r = evaluate(model, open_data("builtin:1", 64), num_sequences=6, batch_size=4, decode_tokens=0)
    assert r.perplexity == pytest.approx(512, rel=1e-6)
    assert r.recall_perplexity == pytest.approx(512, rel=1e-6)
    assert r.tokens == 6 * 63 and r.answers > 0


class Oracle(torch.nn.Module):
    """Cheats: reads the next token from its input. Perplexity 1, recall accuracy 1."""

    def __init__(self, config, wrong_answers=False):
        super().__init__()
        self.config, self.wrong = config, wrong_answers
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, **kw):
        nxt = torch.cat([input_ids[:, 1:], input_ids[:, -1:]], dim=1)
        if self.wrong:  # predict a different value at every answer position
            m = torch.cat([answer_mask(input_ids)[:, 1:], torch.zeros_like(input_ids[:, :1], dtype=torch.bool)], 1)
            nxt = torch.where(m, nxt + 1, nxt)
        return CausalLMOutput(logits=torch.nn.functional.one_hot(nxt, 512).float() * 100.0)


def test_oracle_model_scores_perfectly_and_wrong_answers_show():
    cfg = _llama().config
    data = open_data("builtin:1", 64)
    r = evaluate(Oracle(cfg), data, num_sequences=5, decode_tokens=0)
    assert r.perplexity == pytest.approx(1.0, abs=1e-6) and r.recall_accuracy == 1.0
    w = score(Oracle(cfg, wrong_answers=True), data, 5)
    assert w.recall_accuracy == 0.0 and w.recall_perplexity > 1e10
    n_all = w.tokens - w.answers  # every non-answer token is still perfect
    assert math.exp((w.nll_sum - w.answer_nll_sum) / n_all) == pytest.approx(1.0, abs=1e-6)


def test_kv_bytes_and_decode_speed():
    mha, gqa = _llama(), _llama(num_key_value_heads=2)
    data = open_data("builtin:1", 64)
    a = evaluate(mha, data, num_sequences=2, decode_tokens=4)
    b = evaluate(gqa, data, num_sequences=2, decode_tokens=4)
    assert a.kv_bytes_per_token == 1 * 2 * 4 * 8 * 4 and b.kv_bytes_per_token == a.kv_bytes_per_token // 2
    assert a.decode_tokens_per_s > 0 and a.kv_dtype == "float32"


def test_eval_cli_table_and_json(tmp_path, capsys):
    model = save_init(tmp_path / "m")
    ids = BuiltinCorpus(1, 64).batch(range(3))
    (tmp_path / "d.ids").write_text(" ".join(map(str, ids.flatten().tolist())))
    rc = main(["eval", "--model", str(model), "--data", str(tmp_path / "d.ids"), "--seq-len", "64",
               "--num-seqs", "0", "--decode-tokens", "2", "--json", str(tmp_path / "m.json")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "perplexity (all tokens)" in out and "recall accuracy" in out
    d = json.loads((tmp_path / "m.json").read_text())
    assert d["sequences"] == 3 and d["tokens"] == 3 * 63 and d["recall_accuracy"] is not None
    assert d["kv_bytes_per_token"] == 2 * 2 * 4 * 8 * 4


@pytest.mark.parametrize("argv, message", [
    (["--model", "/no/such/dir"], "--model='/no/such/dir': no such directory"),
    (["--model", "{model}", "--data", "{tmp}/empty.ids"], "holds 0 token"),
    (["--model", "{model}", "--num-seqs", "0"], "--num-seqs=0"),
    (["--model", "{model}", "--data", "nope.txt"], "--data='nope.txt': no such file"),
])
def test_eval_cli_errors(tmp_path, capsys, argv, message):
    model = save_init(tmp_path / "m")
    (tmp_path / "empty.ids").write_text("")
    argv = [a.format(model=model, tmp=tmp_path) for a in argv]
    assert main(["eval", *argv]) == 2
    assert message in capsys.readouterr().err
