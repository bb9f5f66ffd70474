"""Token-weighted loss and perplexity over the trained tokens of tokenized examples.

The loss is the sum of the per-token cross-entropy over every trained token (label != -100) of every
example, divided by the number of those tokens: a mean over tokens, never a mean of batch means
(which would weight a short batch like a long one and change with the batch size). Example weights
are ignored here: this is a measurement, not the training objective.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from sftlab.core.errors import SftlabError
from sftlab.core.loss import hidden_states_instead_of_logits, sft_loss
from sftlab.data.collate import PadCollator
from sftlab.data.masking import IGNORE, Example


def perplexity(loss: float) -> float:
    """exp(loss), inf when it overflows, nan for a nan loss."""
    if math.isnan(loss):
        return float("nan")
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


def _as_example(e: Any) -> Example:
    if isinstance(e, Example):
        return e
    if isinstance(e, dict) and "input_ids" in e and "labels" in e:
        return Example(list(e["input_ids"]), list(e["labels"]))
    raise TypeError(f"expected an Example or a dict with input_ids and labels, got {type(e).__name__}")


def _device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover - a model without parameters
        return torch.device("cpu")


def token_loss_sums(model, batch: dict[str, torch.Tensor]) -> tuple[float, int]:
    """(sum of cross-entropy over trained tokens, number of trained tokens) for one padded batch.

    Labels are shifted here (position t predicts token t+1), in float32 whatever the model dtype.
    """
    dev = _device(model)
    ids = batch["input_ids"].to(dev)
    att = batch["attention_mask"].to(dev)
    labels = batch["labels"].to(dev)
    n = int((labels[:, 1:] != IGNORE).sum())
    if n == 0:
        return 0.0, 0
    # The training loss function (one place for the shift and the sum), without label smoothing.
    with hidden_states_instead_of_logits(model) as head:
        hidden = model(input_ids=ids, attention_mask=att).logits
        total = sft_loss(hidden, head, labels, num_items=1)
    return float(total), n


def evaluate_loss(model, tokenizer, examples: Sequence[Example | dict], batch_size: int = 8) -> dict[str, float]:
    """Loss and perplexity of ``model`` over the trained tokens of ``examples``.

    ``examples``: :class:`~sftlab.data.masking.Example` objects or dicts with ``input_ids`` and
    ``labels`` (-100 = not scored), as ``Labeler.encode`` or ``prepare --dump`` give them. Returns
    ``{"loss": mean nats per trained token, "perplexity": exp(loss), "tokens": trained tokens scored}``.
    The model is put in eval mode for the call and its previous mode restored (safe inside training).
    """
    if batch_size < 1:
        raise SftlabError(f"batch size {batch_size} must be at least 1")
    exs = [_as_example(e) for e in examples]
    if not exs:
        raise SftlabError("no examples to evaluate the loss on", hint="check the eval data and max_seq_length")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collate = PadCollator(pad_id if pad_id is not None else 0)
    # Longest first: similar lengths share a batch (less padding); the sum does not depend on order.
    order = sorted(range(len(exs)), key=lambda i: -len(exs[i].input_ids))
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                batch = collate([exs[i] for i in order[start:start + batch_size]])
                s, n = token_loss_sums(model, batch)
                total += s
                count += n
    finally:
        model.train(was_training)
    if count == 0:
        raise SftlabError("the eval examples have no trained token to score", hint="check the masking strategy")
    loss = total / count
    return {"loss": loss, "perplexity": perplexity(loss), "tokens": count}
