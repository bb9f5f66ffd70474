"""Token-weighted loss and perplexity against values computed by hand."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from sftlab.core.errors import SftlabError
from sftlab.data.masking import IGNORE, Example
from sftlab.eval.loss import evaluate_loss, perplexity

# Next-token probabilities by previous token: a bigram "model" whose loss is easy to compute by hand.
PROBS = torch.tensor([[0.5, 0.25, 0.25],
                      [0.1, 0.8, 0.1],
                      [1 / 3, 1 / 3, 1 / 3]])


class BigramModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.table = torch.nn.Parameter(PROBS.log())

    def forward(self, input_ids, attention_mask=None, **_):
        return SimpleNamespace(logits=self.table[input_ids])


TOK = SimpleNamespace(pad_token_id=0, eos_token_id=2)
EXAMPLES = [
    Example([0, 1, 1], [IGNORE, 1, 1]),  # -ln P(1|0) - ln P(1|1) = ln 4 - ln 0.8
    Example([2, 0], [IGNORE, 0]),  # -ln P(0|2) = ln 3
]
BY_HAND = (math.log(4) - math.log(0.8) + math.log(3)) / 3  # mean over the 3 trained tokens


@pytest.mark.parametrize("batch_size", [1, 2, 5])
def test_token_weighted_loss_by_hand(batch_size):
    res = evaluate_loss(BigramModel(), TOK, EXAMPLES, batch_size=batch_size)
    assert res["tokens"] == 3
    assert res["loss"] == pytest.approx(BY_HAND, abs=1e-6)
    assert res["perplexity"] == pytest.approx(math.exp(BY_HAND), rel=1e-6)
    # a mean of per-batch means (batch size 1) would give a different number
    mean_of_means = ((math.log(4) - math.log(0.8)) / 2 + math.log(3)) / 2
    assert abs(res["loss"] - mean_of_means) > 0.04


def test_accepts_dict_rows_and_restores_mode():
    model = BigramModel()
    model.train()
    rows = [{"input_ids": e.input_ids, "labels": e.labels} for e in EXAMPLES]
    assert evaluate_loss(model, TOK, rows, batch_size=2)["loss"] == pytest.approx(BY_HAND, abs=1e-6)
    assert model.training


def test_perplexity_edges():
    assert perplexity(0.0) == 1.0
    assert perplexity(math.log(7)) == pytest.approx(7.0)
    assert perplexity(1e6) == float("inf")
    assert math.isnan(perplexity(float("nan")))


def test_errors():
    with pytest.raises(SftlabError, match="no examples"):
        evaluate_loss(BigramModel(), TOK, [])
    with pytest.raises(SftlabError, match="no trained token"):
        evaluate_loss(BigramModel(), TOK, [Example([0, 1], [IGNORE, IGNORE])])
    with pytest.raises(SftlabError, match="batch size"):
        evaluate_loss(BigramModel(), TOK, EXAMPLES, batch_size=0)


def test_tiny_model_matches_unpadded_per_example_sum(tiny_model_dir):
    """Padding in batches changes nothing: the loss equals the sum of per-example CE on unpadded inputs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    exs = [Example(tok.encode("hello world, hello there"), [IGNORE] * 3 + tok.encode("hello world, hello there")[3:]),
           Example(tok.encode("The quick brown fox"), tok.encode("The quick brown fox")),
           Example(tok.encode("abc"), [IGNORE] + tok.encode("abc")[1:])]
    total, count = 0.0, 0
    with torch.no_grad():
        for e in exs:
            logits = model(torch.tensor([e.input_ids])).logits[0, :-1]
            labels = torch.tensor(e.labels[1:])
            total += float(F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum"))
            count += int((labels != IGNORE).sum())
    res = evaluate_loss(model, tok, exs, batch_size=3)
    assert res["tokens"] == count
    assert res["loss"] == pytest.approx(total / count, rel=1e-5)
