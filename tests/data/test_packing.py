"""Packing: best-fit decreasing, and packed loss equals unpacked loss (no attention across examples)."""

import random

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from sftlab.data.collate import PackedCollator, PadCollator, block_causal_mask
from sftlab.data.masking import IGNORE, Example, Labeler
from sftlab.data.packing import pack, pack_indices, packing_efficiency
from sftlab.data.templates import resolve_template
from sftlab.data.types import Conversation, Message


def test_best_fit_decreasing_places_every_item_once_within_capacity():
    rng = random.Random(0)
    lengths = [rng.randint(1, 100) for _ in range(500)]
    bins = pack_indices(lengths, 128)
    flat = sorted(i for b in bins for i in b)
    assert flat == list(range(500))
    assert all(sum(lengths[i] for i in b) <= 128 for b in bins)
    lower_bound = -(-sum(lengths) // 128)
    assert len(bins) <= lower_bound * 1.1  # BFD is near-optimal on uniform sizes


def test_best_fit_picks_tightest_bin():
    # 7 goes first (alone), then 5 (new bin), then 3 fits both (3 left in 7's bin? no: 10-7=3), best is the 7-bin.
    assert pack_indices([7, 5, 3], 10) == [[0, 2], [1]]


def test_block_mask_is_causal_within_examples_only():
    m = block_causal_mask([[2, 3]], 6)[0, 0]
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],  # padding attends only to itself
    ], dtype=torch.bool)
    assert torch.equal(m, expected)


def _summed_loss(model, batch) -> tuple[torch.Tensor, int]:
    kwargs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
    logits = model(**kwargs).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE, reduction="sum")
    return loss, int((labels != IGNORE).sum())


@pytest.fixture(scope="module")
def examples(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rng = random.Random(1)
    words = ["alpha", "beta", "gamma", "delta", "json", "{", "}", "42", "Paris", "hello"]
    convs = [Conversation([Message("user", " ".join(rng.choices(words, k=rng.randint(2, 12)))),
                           Message("assistant", " ".join(rng.choices(words, k=rng.randint(1, 15))))])
             for _ in range(9)]
    exs, _ = Labeler(tok, resolve_template("chatml", tok), masking="all").encode(convs)
    return tok, exs


@pytest.mark.parametrize("attn,mask_dtype", [("sdpa", None), ("eager", torch.float32)])
def test_packed_loss_equals_unpacked_loss(tiny_model_dir, examples, attn, mask_dtype):
    tok, exs = examples
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attn).eval()
    with torch.no_grad():
        ref_sum, ref_n = 0.0, 0
        for e in exs:
            s, n = _summed_loss(model, PadCollator(tok.pad_token_id)([e]))
            ref_sum, ref_n = ref_sum + s, ref_n + n
        rows = pack(exs, 160)
        assert len(rows) < len(exs)
        batch = PackedCollator(tok.pad_token_id, mode="mask", mask_dtype=mask_dtype)(rows)
        packed_sum, packed_n = _summed_loss(model, batch)
    # every example's first token is masked in a pack; all-token masking trains it unpacked only
    # through the shift, which drops it anyway -> same trained-token count.
    assert packed_n == ref_n
    assert torch.allclose(packed_sum / packed_n, ref_sum / ref_n, atol=1e-5, rtol=0)


def test_without_the_block_mask_examples_leak(tiny_model_dir, examples):
    """The invariant test can fail: position ids with a plain padding mask let examples see each other."""
    tok, exs = examples
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").eval()
    with torch.no_grad():
        ref = sum(_summed_loss(model, PadCollator(tok.pad_token_id)([e]))[0] for e in exs)
        batch = PackedCollator(tok.pad_token_id, mode="mask")(pack(exs, 160))
        batch["attention_mask"] = (batch["input_ids"] != -1).long()  # 2D all-ones: no isolation
        leaked, _ = _summed_loss(model, batch)
    assert abs(float(leaked - ref)) > 1e-3


def test_pack_masks_each_examples_first_label_and_keeps_weights():
    exs = [Example([1, 2, 3], [1, 2, 3], 2.0, 0), Example([4, 5], [4, 5], 1.0, 1)]
    (row,) = pack(exs, 8)
    assert row.input_ids == [1, 2, 3, 4, 5]
    assert row.labels == [IGNORE, 2, 3, IGNORE, 5]
    batch = PackedCollator(0, mode="flash")([row])
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert "attention_mask" not in batch
    assert batch["loss_weights"].tolist() == [[2.0, 2.0, 2.0, 1.0, 1.0]]
    assert packing_efficiency([row], 8) == 5 / 8


@pytest.mark.parametrize("mode", ["token", "sequence"])
def test_sftlabs_training_loss_is_the_same_packed_and_unpacked(tiny_model_dir, examples, mode):
    """The training path itself (the head swapped for hidden states, only trained positions projected, each
    packed example its own sequence by its position ids), normalised as the trainer does, for both loss modes."""
    from sftlab.core.loss import count_sequences
    from sftlab.train.trainer import forward_loss

    tok, exs = examples
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").eval()
    losses = []
    with torch.no_grad():
        for batch in (PadCollator(tok.pad_token_id)(exs), PackedCollator(tok.pad_token_id, mode="mask")(pack(exs, 160))):
            pos = batch.get("position_ids")
            loss, _ = forward_loss(model, batch, mode=mode, position_ids=pos, num_items=int((batch["labels"][:, 1:] != IGNORE).sum()),
                                   num_sequences=count_sequences(batch["labels"], pos))
            losses.append(float(loss))
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
