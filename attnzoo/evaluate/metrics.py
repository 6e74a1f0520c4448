"""Teacher-forced quality metrics: perplexity overall and on recall answer tokens, recall accuracy.

Definitions (all over the positions that predict a next token, i.e. token ``t >= 1`` of a
sequence predicted from tokens ``< t``):

* ``perplexity = exp(mean NLL)`` over every predicted token. A model that spreads its
  probability uniformly over ``V`` tokens has perplexity exactly ``V``.
* ``recall_perplexity = exp(mean NLL)`` over *answer tokens* only (the value after a queried
  key, see :func:`attnzoo.data.corpus.answer_mask`).
* ``recall_accuracy``: fraction of answer tokens that are the model's top-1 (argmax) prediction.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["Scores", "score"]


@dataclass
class Scores:
    tokens: int
    nll_sum: float
    answers: int
    answer_nll_sum: float
    answer_correct: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll_sum / self.tokens)

    @property
    def recall_perplexity(self) -> float | None:
        return math.exp(self.answer_nll_sum / self.answers) if self.answers else None

    @property
    def recall_accuracy(self) -> float | None:
        return self.answer_correct / self.answers if self.answers else None


@torch.no_grad()
def score(model, data, num_sequences: int, batch_size: int = 16, device=None, progress: bool = False) -> Scores:
    """Score ``num_sequences`` sequences of ``data`` (a :class:`~attnzoo.data.sources.TokenData`)."""
    from tqdm.auto import tqdm

    device = device or next(model.parameters()).device
    s = Scores(0, 0.0, 0, 0.0, 0)
    for start in tqdm(range(0, num_sequences, batch_size), desc="eval", unit="batch", disable=not progress,
                      leave=False):
        idx = range(start, min(num_sequences, start + batch_size))
        ids = data.batch(idx)
        answers = data.answers(idx, ids)
        logits = model(input_ids=ids.to(device)).logits[:, :-1].float().cpu()
        target = ids[:, 1:]
        nll = -F.log_softmax(logits, dim=-1).gather(-1, target.unsqueeze(-1)).squeeze(-1).double()
        s.tokens += nll.numel()
        s.nll_sum += float(nll.sum())
        if answers is not None:
            m = answers[:, 1:]
            s.answers += int(m.sum())
            s.answer_nll_sum += float(nll[m].sum())
            s.answer_correct += int((logits.argmax(-1) == target)[m].sum())
    return s
